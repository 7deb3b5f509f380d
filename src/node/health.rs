//! `grpc.health.v1.Health`: SERVING once the node serves; NOT_SERVING while
//! it drains on shutdown, and for the node ("") and KV while a shard's disk
//! is full (writes are refused then). `Watch` sends the status at once and
//! then every change, and ends after the last one at shutdown.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use super::api::Api;
use crate::grpc::{Status, StreamCall};
use crate::proto::grpc::health::v1::health_check_response::ServingStatus;
use crate::proto::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};

pub const CHECK: &str = "/grpc.health.v1.Health/Check";
pub const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// How often a Watch looks at the status (it has no event to wait on).
const WATCH_PERIOD: Duration = Duration::from_millis(200);

/// The services whose health can be asked for; "" is the node as a whole.
const SERVICES: &[&str] = &[
    "",
    "atomix.multiraft.v1.Node",
    "multiraft.kv.v1.KV",
    "multiraft.admin.v1.Admin",
];

/// The status of `service`, or `None` if the node does not know it.
fn status_of(api: &Api, service: &str) -> Option<ServingStatus> {
    if !SERVICES.contains(&service) {
        return None;
    }
    let disk_full = api.node.shards.any_disk_full();
    let writes_matter = matches!(service, "" | "multiraft.kv.v1.KV");
    Some(if api.shutdown.is_set() || (disk_full && writes_matter) {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    })
}

fn response(status: ServingStatus) -> Bytes {
    Bytes::from(
        HealthCheckResponse {
            status: status as i32,
        }
        .encode_to_vec(),
    )
}

/// `Check`: NOT_FOUND for an unknown service, as the protocol says.
pub fn check(api: &Api, body: &[u8]) -> Result<Bytes, Status> {
    let req: HealthCheckRequest = super::api::decode(body)?;
    match status_of(api, &req.service) {
        Some(s) => Ok(response(s)),
        None => Err(Status::not_found(format!(
            "unknown service {:?}",
            req.service
        ))),
    }
}

/// `Watch`: SERVICE_UNKNOWN for an unknown service (and the call stays
/// open, as the protocol says: the service might appear).
pub async fn watch(api: Api, mut call: StreamCall) -> Result<(), Status> {
    let req: HealthCheckRequest = match call.incoming.next().await {
        Some(m) => super::api::decode(&m?)?,
        None => return Err(Status::invalid_argument("Watch needs a request")),
    };
    let mut last = None;
    loop {
        let now = status_of(&api, &req.service).unwrap_or(ServingStatus::ServiceUnknown);
        if last != Some(now) {
            call.outgoing.send(response(now)).await?;
            last = Some(now);
        }
        if api.shutdown.is_set() {
            return Ok(());
        }
        let tick = glommio::timer::sleep(WATCH_PERIOD);
        let stop = api.shutdown.wait();
        futures::future::select(std::pin::pin!(tick), std::pin::pin!(stop)).await;
    }
}

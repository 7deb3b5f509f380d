//! The data commands, like etcdctl's: `put`, `get`, `del`, `cas`.
//!
//! Keys are given as text; values as text or read from a file (`-` for
//! stdin). Without `--json`, `get` writes the value's bytes to stdout as
//! they are, and the others print one line; with `--json`, every command
//! prints one object in proto3 JSON (bytes in base64, as grpcurl shows
//! them). A missing key (`get`) and a failed comparison (`cas`) exit with
//! status 1; errors exit with status 1 and name the gRPC status.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;

use crate::grpc::{Client, Status};
use crate::node::api::{KV_CAS, KV_DELETE, KV_GET, KV_PUT};
use crate::proto::kv::{
    CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, PutRequest, PutResponse,
};

/// What every data command needs.
pub struct Target {
    pub addr: String,
    /// 0: chosen from the key by the server.
    pub partition: u32,
    pub timeout: Duration,
    pub json: bool,
}

/// What a command prints and whether it counts as success.
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub ok: bool,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `bytes` as text when it is UTF-8, else as base64 with a marker.
fn shown(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("base64:{}", b64(b)),
    }
}

fn line(s: String) -> Outcome {
    Outcome {
        stdout: format!("{s}\n").into_bytes(),
        ok: true,
    }
}

fn json(v: serde_json::Value, ok: bool) -> Outcome {
    Outcome {
        stdout: format!("{v}\n").into_bytes(),
        ok,
    }
}

/// The JSON answer of a Put or Delete.
fn write_json(index: u64, partition: u32, previous: Option<&[u8]>) -> Outcome {
    let mut v = serde_json::json!({"index": index.to_string(), "partitionId": partition});
    if let Some(p) = previous {
        v["previous"] = b64(p).into();
    }
    json(v, true)
}

/// Reads a value given as `--value-file PATH` (`-`: stdin).
pub fn read_value_file(path: &str) -> Result<Bytes, String> {
    let mut out = Vec::new();
    if path == "-" {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut out)
            .map_err(|e| format!("read stdin: {e}"))?;
    } else {
        out = std::fs::read(path).map_err(|e| format!("read {path}: {e}"))?;
    }
    Ok(Bytes::from(out))
}

pub async fn put(t: &Target, key: &str, value: Bytes) -> Result<Outcome, Status> {
    let req = PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value,
        partition_id: t.partition,
    };
    let r: PutResponse = Client::connect(&t.addr)
        .await?
        .call(KV_PUT, &req, Some(t.timeout))
        .await?;
    Ok(if t.json {
        write_json(r.index, r.partition_id, r.previous.as_deref())
    } else {
        let prev = r.previous.as_deref().map(shown);
        line(format!(
            "OK index {} partition {}{}",
            r.index,
            r.partition_id,
            prev.map(|p| format!(" previous {p}")).unwrap_or_default()
        ))
    })
}

pub async fn get(t: &Target, key: &str, serializable: bool) -> Result<Outcome, Status> {
    let req = GetRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        partition_id: t.partition,
        serializable,
    };
    let r: GetResponse = Client::connect(&t.addr)
        .await?
        .call(KV_GET, &req, Some(t.timeout))
        .await?;
    Ok(if t.json {
        let mut v = serde_json::json!({
            "found": r.found,
            "index": r.index.to_string(),
            "partitionId": r.partition_id,
        });
        if r.found {
            v["value"] = b64(&r.value).into();
        }
        json(v, r.found)
    } else if r.found {
        Outcome {
            stdout: r.value.to_vec(),
            ok: true,
        }
    } else {
        eprintln!("key {key:?} not found (partition {})", r.partition_id);
        Outcome {
            stdout: Vec::new(),
            ok: false,
        }
    })
}

pub async fn del(t: &Target, key: &str) -> Result<Outcome, Status> {
    let req = DeleteRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        partition_id: t.partition,
    };
    let r: DeleteResponse = Client::connect(&t.addr)
        .await?
        .call(KV_DELETE, &req, Some(t.timeout))
        .await?;
    Ok(if t.json {
        write_json(r.index, r.partition_id, r.previous.as_deref())
    } else {
        line(match &r.previous {
            Some(p) => format!(
                "OK index {} partition {} deleted {}",
                r.index,
                r.partition_id,
                shown(p)
            ),
            None => format!(
                "OK index {} partition {} (there was no such key)",
                r.index, r.partition_id
            ),
        })
    })
}

/// Sets `key` to `value` if it holds `expected` (`None`: if it is absent).
pub async fn cas(
    t: &Target,
    key: &str,
    expected: Option<Bytes>,
    value: Bytes,
) -> Result<Outcome, Status> {
    let req = CompareAndSwapRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        expected,
        value,
        partition_id: t.partition,
    };
    let r: CompareAndSwapResponse = Client::connect(&t.addr)
        .await?
        .call(KV_CAS, &req, Some(t.timeout))
        .await?;
    Ok(if t.json {
        let mut v = serde_json::json!({
            "succeeded": r.succeeded,
            "index": r.index.to_string(),
            "partitionId": r.partition_id,
        });
        if let Some(c) = &r.current {
            v["current"] = b64(c).into();
        }
        json(v, r.succeeded)
    } else if r.succeeded {
        line(format!("OK index {} partition {}", r.index, r.partition_id))
    } else {
        let current = r.current.as_deref().map(shown);
        Outcome {
            stdout: format!(
                "FAILED: the key holds {}\n",
                current.unwrap_or_else(|| "nothing".into())
            )
            .into_bytes(),
            ok: false,
        }
    })
}

/// Writes an outcome's output; the process's exit status follows `ok`.
pub fn print(o: &Outcome) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(&o.stdout)?;
    out.flush()
}

/// `watch`: prints every change of `key` (or under it, with `prefix`) as
/// it is applied, one line each, until the stream ends; returns the
/// status it ended with (Ok only if the server ended it cleanly).
pub async fn watch(t: &Target, key: &str, prefix: bool, start_index: u64) -> Result<(), Status> {
    use crate::node::api::KV_WATCH;
    use crate::proto::kv::{watch_event, WatchEvent, WatchRequest};
    use prost::Message;
    let req = WatchRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        prefix,
        partition_id: t.partition,
        start_index,
    };
    let client = Client::connect(&t.addr).await?;
    let mut events = client
        .server_stream(KV_WATCH, Bytes::from(req.encode_to_vec()))
        .await?;
    let mut out = std::io::stdout();
    while let Some(m) = events.next().await {
        let e = WatchEvent::decode(m?)
            .map_err(|e| Status::internal(format!("undecodable WatchEvent: {e}")))?;
        let delete = e.r#type == watch_event::Type::Delete as i32;
        let line = if t.json {
            let mut v = serde_json::json!({
                "type": if delete { "DELETE" } else { "PUT" },
                "key": b64(&e.key),
                "index": e.index.to_string(),
                "partitionId": e.partition_id,
            });
            if !delete {
                v["value"] = b64(&e.value).into();
            }
            v.to_string()
        } else if delete {
            format!(
                "DELETE {} index {} partition {}",
                shown(&e.key),
                e.index,
                e.partition_id
            )
        } else {
            format!(
                "PUT {} {} index {} partition {}",
                shown(&e.key),
                shown(&e.value),
                e.index,
                e.partition_id
            )
        };
        // Each event goes out at once: a reader (or a pipe) sees it now.
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    }
    Ok(())
}

/// `watch --cluster`: prints the node's cluster events (leader and
/// membership changes, snapshots, partitions added and removed), one line
/// each, until the stream ends.
pub async fn watch_cluster(t: &Target) -> Result<(), Status> {
    use crate::node::api::ADMIN_WATCH;
    use crate::proto::admin::{cluster_event::Type, ClusterEvent, WatchClusterRequest};
    use prost::Message;
    let client = Client::connect(&t.addr).await?;
    let mut events = client
        .server_stream(
            ADMIN_WATCH,
            Bytes::from(WatchClusterRequest {}.encode_to_vec()),
        )
        .await?;
    let mut out = std::io::stdout();
    while let Some(m) = events.next().await {
        let e = ClusterEvent::decode(m?)
            .map_err(|e| Status::internal(format!("undecodable ClusterEvent: {e}")))?;
        let kind = Type::try_from(e.r#type).unwrap_or(Type::Unknown);
        let line = if t.json {
            serde_json::json!({
                "type": kind.as_str_name(),
                "partitionId": e.partition_id,
                "nodeId": e.node_id.to_string(),
                "term": e.term.to_string(),
                "index": e.index.to_string(),
                "voters": e.voters.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "unixMs": e.unix_ms.to_string(),
            })
            .to_string()
        } else {
            let p = e.partition_id;
            match kind {
                Type::LeaderChanged => {
                    format!(
                        "partition {p}: leader is node {} (term {})",
                        e.node_id, e.term
                    )
                }
                Type::MembershipChanged => {
                    format!(
                        "partition {p}: voters now {:?} (index {})",
                        e.voters, e.index
                    )
                }
                Type::SnapshotSent => format!(
                    "partition {p}: snapshot at index {} sent to node {}",
                    e.index, e.node_id
                ),
                Type::SnapshotInstalled => {
                    format!("partition {p}: snapshot at index {} installed", e.index)
                }
                Type::PartitionAdded => format!("partition {p}: replica added on this node"),
                Type::PartitionRemoved => format!("partition {p}: replica removed from this node"),
                Type::Unknown => format!("partition {p}: event {}", e.r#type),
            }
        };
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_as_text_or_base64() {
        assert_eq!(shown(b"v1"), "\"v1\"");
        assert_eq!(shown(&[0xff, 0x00]), "base64:/wA=");
    }
}

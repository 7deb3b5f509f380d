//! The clients: random calls on random nodes, each recorded with its
//! invocation and completion time and a classified outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tonic::transport::Channel;
use tonic::Code;

use super::{CALL_BACKSTOP, CALL_DEADLINE};
use crate::linearizability::{Call, Op, Ret};
use crate::pb::multiraft::kv::v1::kv_client::KvClient;
use crate::pb::multiraft::kv::v1::{CompareAndSwapRequest, DeleteRequest, GetRequest, PutRequest};
use crate::support::req;

/// One client: calls a random node about a random key until the round ends.
pub(super) struct Client {
    pub(super) id: u32,
    pub(super) channels: Vec<Channel>,
    pub(super) keys: Arc<Vec<(u32, Vec<u8>)>>,
    pub(super) origin: Instant,
    pub(super) stop_at: Instant,
    pub(super) rng: StdRng,
    /// While set, the client makes no calls (so that partitions go
    /// quiescent before the next fault).
    pub(super) hold: Arc<std::sync::atomic::AtomicBool>,
}

/// What one client did in a round.
#[derive(Default)]
pub(super) struct ClientLog {
    pub(super) history: Vec<Call>,
    /// The node each call went to, by (client, invoke_ns).
    pub(super) nodes: BTreeMap<(u32, u64), u64>,
    /// Why calls ended unknown or failed: status code or client-side cause.
    pub(super) unknown_by: BTreeMap<String, usize>,
    pub(super) failed_by: BTreeMap<String, usize>,
}

impl ClientLog {
    pub(super) fn merge(&mut self, other: ClientLog) {
        self.history.extend(other.history);
        self.nodes.extend(other.nodes);
        for (mine, theirs) in [
            (&mut self.unknown_by, other.unknown_by),
            (&mut self.failed_by, other.failed_by),
        ] {
            for (cause, n) in theirs {
                *mine.entry(cause).or_insert(0) += n;
            }
        }
    }
}

/// A call's result before it is recorded: the value, or the `Ret` an error
/// stands for and the cause to count.
type Answer<T> = Result<T, (Ret, String)>;

impl Client {
    pub(super) async fn run(mut self) -> ClientLog {
        let mut log = ClientLog::default();
        // The last value this client saw for each key: CAS expects it.
        let mut seen: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut seq = 0u64;
        while Instant::now() < self.stop_at {
            if self.hold.load(std::sync::atomic::Ordering::Relaxed) {
                // Pacing while held, not synchronisation: nothing waits on it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            seq += 1;
            let node = self.rng.gen_range(1..=self.channels.len() as u64);
            let mut kv = KvClient::new(self.channels[(node - 1) as usize].clone());
            let (partition_id, key) = self.keys.choose(&mut self.rng).unwrap().clone();
            // Unique, and naming the node that took the write (for reports).
            let value = format!("c{}-{seq}-n{}", self.id, node).into_bytes();
            let dice = self.rng.gen_range(0..100);
            let invoke_ns = self.now_ns();
            let (op, ret) = if dice < 30 {
                let r = answer(kv.put(req(
                    PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        partition_id,
                    },
                    CALL_DEADLINE,
                )))
                .await;
                if r.is_ok() {
                    seen.insert(key.clone(), Some(value.clone()));
                }
                let ret = r.map(|r| Ret::Put {
                    previous: r.previous,
                });
                (Op::Put(value), ret)
            } else if dice < 60 {
                let r = answer(kv.get(req(
                    GetRequest {
                        key: key.clone(),
                        partition_id,
                        serializable: false,
                    },
                    CALL_DEADLINE,
                )))
                .await
                .map(|r| r.found.then_some(r.value));
                if let Ok(v) = &r {
                    seen.insert(key.clone(), v.clone());
                }
                (Op::Get, r.map(|value| Ret::Get { value }))
            } else if dice < 85 {
                // Mostly the value last seen, so that some swaps succeed.
                let expected = if self.rng.gen_bool(0.8) {
                    seen.get(&key).cloned().flatten()
                } else {
                    None
                };
                let r = answer(kv.compare_and_swap(req(
                    CompareAndSwapRequest {
                        key: key.clone(),
                        expected: expected.clone(),
                        value: value.clone(),
                        partition_id,
                    },
                    CALL_DEADLINE,
                )))
                .await;
                if let Ok(r) = &r {
                    let now = if r.succeeded {
                        Some(value.clone())
                    } else {
                        r.current.clone()
                    };
                    seen.insert(key.clone(), now);
                }
                let ret = r.map(|r| Ret::Cas {
                    succeeded: r.succeeded,
                    current: r.current,
                });
                (Op::Cas { expected, value }, ret)
            } else {
                let r = answer(kv.delete(req(
                    DeleteRequest {
                        key: key.clone(),
                        partition_id,
                    },
                    CALL_DEADLINE,
                )))
                .await;
                if r.is_ok() {
                    seen.insert(key.clone(), None);
                }
                let ret = r.map(|r| Ret::Delete {
                    previous: r.previous,
                });
                (Op::Delete, ret)
            };
            let return_ns = self.now_ns();
            let ret = ret.unwrap_or_else(|(ret, cause)| {
                let causes = match ret {
                    Ret::Unknown => &mut log.unknown_by,
                    _ => &mut log.failed_by,
                };
                *causes.entry(cause).or_insert(0) += 1;
                ret
            });
            log.nodes.insert((self.id, invoke_ns), node);
            log.history.push(Call {
                client: self.id,
                key,
                op,
                ret,
                invoke_ns,
                return_ns,
            });
        }
        log
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// Awaits a call within [`CALL_BACKSTOP`] and classifies a failure: codes
/// that say the call was refused before it could take effect are `Failed`;
/// everything else (timeouts, UNAVAILABLE, broken connections, codes that
/// make no such promise) is `Unknown`, since the call may have taken effect.
async fn answer<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Answer<T> {
    match tokio::time::timeout(CALL_BACKSTOP, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::Unimplemented => (Ret::Failed, format!("{:?}", status.code())),
            // The server's own RESOURCE_EXHAUSTED (too many writes in
            // flight) refuses the call; tonic also reports an HTTP/2
            // GOAWAY(ENHANCE_YOUR_CALM) that way, for calls the server may
            // already have carried out.
            Code::ResourceExhausted if status.message().contains("writes in flight") => {
                (Ret::Failed, "ResourceExhausted".to_string())
            }
            code => (Ret::Unknown, format!("{code:?}")),
        }),
        Err(_) => Err((Ret::Unknown, "client timeout".to_string())),
    }
}

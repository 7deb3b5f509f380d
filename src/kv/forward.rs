//! Forwarding a call to the members of a partition this node does not host.
//!
//! The policy, separate from the transport so it can be tested alone:
//! - try the member that answered last first (usually the leader's node or
//!   one close to it), then the others in id order, round and round;
//! - each attempt gets at most `attempt_timeout` (about an election timeout:
//!   long enough for a healthy member to commit, short enough to leave time
//!   for the others when one is cut off or paused);
//! - a member that answers with an error that says nothing was done there
//!   (not hosted, overloaded, not bootstrapped) or that may have done it
//!   (unavailable, timed out) is followed by the next one at once; after a
//!   whole round of errors the next round waits a little (backoff);
//! - the first success, or an error about the request itself, is the answer;
//! - at the deadline: DEADLINE_EXCEEDED, saying whether the write may still
//!   be applied.
//!
//! Why retrying a write at another member cannot apply it twice: the caller
//! gives the write its identity once (`kv::command::WriteId`) and every
//! attempt carries that same identity, so however many members propose it,
//! the state machine runs it once and answers every later copy with the
//! first result (`kv::session`). Reads have no effect and are retried
//! freely.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::grpc::{Code, Status};

/// One attempt at one member, bounded by a timeout.
pub trait Attempt {
    fn attempt(
        &self,
        member: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, Status>>;
}

/// What a forwarded call needs to know.
pub struct Plan {
    pub partition: u32,
    /// The partition's members, any order.
    pub members: Vec<u64>,
    /// The member that answered last, tried first.
    pub prefer: Option<u64>,
    pub deadline: Instant,
    pub attempt_timeout: Duration,
    /// A write (whose outcome may be unknown) rather than a read.
    pub is_write: bool,
}

/// The answer and the member that gave it (on success).
pub type Answer = (Result<Bytes, Status>, Option<u64>);

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How an error from one member bears on the call.
enum Kind {
    /// About the request itself: every member would say the same.
    Final,
    /// Nothing was done there: try another member.
    NotDone,
    /// It may have been done there (or may still be): try another member;
    /// a write's outcome is unknown from now on.
    Unknown,
}

fn kind(code: Code) -> Kind {
    match code {
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => Kind::Final,
        Code::NotFound | Code::FailedPrecondition | Code::ResourceExhausted | Code::Aborted => {
            Kind::NotDone
        }
        _ => Kind::Unknown,
    }
}

/// Runs `plan` with `via`; see the module docs.
pub async fn forward(via: &impl Attempt, plan: Plan) -> Answer {
    let mut order = plan.members.clone();
    order.sort_unstable();
    order.dedup();
    if let Some(p) = plan.prefer.filter(|p| order.contains(p)) {
        order.retain(|&m| m != p);
        order.insert(0, p);
    }
    let p = plan.partition;
    if order.is_empty() {
        return (
            Err(Status::unavailable(format!(
                "partition {p} has no known members"
            ))),
            None,
        );
    }
    let mut maybe_done = false;
    let mut last: Option<(u64, Status)> = None;
    let mut backoff = BACKOFF_MIN;
    'rounds: loop {
        for &m in &order {
            let left = plan.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break 'rounds;
            }
            let result = via.attempt(m, left.min(plan.attempt_timeout)).await;
            let status = match result {
                Ok(body) => return (Ok(body), Some(m)),
                Err(s) => s,
            };
            match kind(status.code) {
                Kind::Final => return (Err(status), None),
                // Load shedding is the answer when nothing can have been
                // done anywhere; after an unknown attempt, keep trying so
                // the caller learns the outcome.
                Kind::NotDone if status.code == Code::ResourceExhausted && !maybe_done => {
                    return (Err(status), None)
                }
                Kind::NotDone => {}
                Kind::Unknown => maybe_done = true,
            }
            last = Some((m, status));
        }
        let left = plan.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        glommio::timer::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    let last = last.map_or_else(String::new, |(m, s)| {
        format!(
            "; last answer, from node {m}: {} {}",
            s.code.name(),
            s.message
        )
    });
    let status = if plan.is_write && maybe_done {
        Status::deadline_exceeded(format!(
            "partition {p}: no member confirmed the write before the deadline; \
             it may still be applied (at most once){last}"
        ))
    } else if plan.is_write {
        Status::deadline_exceeded(format!(
            "partition {p}: no member took the write before the deadline; it was not applied{last}"
        ))
    } else {
        Status::deadline_exceeded(format!(
            "partition {p}: no member answered the read before the deadline{last}"
        ))
    };
    (Err(status), None)
}

#[cfg(test)]
mod tests {
    //! The forwarder against a simulated partition: a shared log applied by
    //! a real `KvStore` (sessions included), with members that can be
    //! silent, cut off from the leader, or lose their answers.

    use std::cell::RefCell;
    use std::collections::HashMap;

    use prost::Message;

    use super::*;
    use crate::kv::command::{Command, Op, SessionId, WriteId};
    use crate::kv::{Applied, KvStore, Outcome};
    use crate::proto::kv::PutResponse;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Member {
        /// Commits and answers.
        Healthy,
        /// Never answers (paused, or unreachable).
        Silent,
        /// An old leader cut off from the others: accepts the proposal into
        /// its own log (which may be committed later) and never answers.
        CutOffLeader,
        /// Commits, but its answer is lost on the way back.
        LosesAnswer,
    }

    struct Sim {
        members: HashMap<u64, Member>,
        /// Committed log of the partition, applied in order.
        kv: RefCell<KvStore>,
        next_index: RefCell<u64>,
        /// Proposals held by a cut-off leader, committed when it heals.
        stranded: RefCell<Vec<Command>>,
        calls: RefCell<Vec<u64>>,
        cmd: Command,
    }

    impl Sim {
        fn new(members: &[(u64, Member)], cmd: Command) -> Sim {
            Sim {
                members: members.iter().copied().collect(),
                kv: RefCell::new(KvStore::default()),
                next_index: RefCell::new(1),
                stranded: RefCell::new(Vec::new()),
                calls: RefCell::new(Vec::new()),
                cmd,
            }
        }

        /// Appends `cmd` to the log and applies it; `None` when the state
        /// machine refused it.
        fn commit(&self, cmd: Command) -> Option<(Applied, u64)> {
            let index = {
                let mut i = self.next_index.borrow_mut();
                *i += 1;
                *i - 1
            };
            match self.kv.borrow_mut().apply(cmd, index) {
                Outcome::Applied(a) => Some((a, index)),
                Outcome::Duplicate { applied, index } => Some((applied, index)),
                Outcome::Refused(_) => None,
            }
        }

        fn heal(&self) -> Vec<Option<(Applied, u64)>> {
            let stranded = std::mem::take(&mut *self.stranded.borrow_mut());
            stranded.into_iter().map(|c| self.commit(c)).collect()
        }
    }

    impl Attempt for Sim {
        async fn attempt(&self, member: u64, timeout: Duration) -> Result<Bytes, Status> {
            self.calls.borrow_mut().push(member);
            let behaviour = self.members[&member];
            let silent = || async {
                glommio::timer::sleep(timeout).await;
                Err(Status::unavailable(format!("node {member} did not answer")))
            };
            match behaviour {
                Member::Healthy => {
                    let Some((applied, index)) = self.commit(self.cmd.clone()) else {
                        return Err(Status::aborted("refused"));
                    };
                    let previous = match applied {
                        Applied::Put { previous } => previous,
                        _ => None,
                    };
                    Ok(PutResponse {
                        previous,
                        index,
                        partition_id: 1,
                    }
                    .encode_to_vec()
                    .into())
                }
                Member::Silent => silent().await,
                Member::CutOffLeader => {
                    self.stranded.borrow_mut().push(self.cmd.clone());
                    silent().await
                }
                Member::LosesAnswer => {
                    self.commit(self.cmd.clone());
                    silent().await
                }
            }
        }
    }

    fn put(seq: u64, value: &'static str) -> Command {
        Command {
            id: WriteId {
                session: SessionId::new(4, 1, 0),
                seq,
            },
            acked: seq - 1,
            key: Bytes::from_static(b"k"),
            op: Op::Put {
                value: Bytes::from_static(value.as_bytes()),
            },
        }
    }

    /// A write by another client.
    fn other(value: &'static str) -> Command {
        Command {
            id: WriteId {
                session: SessionId::new(5, 1, 0),
                seq: 1,
            },
            acked: 0,
            key: Bytes::from_static(b"k"),
            op: Op::Put {
                value: Bytes::from_static(value.as_bytes()),
            },
        }
    }

    fn plan(prefer: Option<u64>, within: Duration) -> Plan {
        Plan {
            partition: 1,
            members: vec![3, 1, 2],
            prefer,
            deadline: Instant::now() + within,
            attempt_timeout: Duration::from_millis(30),
            is_write: true,
        }
    }

    fn run<Fut: Future<Output = ()> + 'static>(f: impl FnOnce() -> Fut + Send + 'static) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    fn answer(a: &Answer) -> PutResponse {
        match &a.0 {
            Ok(b) => PutResponse::decode(&b[..]).unwrap(),
            Err(s) => panic!("forward failed: {s:?}"),
        }
    }

    #[test]
    fn first_member_silent_fails_over() {
        run(|| async {
            let sim = Sim::new(
                &[
                    (1, Member::Silent),
                    (2, Member::Healthy),
                    (3, Member::Healthy),
                ],
                put(1, "x"),
            );
            let a = forward(&sim, plan(None, Duration::from_secs(5))).await;
            assert_eq!(answer(&a).index, 1);
            assert_eq!(a.1, Some(2));
            assert_eq!(*sim.calls.borrow(), vec![1, 2]);
            // The member that answered is tried first next time.
            let sim2 = Sim::new(
                &[
                    (1, Member::Silent),
                    (2, Member::Healthy),
                    (3, Member::Healthy),
                ],
                put(2, "y"),
            );
            let again = forward(&sim2, plan(a.1, Duration::from_secs(5))).await;
            assert!(again.0.is_ok());
            assert_eq!(*sim2.calls.borrow(), vec![2]);
        });
    }

    #[test]
    fn leader_cut_off_applies_once() {
        run(|| async {
            let sim = Sim::new(
                &[
                    (1, Member::CutOffLeader),
                    (2, Member::Healthy),
                    (3, Member::Healthy),
                ],
                put(1, "x"),
            );
            // An earlier value, so a second application would show.
            sim.commit(other("old"));
            let a = forward(&sim, plan(None, Duration::from_secs(5))).await;
            let r = answer(&a);
            assert_eq!(r.previous.as_deref(), Some(&b"old"[..]));
            assert_eq!(a.1, Some(2));
            // Someone writes y; then the partition heals and the cut-off
            // leader's copy of x reaches the log.
            let mut y = other("y");
            y.id.seq = 2;
            y.acked = 1;
            sim.commit(y);
            let late = sim.heal();
            assert_eq!(late.len(), 1);
            let (_, index) = late[0].clone().expect("a duplicate, not a refusal");
            assert_eq!(index, r.index, "the late copy answers as the first");
            assert_eq!(
                sim.kv.borrow().get(b"k").map(|v| &v[..]),
                Some(&b"y"[..]),
                "x was applied a second time over y"
            );
            // Once x's proposer has finished with it (a later write of the
            // same session says so), a copy is refused outright.
            sim.commit(put(2, "z"));
            sim.stranded.borrow_mut().push(put(1, "x"));
            assert_eq!(sim.heal(), vec![None]);
            assert_eq!(sim.kv.borrow().get(b"k").map(|v| &v[..]), Some(&b"z"[..]));
        });
    }

    #[test]
    fn answer_lost_is_answered_by_the_retry_with_the_first_result() {
        run(|| async {
            let sim = Sim::new(
                &[
                    (1, Member::LosesAnswer),
                    (2, Member::Healthy),
                    (3, Member::Healthy),
                ],
                put(1, "x"),
            );
            sim.commit(other("old"));
            let a = forward(&sim, plan(None, Duration::from_secs(5))).await;
            let r = answer(&a);
            // The retry at node 2 did not write x again: it reports the
            // first application (index 2, previous "old").
            assert_eq!(r.index, 2);
            assert_eq!(r.previous.as_deref(), Some(&b"old"[..]));
            assert_eq!(
                *sim.next_index.borrow(),
                4,
                "two copies of x reached the log"
            );
        });
    }

    #[test]
    fn deadline_with_no_answer_says_the_write_may_still_apply() {
        run(|| async {
            let sim = Sim::new(
                &[
                    (1, Member::CutOffLeader),
                    (2, Member::Silent),
                    (3, Member::Silent),
                ],
                put(1, "x"),
            );
            let a = forward(&sim, plan(None, Duration::from_millis(200))).await;
            let s = a.0.unwrap_err();
            assert_eq!(s.code, Code::DeadlineExceeded, "{s:?}");
            assert!(s.message.contains("may still be applied"), "{s:?}");
            // Every member was tried, more than once.
            let calls = sim.calls.borrow();
            for m in 1..=3 {
                assert!(calls.contains(&m), "{calls:?}");
            }
        });
    }

    #[test]
    fn request_errors_are_final_and_overload_is_passed_on() {
        struct Fixed(Code);
        impl Attempt for Fixed {
            async fn attempt(&self, _: u64, _: Duration) -> Result<Bytes, Status> {
                Err(Status::new(self.0, "no"))
            }
        }
        run(|| async {
            for code in [Code::InvalidArgument, Code::ResourceExhausted] {
                let a = forward(&Fixed(code), plan(None, Duration::from_secs(5))).await;
                assert_eq!(a.0.unwrap_err().code, code);
            }
            let a = forward(
                &Fixed(Code::NotFound),
                plan(None, Duration::from_millis(100)),
            )
            .await;
            let s = a.0.unwrap_err();
            assert_eq!(s.code, Code::DeadlineExceeded);
            assert!(s.message.contains("was not applied"), "{s:?}");
        });
    }
}

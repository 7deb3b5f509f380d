//! Commit notices: how followers learn a new commit index.
//!
//! raft-rs broadcasts an empty append to every follower each time the
//! leader's commit index moves. With many partitions each carrying a little
//! load, that doubles the messages of every write (and their answers). A
//! group runs with `skip_bcast_commit` instead, and the shard asks each
//! leader it visits for notices: per follower, the commit index raft-rs
//! would put in a heartbeat to it, when that moved past the last notice.
//! The shard sends them coalesced per peer node (`shard::beats`), as
//! heartbeats. Membership changes still broadcast (raft-rs does while one
//! is pending).
//!
//! Why a notice cannot commit anything wrong: it is a raft heartbeat in the
//! leader's current term, and its index is `min(matched, committed)`, as in
//! raft-rs's own heartbeats: the follower acknowledged having the leader's
//! log up to `matched` (durably: it answers appends only after its WAL
//! sync), so every entry the notice commits there is the leader's
//! committed entry. A follower of a later term ignores it.

use raft::StateRole;

use super::{Group, StateMachine};

impl<S: StateMachine> Group<S> {
    /// The commit notices this group owes its followers, as `(to, term,
    /// commit)`. Cheap when there are none: followers and leaders whose
    /// commit index did not move return at once.
    pub fn commit_notices(&mut self, mut notice: impl FnMut(u64, u64, u64)) {
        let r = &self.raw.raft;
        let committed = r.raft_log.committed;
        if r.state != StateRole::Leader || committed == self.noticed {
            return;
        }
        // The lowest notice sent this round: followers behind it get
        // another when their next acknowledgement moves it.
        let mut lowest = committed;
        for (id, p) in r.prs().iter() {
            if *id == r.id {
                continue;
            }
            let commit = p.matched.min(committed);
            let sent = self.notified.iter_mut().find(|(n, _)| *n == *id);
            match sent {
                Some((_, c)) if *c >= commit => {}
                Some((_, c)) => {
                    *c = commit;
                    notice(*id, r.term, commit);
                }
                None if commit == 0 => {}
                None => {
                    self.notified.push((*id, commit));
                    notice(*id, r.term, commit);
                }
            }
            lowest = lowest.min(commit);
        }
        self.noticed = lowest;
    }
}

//! Commit notices: how a follower that waits learns a new commit index.
//!
//! raft-rs broadcasts an empty append to every follower each time the
//! leader's commit index moves. With many partitions each carrying a little
//! load, that doubles the messages of every write (and their answers). A
//! group runs with `skip_bcast_commit` instead. Most followers need no
//! prompt word of a commit: nobody waits on their apply, and the commit
//! index reaches them with the leader's next append, or with the next
//! tick's heartbeat when no append went out since the last one
//! (`quiet::prune_heartbeats`), so within two ticks. A follower that
//! forwarded a write or a ReadIndex request does wait: its caller is
//! answered once it applies. The leader notes it when it steps the
//! forwarded message, and the shard asks each leader it visits for the
//! notices owed: to each such follower, the commit index raft-rs would put
//! in a heartbeat to it, when that moved past the last notice, until it
//! reaches what the follower waits for. The shard sends them coalesced per
//! peer node (`shard::beats`), as heartbeats. Membership changes still
//! broadcast (raft-rs does while one is pending).
//!
//! Why a notice cannot commit anything wrong: it is a raft heartbeat in the
//! leader's current term, and its index is `min(matched, committed)`, as in
//! raft-rs's own heartbeats: the follower acknowledged having the leader's
//! log up to `matched` (durably: it answers appends only after its WAL
//! sync), so every entry the notice commits there is the leader's
//! committed entry. A follower of a later term ignores it. Sending fewer
//! notices changes only when a follower applies, never what: a write is
//! acknowledged by the replica that applied it, and linearizable reads
//! wait for their ReadIndex on whichever replica serves them.

use raft::eraftpb::{Message, MessageType};
use raft::StateRole;

use super::{Group, StateMachine};

impl<S: StateMachine> Group<S> {
    /// The follower `msg` comes from if the leader must tell it promptly
    /// of the commits that follow: a follower that forwards a proposal or
    /// a ReadIndex request waits for its own apply to answer its caller.
    pub(super) fn waiting_follower(&self, msg: &Message) -> Option<u64> {
        let r = &self.raw.raft;
        let forwarded = matches!(
            msg.get_msg_type(),
            MessageType::MsgPropose | MessageType::MsgReadIndex
        );
        (forwarded && msg.from != r.id && r.state == StateRole::Leader).then_some(msg.from)
    }

    /// After stepping a message of [`Group::waiting_follower`] `id`: it is
    /// owed notices until the commit index it hears reaches the end of the
    /// log as it is now (which holds the forwarded entries, or the read's
    /// index).
    pub(super) fn owe_notices(&mut self, id: u64) {
        let last = self.raw.raft.raft_log.last_index();
        match self.notice_wanted.iter_mut().find(|(n, _)| *n == id) {
            Some((_, w)) => *w = (*w).max(last),
            None => self.notice_wanted.push((id, last)),
        }
    }

    /// The commit notices this group owes its followers, as `(to, term,
    /// commit)`: to each follower waiting for an index (see
    /// [`Group::owe_notices`]), the commit index raft-rs would
    /// put in a heartbeat to it, when that moved past what it was last
    /// told. Followers waiting for nothing are not told: they learn the
    /// commit index from the next append, or from the heartbeat of the
    /// next tick without one. Cheap when nobody waits.
    pub fn commit_notices(&mut self, mut notice: impl FnMut(u64, u64, u64)) {
        if self.notice_wanted.is_empty() {
            return;
        }
        let r = &self.raw.raft;
        if r.state != StateRole::Leader {
            // Whoever leads now owes the notices.
            self.notice_wanted.clear();
            return;
        }
        let committed = r.raft_log.committed;
        let told = &mut self.notified;
        self.notice_wanted.retain(|&(id, wanted)| {
            let Some(p) = r.prs().get(id) else {
                return false;
            };
            let commit = p.matched.min(committed);
            let sent = match told.iter_mut().find(|(n, _)| *n == id) {
                Some((_, c)) => c,
                None => {
                    told.push((id, 0));
                    &mut told.last_mut().expect("just pushed").1
                }
            };
            if commit > *sent {
                *sent = commit;
                notice(id, r.term, commit);
            }
            commit < wanted
        });
    }
}

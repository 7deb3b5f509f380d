//! Raft messages from peers, checked before raft-rs sees them: only
//! members take part, and messages raft-rs is known to panic on are refused.

use raft::eraftpb::Message;

use super::Group;

impl<S: super::StateMachine> Group<S> {
    /// Steps a message that arrived on the peer connection of node `from`.
    /// Only members take part: a message is dropped (and logged with its
    /// sender) unless it comes from the node it names as sender, is
    /// addressed to this node, and that sender is a voter or learner of the
    /// group here. A replica that has no configuration yet (joining, before
    /// its first snapshot) hears from anyone who names it: its leader is
    /// not yet known to it.
    pub fn step_from(&mut self, from: u64, msg: Message) {
        let me = self.raw.raft.id;
        // One lookup for a member; the emptiness test (a replica with no
        // configuration yet) only for a sender that is not one.
        let stranger = || {
            let prs = self.raw.raft.prs();
            prs.get(msg.from).is_none() && prs.iter().next().is_some()
        };
        let reason = if msg.from != from {
            Some("it names another sender than its connection's node")
        } else if msg.to != me {
            Some("it is addressed to another node")
        } else if stranger() {
            Some("its sender is not a member of the partition here")
        } else {
            None
        };
        match reason {
            Some(reason) => self.refuse(from, &msg, reason),
            None => self.step(msg),
        }
    }

    pub fn step(&mut self, mut msg: Message) {
        if let Some(reason) = self.would_panic(&msg) {
            self.refuse(msg.from, &msg, &reason);
            return;
        }
        self.quiet_on_message(&mut msg);
        let waiting = self.waiting_follower(&msg);
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(partition = self.id, "step: {e}");
        }
        if let Some(follower) = waiting {
            self.owe_notices(follower);
        }
    }

    /// Counts a refused message and logs it, at most once per second and
    /// group: a flood of bad messages must not become a flood of log lines.
    fn refuse(&mut self, from: u64, msg: &Message, reason: &str) {
        self.dropped_msgs += 1;
        let now = std::time::Instant::now();
        if self
            .drop_logged
            .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
        {
            self.drop_logged = Some(now);
            tracing::warn!(
                partition = self.id,
                connection_from = from,
                msg_from = msg.from,
                msg_to = msg.to,
                kind = ?msg.get_msg_type(),
                dropped_so_far = self.dropped_msgs,
                "dropped a raft message: {reason}"
            );
        }
    }

    /// raft-rs trusts its peers and panics on some messages no correct peer
    /// sends; those are refused here. (Should one still slip through, the
    /// panic stops the whole node: see `main.rs`.)
    fn would_panic(&self, msg: &Message) -> Option<String> {
        use raft::eraftpb::MessageType;
        // Only where needed: the log's end is a cache miss per message
        // when thousands of groups take turns.
        let last = || self.raw.raft.raft_log.last_index();
        match msg.get_msg_type() {
            // A leader's append carries the entries that follow `index`, in
            // order, none from a later term than its own. raft-rs assumes
            // so: an entry numbered below `index` would be checked against
            // the committed log and, differing, end in a panic.
            MessageType::MsgAppend => {
                let misplaced = msg
                    .entries
                    .iter()
                    .enumerate()
                    .find(|(i, e)| e.index != msg.index + 1 + *i as u64 || e.term > msg.term);
                misplaced.map(|(i, e)| {
                    format!(
                        "an append after index {} (term {}) whose entry {i} is index {} of term {}",
                        msg.index, msg.term, e.index, e.term
                    )
                })
            }
            // A leader commits at most what this follower acknowledged,
            // which it had synced.
            MessageType::MsgHeartbeat if msg.commit > last() => Some(format!(
                "a heartbeat that commits index {} past the end of the log ({})",
                msg.commit,
                last()
            )),
            // Followers forward proposals with their entries.
            MessageType::MsgPropose if msg.entries.is_empty() => {
                Some("a proposal with no entries".into())
            }
            MessageType::MsgSnapshot
                if msg
                    .get_snapshot()
                    .get_metadata()
                    .get_conf_state()
                    .voters
                    .is_empty() =>
            {
                Some("a snapshot whose configuration has no voters".into())
            }
            MessageType::MsgSnapshot => {
                conf_state_conflict(msg.get_snapshot().get_metadata().get_conf_state())
                    .map(|why| format!("a snapshot whose configuration {why}"))
            }
            _ => None,
        }
    }
}

/// Why raft-rs could not restore `cs` (it panics on such a configuration),
/// if it could not: a node is a voter and a learner at once, or a learner
/// to be is not an outgoing voter.
fn conf_state_conflict(cs: &raft::eraftpb::ConfState) -> Option<String> {
    let voter = |n: &u64| cs.voters.contains(n) || cs.voters_outgoing.contains(n);
    if let Some(n) = cs.learners.iter().find(|n| voter(n)) {
        return Some(format!("makes node {n} both voter and learner"));
    }
    if let Some(n) = cs
        .learners_next
        .iter()
        .find(|n| !cs.voters_outgoing.contains(n) || cs.voters.contains(n))
    {
        return Some(format!(
            "demotes node {n} to learner without it being an outgoing voter only"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::conf_state_conflict;
    use raft::eraftpb::ConfState;

    fn cs(voters: &[u64], learners: &[u64], outgoing: &[u64], next: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            voters_outgoing: outgoing.to_vec(),
            learners_next: next.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn configurations_raft_rs_cannot_restore_are_named() {
        assert_eq!(conf_state_conflict(&cs(&[1, 2, 3], &[4], &[], &[])), None);
        // Joint: 3 is being demoted to a learner.
        assert_eq!(
            conf_state_conflict(&cs(&[1, 2], &[], &[1, 2, 3], &[3])),
            None
        );
        for bad in [
            cs(&[1, 2, 3], &[3], &[], &[]),
            cs(&[1, 2], &[3], &[1, 2, 3], &[]),
            cs(&[1, 2, 3], &[], &[], &[4]),
            cs(&[1, 2, 3], &[], &[1, 2, 3], &[3]),
        ] {
            assert!(conf_state_conflict(&bad).is_some(), "{bad:?}");
        }
    }
}

//! Raft messages from peers, checked before raft-rs sees them: only
//! members take part, and messages raft-rs is known to panic on are refused.

use raft::eraftpb::Message;

use super::Group;

impl Group {
    /// Steps a message that arrived on the peer connection of node `from`.
    /// Only members take part: a message is dropped (and logged with its
    /// sender) unless it comes from the node it names as sender, is
    /// addressed to this node, and that sender is a voter or learner of the
    /// group here. A replica that has no configuration yet (joining, before
    /// its first snapshot) hears from anyone who names it: its leader is
    /// not yet known to it.
    pub fn step_from(&mut self, from: u64, msg: Message) {
        let me = self.raw.raft.id;
        let known = self.raw.raft.prs().iter().next().is_some();
        let reason = if msg.from != from {
            Some("it names another sender than its connection's node")
        } else if msg.to != me {
            Some("it is addressed to another node")
        } else if known && self.raw.raft.prs().get(msg.from).is_none() {
            Some("its sender is not a member of the partition here")
        } else {
            None
        };
        match reason {
            Some(reason) => self.refuse(from, &msg, reason),
            None => self.step(msg),
        }
    }

    pub fn step(&mut self, msg: Message) {
        if let Some(reason) = self.would_panic(&msg) {
            self.refuse(msg.from, &msg, &reason);
            return;
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(partition = self.id, "step: {e}");
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
    /// sends; those are refused here. (Others, e.g. an append that rewrites
    /// committed entries, still reach a panic, which stops the node.)
    fn would_panic(&self, msg: &Message) -> Option<String> {
        use raft::eraftpb::MessageType;
        let last = self.raw.raft.raft_log.last_index();
        match msg.get_msg_type() {
            // A leader commits at most what this follower acknowledged,
            // which it had synced.
            MessageType::MsgHeartbeat if msg.commit > last => Some(format!(
                "a heartbeat that commits index {} past the end of the log ({last})",
                msg.commit
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
            _ => None,
        }
    }
}

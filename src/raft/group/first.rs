//! The first election of a group fresh from Bootstrap.

use super::{Group, StateMachine, INIT_INDEX};

impl<S: StateMachine> Group<S> {
    /// In a group fresh from Bootstrap (still at the initial term and log,
    /// no election yet), the voter picked by the partition number campaigns
    /// at once instead of after an election timeout: Bootstrap returns when
    /// every partition has a leader, and the first leaders come out spread
    /// evenly over the nodes. True if this replica campaigned.
    ///
    /// Campaigning early is an election timeout firing early, nothing more:
    /// raft's vote rules decide as ever (with pre-vote), and a campaign
    /// that reaches members not created yet is retried by the usual timeout.
    pub fn campaign_if_first(&mut self) -> bool {
        let r = &self.raw.raft;
        if r.term != INIT_INDEX || r.raft_log.last_index() != INIT_INDEX {
            return false;
        }
        let voters = self.voters();
        if voters.is_empty() || voters[self.id as usize % voters.len()] != r.id {
            return false;
        }
        self.raw.campaign().is_ok()
    }
}

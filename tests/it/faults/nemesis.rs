//! The nemeses: each injects one kind of fault (network cuts, kill -9,
//! SIGSTOP) and knows how to heal it. Leaders are found with Admin/Status.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::cluster::FaultCluster;
use super::{FORWARDER, MEMBERS, NODES};
use crate::support::Node;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Nemesis {
    IsolateNode,
    IsolateLeader,
    IsolateLeaderFromMembers,
    MinorityMajority,
    Bridge,
    KillLeader,
    PauseLeader,
}

impl Nemesis {
    pub(super) const ALL: [Nemesis; 7] = [
        Nemesis::IsolateNode,
        Nemesis::IsolateLeader,
        Nemesis::IsolateLeaderFromMembers,
        Nemesis::MinorityMajority,
        Nemesis::Bridge,
        Nemesis::KillLeader,
        Nemesis::PauseLeader,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Nemesis::IsolateNode => "isolate-node",
            Nemesis::IsolateLeader => "isolate-leader",
            Nemesis::IsolateLeaderFromMembers => "isolate-leader-from-members",
            Nemesis::MinorityMajority => "minority-majority",
            Nemesis::Bridge => "bridge",
            Nemesis::KillLeader => "kill-leader",
            Nemesis::PauseLeader => "pause-leader",
        }
    }

    /// Applies one fault of this kind.
    pub(super) async fn inject(self, fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
        match self {
            Nemesis::IsolateNode => isolate_node(fc, rng),
            Nemesis::IsolateLeader => isolate_leader(fc, rng).await,
            Nemesis::IsolateLeaderFromMembers => isolate_leader_from_members(fc, rng).await,
            Nemesis::MinorityMajority => minority_majority(fc, rng),
            Nemesis::Bridge => bridge(fc, rng),
            Nemesis::KillLeader => kill_leader(fc, rng).await,
            Nemesis::PauseLeader => pause_leader(fc, rng).await,
        }
    }
}

/// An injected fault: what it was, and what healing it takes.
pub(super) struct Fault {
    pub(super) what: String,
    undo: Undo,
}

enum Undo {
    /// Remove every network cut.
    Network,
    /// Start the killed node again on its data dir.
    Restart(u64),
    /// SIGCONT the stopped node.
    Resume(u64),
}

impl Fault {
    pub(super) async fn heal(self, fc: &mut FaultCluster) {
        match self.undo {
            Undo::Network => fc.net.heal_all(),
            Undo::Restart(id) => fc.cluster.node_mut(id).restart().await,
            Undo::Resume(id) => signal(fc.cluster.node(id), libc::SIGCONT),
        }
    }
}

fn others(of: &[u64], among: &[u64]) -> Vec<u64> {
    among
        .iter()
        .copied()
        .filter(|id| !of.contains(id))
        .collect()
}

/// One node, any of the four, cut from all its peers.
fn isolate_node(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let id = *NODES.choose(rng).unwrap();
    fc.net.isolate(&[id], &others(&[id], &NODES));
    Fault {
        what: format!("isolate node {id} from all peers [{}]", fc.net.describe()),
        undo: Undo::Network,
    }
}

/// A partition's leader cut from every other node, the forwarder included.
async fn isolate_leader(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let (id, who) = fc.pick_leader(rng).await;
    fc.net.isolate(&[id], &others(&[id], &NODES));
    Fault {
        what: format!("isolate {who} from all peers [{}]", fc.net.describe()),
        undo: Undo::Network,
    }
}

/// A partition's leader cut from the other members only: the forwarder
/// still reaches it and can hand it writes it can no longer commit.
async fn isolate_leader_from_members(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let (id, who) = fc.pick_leader(rng).await;
    fc.net.isolate(&[id], &others(&[id], &MEMBERS));
    Fault {
        what: format!(
            "isolate {who} from the other members, forwarder connected [{}]",
            fc.net.describe()
        ),
        undo: Undo::Network,
    }
}

/// One member, alone or together with the forwarder, against the other two.
fn minority_majority(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let lone = *MEMBERS.choose(rng).unwrap();
    let mut minority = vec![lone];
    if rng.gen_bool(0.5) {
        minority.push(FORWARDER);
    }
    let majority = others(&minority, &NODES);
    fc.net.isolate(&minority, &majority);
    Fault {
        what: format!(
            "split minority {minority:?} from majority {majority:?} [{}]",
            fc.net.describe()
        ),
        undo: Undo::Network,
    }
}

/// Members a–b and b–c connected, a–c cut (b bridges); the forwarder
/// reaches all three.
fn bridge(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let mut m = MEMBERS;
    m.shuffle(rng);
    let [a, b, c] = m;
    fc.net.cut(a, c);
    Fault {
        what: format!(
            "bridge: node {b} connects {a} and {c}, which are cut from each other [{}]",
            fc.net.describe()
        ),
        undo: Undo::Network,
    }
}

/// kill -9 of a leader; the heal restarts it on the same data dir.
async fn kill_leader(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let (id, who) = fc.pick_leader(rng).await;
    fc.cluster.node_mut(id).kill9();
    Fault {
        what: format!("kill -9 {who}"),
        undo: Undo::Restart(id),
    }
}

/// SIGSTOP of a leader; the heal sends SIGCONT.
async fn pause_leader(fc: &mut FaultCluster, rng: &mut StdRng) -> Fault {
    let (id, who) = fc.pick_leader(rng).await;
    signal(fc.cluster.node(id), libc::SIGSTOP);
    Fault {
        what: format!("SIGSTOP {who}"),
        undo: Undo::Resume(id),
    }
}

fn signal(node: &Node, sig: libc::c_int) {
    let pid = node.pid() as libc::pid_t;
    // SAFETY: plain syscall on the pid of a child we spawned and have not
    // reaped (`Node` keeps its `Child` until it waits for it).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) node {}: {}",
        node.id,
        std::io::Error::last_os_error()
    );
}

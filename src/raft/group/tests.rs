//! Unit tests of a group on its own, with a counting state machine.

use super::*;

/// A state machine that only counts: these tests are about the group.
#[derive(Default)]
struct Counter(u64);

impl StateMachine for Counter {
    type Command = u64;
    type Id = u64;
    type Output = u64;
    type Event = ();
    fn id(cmd: &u64) -> u64 {
        *cmd
    }
    fn has_caller(_: &u64) -> bool {
        true
    }
    fn encode(cmds: &[u64]) -> Bytes {
        cmds.iter().flat_map(|c| c.to_le_bytes()).collect()
    }
    fn decode(data: &Bytes) -> Result<Vec<u64>, DecodeError> {
        Ok(data
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }
    fn apply(
        &mut self,
        _: u32,
        index: u64,
        _: u64,
        _: Option<&mut Vec<()>>,
    ) -> Result<(u64, u64), CallError> {
        self.0 += 1;
        Ok((self.0, index))
    }
    fn get(&self, _: &[u8]) -> Option<Bytes> {
        None
    }
    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0.to_le_bytes())
    }
    fn restore(data: &Bytes) -> Result<Counter, DecodeError> {
        Ok(Counter(Self::decode(data)?.first().copied().unwrap_or(0)))
    }
}

#[test]
fn reads_in_flight_are_bounded() {
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 1, &cfg, 4, GroupInit::bootstrap(vec![1])).unwrap();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = oneshot::channel();
        g.read(Bytes::from_static(b"k"), tx);
        answers.push(rx);
    }
    // Four wait for their ReadIndex; the fifth is refused at once.
    let fifth = answers.pop().unwrap().try_recv().unwrap();
    let err = fifth.expect("an answer").unwrap_err();
    assert!(
        matches!(&err, CallError::Busy(m) if m.contains("4 linearizable reads")),
        "{err:?}"
    );
    for mut rx in answers {
        assert!(
            rx.try_recv().unwrap().is_none(),
            "a queued read was answered"
        );
    }
}

/// A follower that had no leader for long, then hears from one and
/// goes quiet before it ticks again, serves calls: the leaderless count
/// it kept by ticks is stale once a leader is known.
#[test]
fn a_known_leader_outweighs_a_stale_leaderless_count() {
    use raft::eraftpb::{Message, MessageType};
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 2, &cfg, 16, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    let alive = |_: u64| true;
    // Ticks short of an election timeout, repeated: no campaign, no
    // leader, and a leaderless count past two election timeouts.
    for _ in 0..3 * g.election_ticks {
        g.tick(&alive);
        g.raw.raft.election_elapsed = 0;
    }
    let (tx, mut rx) = oneshot::channel();
    g.read(Bytes::from_static(b"k"), tx);
    assert!(
        matches!(rx.try_recv(), Ok(Some(Err(CallError::Unavailable(_))))),
        "no leader: refused at once"
    );
    // Node 1 leads, in a later term, and asks it to go quiet.
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = 1;
    m.to = 2;
    m.term = g.term() + 1;
    m.commit = g.raw.raft.raft_log.last_index();
    g.step_from(1, m.clone());
    m.context = quiesce_ctx(0).into();
    g.step_from(1, m);
    assert_eq!(g.leader(), 1);
    assert!(g.is_quiescent());
    let (tx, mut rx) = oneshot::channel();
    g.read(Bytes::from_static(b"k"), tx);
    assert!(
        matches!(rx.try_recv(), Ok(None)),
        "with a leader known the read waits for its ReadIndex"
    );
}

/// Makes `g` (node 1 of voters 1, 2, 3) leader, with its log durable.
fn lead(g: &mut Group<Counter>) {
    use raft::eraftpb::{Message, MessageType};
    g.raw.campaign().unwrap();
    persist(g);
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestPreVoteResponse);
    vote.from = 2;
    vote.to = 1;
    vote.term = g.term() + 1;
    g.step_from(2, vote.clone());
    persist(g);
    vote.set_msg_type(MessageType::MsgRequestVoteResponse);
    vote.term = g.term();
    g.step_from(2, vote);
    persist(g);
    assert!(g.is_leader());
}

/// Takes the group's Ready and makes it durable (in memory).
fn persist(g: &mut Group<Counter>) {
    if !g.raw.has_ready() {
        return;
    }
    let rd = g.raw.ready();
    g.storage.append(rd.entries());
    if let Some(hs) = rd.hs() {
        g.storage.set_hard_state(hs.clone());
    }
    let mut light = g.raw.advance(rd);
    if let Some(c) = light.commit_index() {
        g.storage.set_commit(c);
    }
    let _ = light.take_committed_entries();
    g.raw.advance_apply();
}

/// Node `from` acknowledges the leader `g`'s log up to `index`.
fn append_response(g: &Group<Counter>, from: u64, index: u64) -> raft::eraftpb::Message {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgAppendResponse);
    m.from = from;
    m.to = 1;
    m.term = g.term();
    m.index = index;
    m
}

fn ack(g: &mut Group<Counter>, from: u64, index: u64) {
    g.step_from(from, append_response(g, from, index));
    persist(g);
}

/// [`ack`], applying what it commits.
fn ack_and_apply(g: &mut Group<Counter>, from: u64, index: u64) {
    g.step_from(from, append_response(g, from, index));
    persist_and_apply(g);
}

/// Node `from` forwards write `cmd` to the leader `g`, as raft-rs does
/// for a write proposed on a follower.
fn forward(g: &mut Group<Counter>, from: u64, cmd: u64) {
    use raft::eraftpb::{Entry, Message, MessageType};
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.from = from;
    m.to = 1;
    m.entries = vec![Entry {
        data: Counter::encode(&[cmd]),
        ..Default::default()
    }]
    .into();
    g.step_from(from, m);
    persist(g);
}

#[test]
fn commit_notices_go_to_followers_waiting_for_their_writes() {
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 1, &cfg, 16, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    lead(&mut g);
    let notices = |g: &mut Group<Counter>| {
        let mut out = Vec::new();
        g.commit_notices(|to, term, commit| out.push((to, term, commit)));
        out
    };
    let term = g.term();
    let first = g.raw.raft.raft_log.last_index();
    // The leader's own entry commits: nobody waits, nobody is told (the
    // next append or heartbeat carries the commit index).
    ack(&mut g, 2, first);
    ack(&mut g, 3, first);
    assert_eq!(g.raw.raft.raft_log.committed, first);
    assert_eq!(notices(&mut g), vec![]);
    // Node 2 forwards a write; node 3 acknowledges it first. It commits,
    // but node 2 hears of it only up to what node 2 acknowledged.
    forward(&mut g, 2, 7);
    let write = g.raw.raft.raft_log.last_index();
    assert!(write > first, "the forwarded write was appended");
    ack(&mut g, 3, write);
    assert_eq!(g.raw.raft.raft_log.committed, write);
    assert_eq!(notices(&mut g), vec![(2, term, first)]);
    assert_eq!(notices(&mut g), vec![], "told once");
    // Node 2 acknowledges: now it is told, and waits for nothing more.
    ack(&mut g, 2, write);
    assert_eq!(notices(&mut g), vec![(2, term, write)]);
    let (tx, _rx) = oneshot::channel();
    g.propose(8, tx);
    g.flush();
    persist(&mut g);
    let own = g.raw.raft.raft_log.last_index();
    ack(&mut g, 2, own);
    ack(&mut g, 3, own);
    assert_eq!(g.raw.raft.raft_log.committed, own);
    assert_eq!(
        notices(&mut g),
        vec![],
        "node 3 never waited, node 2 no longer"
    );
}

/// Node 1 of voters 1, 2, 3, leading, both followers caught up with its
/// log; `max_inflight` as in [`Group::new`].
fn caught_up_leader(max_inflight: usize) -> Group<Counter> {
    let cfg = RaftConfig::default();
    let init = GroupInit::bootstrap(vec![1, 2, 3]);
    let mut g = Group::<Counter>::new(1, 1, &cfg, max_inflight, init).unwrap();
    lead(&mut g);
    let first = g.raw.raft.raft_log.last_index();
    ack(&mut g, 2, first);
    ack(&mut g, 3, first);
    g
}

/// Takes `g`'s Ready as the turn would (heartbeats pruned): to whom
/// messages of type `kind` go, in order.
fn sent_after_pruning(g: &mut Group<Counter>, kind: raft::eraftpb::MessageType) -> Vec<u64> {
    let (_, _, mut msgs) = ready_once(g);
    g.prune_heartbeats(&mut msgs);
    let mut to: Vec<u64> = msgs
        .iter()
        .filter(|m| m.get_msg_type() == kind)
        .map(|m| m.to)
        .collect();
    to.sort_unstable();
    to
}

/// A follower that waits for nothing is sent no commit notice, yet hears
/// of the last commit from a heartbeat within two ticks once appends stop
/// (the first tick's heartbeat may be dropped as redundant with the last
/// append, which carried the commit index of its time).
#[test]
fn a_follower_owed_no_notice_learns_the_commit_within_two_ticks() {
    use raft::eraftpb::MessageType;
    let mut g = caught_up_leader(16);
    let (tx, _rx) = oneshot::channel();
    g.propose(7, tx);
    g.flush();
    let (_, _, mut msgs) = ready_once(&mut g);
    let write = g.raw.raft.raft_log.last_index();
    assert!(
        msgs.iter()
            .any(|m| m.to == 3 && m.get_msg_type() == MessageType::MsgAppend),
        "the write is appended to node 3: {msgs:?}"
    );
    g.prune_heartbeats(&mut msgs);
    ack(&mut g, 2, write);
    ack(&mut g, 3, write);
    assert_eq!(g.raw.raft.raft_log.committed, write);
    g.commit_notices(|to, _, _| panic!("nobody waits, yet node {to} was sent a notice"));
    let alive = |_: u64| true;
    let mut heard = 0;
    for _ in 0..2 {
        g.tick(&alive);
        if !g.raw.has_ready() {
            continue;
        }
        let (_, _, mut msgs) = ready_once(&mut g);
        g.prune_heartbeats(&mut msgs);
        for m in msgs.iter().filter(|m| m.to == 3) {
            assert!(m.commit <= write);
            heard = heard.max(m.commit);
        }
    }
    assert_eq!(heard, write, "node 3 heard of the commit");
}

/// A leader that sent every follower an append since its last heartbeats
/// builds none on the next tick (pruning would drop them all), and the
/// turn need not visit it; with no append before the tick after, that one
/// beats as usual. The skipped ticks still time raft-rs's quorum check: a
/// leader whose followers stopped answering steps down, although it kept
/// appending to them every tick.
#[test]
fn a_leader_busy_appending_skips_heartbeats_yet_checks_its_quorum() {
    use raft::eraftpb::MessageType;
    // Room for every write of the test in flight at once.
    let mut g = caught_up_leader(64);
    let alive = |_: u64| true;
    // Callers kept waiting: a write whose caller has gone is not proposed.
    let mut callers = Vec::new();
    let mut append_to_all = |g: &mut Group<Counter>, cmd: u64| {
        let (tx, rx) = oneshot::channel();
        callers.push(rx);
        g.propose(cmd, tx);
        g.flush();
        let to = sent_after_pruning(g, MessageType::MsgAppend);
        assert_eq!(to, vec![2, 3], "write {cmd} is appended to both");
    };
    append_to_all(&mut g, 1);
    let elapsed = g.raw.raft.election_elapsed;
    assert!(!g.tick(&alive), "nothing for the turn after a silent tick");
    assert!(!g.raw.has_ready(), "no heartbeats were built");
    assert_eq!(g.raw.raft.election_elapsed, elapsed + 1);
    assert!(g.tick(&alive), "no append since: this tick beats");
    assert_eq!(
        sent_after_pruning(&mut g, MessageType::MsgHeartbeat),
        vec![2, 3]
    );
    // From now on the followers never answer.
    let mut silent = 0;
    for cmd in 2..2 + 3 * g.election_ticks {
        if !g.is_leader() {
            break;
        }
        append_to_all(&mut g, cmd);
        if !g.tick(&alive) {
            silent += 1;
        }
    }
    assert!(silent > 0, "some ticks were silent");
    assert!(!g.is_leader(), "a leader without a quorum stepped down");
}

#[test]
fn followers_send_no_commit_notices() {
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 2, &cfg, 16, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    let mut n = 0;
    g.commit_notices(|_, _, _| n += 1);
    assert_eq!(n, 0);
}

#[test]
fn a_relocation_snapshots_again_with_nothing_applied_since() {
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 1, &cfg, 4, GroupInit::bootstrap(vec![1])).unwrap();
    let at = g.applied();
    assert!(at > 0);
    assert!(!g.snapshot_due());
    assert!(g.maybe_snapshot().is_none());
    // Asked for a snapshot with nothing new applied: nothing to take.
    g.storage().want_snapshot();
    assert!(!g.snapshot_due());
    assert!(g.maybe_snapshot().is_none());
    // Asked to relocate: the same state, at the same index, written again.
    g.storage().want_relocation();
    assert!(g.snapshot_due());
    let (snap, _) = g.maybe_snapshot().expect("a relocation snapshot");
    let snap = snap.expect("a new snapshot");
    assert_eq!(snap.get_metadata().index, at);
    assert_eq!(snap.get_data(), &0u64.to_le_bytes()[..]);
    assert!(!g.snapshot_due());
    assert!(g.maybe_snapshot().is_none());
}

/// [`persist`], applying what raft hands over as committed.
fn persist_and_apply(g: &mut Group<Counter>) {
    if g.raw.has_ready() {
        ready_once(g);
    }
}

#[test]
fn an_idle_group_snapshots_again_after_entries_that_carry_no_command() {
    let cfg = RaftConfig::default();
    let mut g = Group::<Counter>::new(1, 1, &cfg, 16, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    lead(&mut g);
    let ack = |g: &mut Group<Counter>, index: u64| ack_and_apply(g, 2, index);
    // The new leader's empty entry commits and applies: nothing changed
    // the (tiny) state, so a snapshot is due at once.
    let last = g.raw.raft.raft_log.last_index();
    assert!(!g.snapshot_due());
    ack(&mut g, last);
    assert_eq!(g.applied(), last);
    assert!(g.snapshot_due());
    let (snap, _) = g.maybe_snapshot().expect("an idle snapshot");
    let snap = snap.expect("a new snapshot");
    assert_eq!(snap.get_metadata().index, last);
    assert!(!g.snapshot_due());
    // A command applied: the state changed, so no snapshot before the
    // usual threshold.
    let (tx, _rx) = oneshot::channel();
    g.propose(7, tx);
    g.flush();
    persist_and_apply(&mut g);
    let next = g.raw.raft.raft_log.last_index();
    ack(&mut g, next);
    assert_eq!(g.applied(), next);
    assert!(!g.snapshot_due());
    assert!(g.maybe_snapshot().is_none());
}

/// Takes `g`'s Ready, makes it durable, applies what it commits, and
/// returns whether raft-rs said it needed a sync, how many entries it
/// applied (before or after advance), and every message it produced.
fn ready_once(g: &mut Group<Counter>) -> (bool, usize, Vec<raft::eraftpb::Message>) {
    let mut out = Outbox::default();
    let mut rd = g.raw.ready();
    let must_sync = rd.must_sync();
    let mut msgs = rd.take_messages();
    g.storage.append(rd.entries());
    if let Some(hs) = rd.hs() {
        g.storage.set_hard_state(hs.clone());
    }
    let committed = rd.take_committed_entries();
    let mut applied = committed.len();
    g.apply(committed, &mut out);
    msgs.extend(rd.take_persisted_messages());
    let mut light = g.raw.advance(rd);
    if let Some(c) = light.commit_index() {
        g.storage.set_commit(c);
    }
    let committed = light.take_committed_entries();
    applied += committed.len();
    g.apply(committed, &mut out);
    msgs.extend(light.take_messages());
    g.raw.advance_apply();
    (must_sync, applied, msgs)
}

/// The turn finishes a Ready at once, before the shard's sync, when
/// raft-rs says it needs none (`shard::turn`). That must hold for the
/// Readies a write's commit brings, and never for those carrying entries
/// or a new term: if raft-rs ever asked to sync a commit, or stopped
/// asking for entries, this fails.
#[test]
fn a_commit_needs_no_sync_and_entries_always_do() {
    use raft::eraftpb::{Message, MessageType};
    let cfg = RaftConfig::default();
    let voters = vec![1, 2, 3];
    let mut leader =
        Group::<Counter>::new(1, 1, &cfg, 16, GroupInit::bootstrap(voters.clone())).unwrap();
    let mut follower = Group::<Counter>::new(1, 2, &cfg, 16, GroupInit::bootstrap(voters)).unwrap();
    lead(&mut leader);
    // A heartbeat: the follower learns who leads, and its answer resumes
    // replication.
    leader.raw.tick();
    let (_, _, to_follower) = ready_once(&mut leader);
    for m in to_follower.into_iter().filter(|m| m.to == 2) {
        follower.step_from(1, m);
    }
    assert_eq!(follower.leader(), 1);
    // The write is taken by the follower, which forwards it.
    let (tx, mut rx) = oneshot::channel();
    follower.propose(7, tx);
    follower.flush();
    let (_, _, to_leader) = ready_once(&mut follower);
    for m in to_leader.into_iter().filter(|m| m.to == 1) {
        leader.step_from(2, m);
    }
    let (must_sync, _, mut to_follower) = ready_once(&mut leader);
    assert!(must_sync, "the leader's new entry");
    let write = leader.raw.raft.raft_log.last_index();

    // Appends and answers until the write commits at the leader.
    let mut rounds = 0;
    while leader.raw.raft.raft_log.committed < write {
        rounds += 1;
        assert!(rounds < 10, "the write never committed");
        for m in to_follower.drain(..).filter(|m| m.to == 2) {
            follower.step_from(1, m);
        }
        let mut to_leader = Vec::new();
        if follower.raw.has_ready() {
            let (must_sync, _, msgs) = ready_once(&mut follower);
            let appended = follower.raw.raft.raft_log.last_index() >= write;
            assert!(
                must_sync || !appended,
                "entries or a new term are synced first"
            );
            to_leader = msgs;
        }
        for m in to_leader.into_iter().filter(|m| m.to == 1) {
            leader.step_from(2, m);
        }
        if leader.raw.has_ready() {
            let (must_sync, committed, msgs) = ready_once(&mut leader);
            if leader.raw.raft.raft_log.committed >= write {
                assert!(!must_sync, "a commit learned from an answer");
                assert!(committed > 0, "and it is applied");
                assert_eq!(leader.applied(), write);
            }
            to_follower = msgs;
        }
    }

    // The commit notice, owed to the follower that forwarded the write
    // (and to no other): the follower applies the write with no sync, and
    // answers its caller.
    let mut notices = Vec::new();
    leader.commit_notices(|to, term, commit| notices.push((to, term, commit)));
    assert!(notices.iter().all(|n| n.0 == 2), "{notices:?}");
    let &(_, term, commit) = notices.first().expect("a notice");
    assert_eq!(commit, write);
    assert!(matches!(rx.try_recv(), Ok(None)), "answered before apply");
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.from = 1;
    hb.to = 2;
    hb.term = term;
    hb.commit = commit;
    follower.step_from(1, hb);
    let (must_sync, committed, _) = ready_once(&mut follower);
    assert!(!must_sync, "a commit learned from a notice");
    assert!(committed > 0, "and it is applied");
    assert_eq!(follower.applied(), write);
    let answer = rx.try_recv().expect("an answer").expect("sent");
    assert_eq!(answer.expect("applied").index, write);
}

/// Asked to trim (its shard is over the log memory budget), a leader
/// compacts everything applied except what a recently active follower
/// has yet to acknowledge, and of that at most
/// `compaction_retain_entries`; asked again with nothing applied since, it
/// compacts further without taking a new snapshot. A follower compacts
/// all it applied.
#[test]
fn a_trim_keeps_only_what_an_active_follower_still_needs() {
    let cfg = RaftConfig {
        compaction_retain_entries: 4,
        ..Default::default()
    };
    let mut g = Group::<Counter>::new(1, 1, &cfg, 64, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    lead(&mut g);
    let ack = ack_and_apply;
    let start = g.raw.raft.raft_log.last_index();
    ack(&mut g, 2, start);
    ack(&mut g, 3, start);
    let mut answers = Vec::new();
    for cmd in 0..10 {
        let (tx, rx) = oneshot::channel();
        answers.push(rx);
        g.propose(cmd, tx);
        g.flush();
        persist_and_apply(&mut g);
    }
    let last = g.raw.raft.raft_log.last_index();
    assert_eq!(last, start + 10);
    ack(&mut g, 2, last);
    assert_eq!(g.applied(), last);
    // Node 3 lacks 10 entries, more than the 4 retained for it.
    assert_eq!(g.trim_index(), last - 4);
    ack(&mut g, 3, start + 8);
    assert_eq!(g.trim_index(), start + 8);
    assert!(!g.snapshot_due());

    let before = g.storage().log_bytes();
    g.storage().want_trim();
    assert!(g.snapshot_due());
    let (snap, to) = g.maybe_snapshot().expect("a trim");
    assert_eq!(snap.expect("a new snapshot").get_metadata().index, last);
    assert_eq!(to, start + 8);
    assert_eq!(g.storage().first_index(), start + 9);
    assert!(g.storage().log_bytes() < before);
    assert!(!g.snapshot_due());

    // Node 3 catches up: the next trim needs no new snapshot.
    ack(&mut g, 3, last);
    g.storage().want_trim();
    assert_eq!(
        g.maybe_snapshot().map(|(s, to)| (s.is_some(), to)),
        Some((false, last))
    );
    assert_eq!(g.storage().first_index(), last + 1);
    assert_eq!(g.storage().log_bytes(), 0);
    // Nothing left to let go.
    g.storage().want_trim();
    assert!(g.maybe_snapshot().is_none());

    let follower =
        Group::<Counter>::new(1, 2, &cfg, 64, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    assert_eq!(follower.trim_index(), follower.applied());
}

/// Fresh from Bootstrap, the voter picked by the partition number
/// campaigns at once and the others wait for their election timeout; a
/// replica past its first election never campaigns this way.
#[test]
fn the_first_campaign_is_the_picked_voters_alone() {
    let cfg = RaftConfig::default();
    // Partition 4 of voters 1, 2, 3: 4 % 3 = 1, the second voter.
    for (me, picked) in [(1, false), (2, true), (3, false)] {
        let mut g =
            Group::<Counter>::new(4, me, &cfg, 16, GroupInit::bootstrap(vec![3, 1, 2])).unwrap();
        assert_eq!(g.campaign_if_first(), picked, "node {me}");
        let role = g.raw.raft.state;
        if picked {
            assert_eq!(role, raft::StateRole::PreCandidate);
        } else {
            assert_eq!(role, raft::StateRole::Follower);
        }
    }
    // Node 1 is picked for partition 3 (3 % 3 = 0), but not once it has
    // been through an election.
    let mut g = Group::<Counter>::new(3, 1, &cfg, 16, GroupInit::bootstrap(vec![1, 2, 3])).unwrap();
    lead(&mut g);
    assert!(!g.campaign_if_first());
}

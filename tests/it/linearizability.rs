//! Linearizability checker for the key-value histories recorded by the fault
//! tests.
//!
//! # Model
//!
//! Every key is an independent register that starts out absent. `Put` stores
//! a value and returns the previous one, `Get` returns the current value,
//! `Delete` removes the value and returns the previous one, and `Cas` stores
//! its new value only if the current value equals `expected`, returning
//! whether it did and the value it found. Calls on different keys never
//! interact, so a history is linearizable exactly when each key's
//! sub-history is (locality), and keys are checked one at a time.
//!
//! # Indeterminate and failed calls
//!
//! A call that ended in [`Ret::Failed`] definitely did not happen and is
//! dropped. A call that ended in [`Ret::Unknown`] (unavailable, deadline
//! exceeded, transport error) may have taken effect once, at any moment after
//! it was invoked, even after the client gave up on it, or never; its result
//! is unknown. It is modelled as a call that never returns: it may be placed
//! anywhere after its invocation, or left out. An indeterminate `Get` has no
//! effect and is dropped. Every call with a known result must be placed
//! exactly once, and its recorded result must be exactly what the register
//! returns at that point. With a unique value per write, a write applied
//! twice therefore shows up as a violation.
//!
//! # Search
//!
//! Each key is checked with the Wing & Gong search, memoized as suggested by
//! Lowe. The key's invocations and returns form one list ordered by time (an
//! invocation sorts before a return at the same instant, so calls that touch
//! are treated as concurrent). A depth-first search repeatedly picks a call
//! whose invocation comes before the earliest return of any call not yet
//! placed, applies it to the register, and checks its result; on a dead end
//! it backtracks. Every (placed set, register value) pair reached is
//! remembered, so no configuration is explored twice. The key passes once all
//! calls with known results are placed; indeterminate calls left over never
//! happened.
//!
//! A few rules keep the search small without losing any valid order:
//!
//! - Every call with a known result reports the value it found, so an
//!   indeterminate write only matters if its value is seen afterwards.
//!   Writes whose value no call reports are dropped up front; one that would
//!   not change the value is never placed; and an indeterminate `Put` or
//!   `Delete` is never placed right after another indeterminate write, which
//!   it would overwrite unseen. Any valid order can be reduced to one obeying
//!   this by leaving indeterminate calls out. Without it, each indeterminate
//!   call could be in or out at every step, and the search would blow up.
//! - A call with a known result that fits without changing the value (a
//!   read, a cas that did not swap) is placed at once, and no alternative
//!   is tried at that point: it can be moved to the front of any valid
//!   continuation, since no unplaced call had to precede it and it changes
//!   nothing for the calls after it.
//! - The value may not change while an unplaced call with a known result
//!   still has to find it and no unplaced call can write it again.
//!
//! A key that needs more than `SEARCH_BUDGET` placements fails as
//! inconclusive rather than running for an unbounded time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Placements tried on one key before the check gives up as inconclusive.
const SEARCH_BUDGET: u64 = 5_000_000;
/// Most calls a [`Violation`] carries and prints.
const MAX_LISTED_CALLS: usize = 200;
/// Longest rendering of a key or value in a report, in characters.
const MAX_VALUE_CHARS: usize = 40;
/// Most calls named in a single part of a violation message.
const MAX_NAMED_CALLS: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets the value; returns the previous one.
    Put(Vec<u8>),
    /// Returns the current value.
    Get,
    /// Removes the value; returns the previous one.
    Delete,
    /// If the current value equals `expected`, sets `value`; returns whether
    /// it did and the value before.
    Cas {
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    Put {
        previous: Option<Vec<u8>>,
    },
    Get {
        value: Option<Vec<u8>>,
    },
    Delete {
        previous: Option<Vec<u8>>,
    },
    Cas {
        succeeded: bool,
        current: Option<Vec<u8>>,
    },
    /// Indeterminate (UNAVAILABLE, DEADLINE_EXCEEDED, transport error): the
    /// call may have taken effect exactly once at any moment after its
    /// invocation (even after it returned), or never. Its result is unknown.
    Unknown,
    /// The call definitely did not take effect.
    Failed,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub client: u32,
    pub key: Vec<u8>,
    pub op: Op,
    pub ret: Ret,
    /// Nanoseconds since a common origin, from one monotonic clock.
    pub invoke_ns: u64,
    /// Ignored for `Unknown` (treated as +infinity).
    pub return_ns: u64,
}

/// What a successful check covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub keys: usize,
    pub calls: usize,
    pub unknown: usize,
    pub failed: usize,
}

/// A key whose sub-history is not linearizable (or could not be decided).
#[derive(Debug)]
pub struct Violation {
    pub key: Vec<u8>,
    /// What went wrong; `#n` refers to the n-th entry of `calls`.
    pub message: String,
    /// The key's calls in invocation order: all of them, or for a long
    /// history the 200 around the point of failure.
    pub calls: Vec<Call>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linearizability check failed on key {}: {}",
            show_bytes(&self.key),
            self.message
        )?;
        writeln!(f, "calls on this key, in invocation order:")?;
        for (n, call) in self.calls.iter().take(MAX_LISTED_CALLS).enumerate() {
            writeln!(f, "  #{n:<3} {}", call_line(call))?;
        }
        if self.calls.len() > MAX_LISTED_CALLS {
            writeln!(f, "  ... {} more", self.calls.len() - MAX_LISTED_CALLS)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Checks that `history` is linearizable, key by key. On failure, reports
/// the first failing key (in byte order).
pub fn check(history: &[Call]) -> Result<Report, Violation> {
    let mut report = Report {
        calls: history.len(),
        ..Report::default()
    };
    let mut by_key: BTreeMap<&[u8], Vec<Call>> = BTreeMap::new();
    for call in history {
        match call.ret {
            Ret::Unknown => report.unknown += 1,
            Ret::Failed => report.failed += 1,
            _ => {}
        }
        by_key.entry(&call.key).or_default().push(call.clone());
    }
    report.keys = by_key.len();
    for (key, mut calls) in by_key {
        // Stable: calls invoked at the same instant keep their history order.
        calls.sort_by_key(|call| call.invoke_ns);
        check_key(key, calls, SEARCH_BUDGET)?;
    }
    Ok(report)
}

/// Checks one key's calls, sorted by invocation time.
fn check_key(key: &[u8], calls: Vec<Call>, budget: u64) -> Result<(), Violation> {
    let mut values = Values::default();
    let mut ops = Vec::new();
    for (index, call) in calls.iter().enumerate() {
        match SearchOp::new(index, call, &mut values) {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => {}
            Err(problem) => {
                let reporter = Reporter::new(key, &calls, index);
                let message = format!("{} is malformed: {problem}", reporter.name(index));
                return Err(reporter.into_violation(message));
            }
        }
    }

    if let Some(problem) = impossible_result(&ops, &values) {
        let reporter = Reporter::new(key, &calls, problem.call);
        let message = format!("{} {}", reporter.name(problem.call), problem.reason);
        return Err(reporter.into_violation(message));
    }
    drop_unseen_writes(&mut ops);

    match search(&ops, values.bytes.len(), budget) {
        Outcome::Linearizable => Ok(()),
        Outcome::NotLinearizable(best) => {
            let stuck = Stuck::at(&ops, &best);
            let reporter = Reporter::new(key, &calls, ops[stuck.blocking].call);
            let message = explain_failure(&ops, &values, &best, &stuck, &reporter);
            Err(reporter.into_violation(message))
        }
        Outcome::Inconclusive(best) => {
            let stuck = Stuck::at(&ops, &best);
            let reporter = Reporter::new(key, &calls, ops[stuck.blocking].call);
            let message = format!(
                "inconclusive: gave up after {budget} search steps, having ordered at best \
                 {} of {} calls with known results (stuck near {}). The history may be \
                 linearizable but is too concurrent to decide in the budget.",
                best.order_known,
                determinate_count(&ops),
                reporter.name(ops[stuck.blocking].call),
            );
            Err(reporter.into_violation(message))
        }
    }
}

// ---------------------------------------------------------------------------
// The register model, with values interned per key.

/// Interned register value; `ABSENT` is the missing value.
type ValueId = u32;
const ABSENT: ValueId = 0;

/// Interns the values seen on one key, so the register state is a small
/// integer.
struct Values {
    ids: HashMap<Vec<u8>, ValueId>,
    bytes: Vec<Vec<u8>>,
}

impl Default for Values {
    fn default() -> Self {
        Values {
            ids: HashMap::new(),
            // Index 0 stands for ABSENT and is never looked up by bytes.
            bytes: vec![Vec::new()],
        }
    }
}

impl Values {
    fn id(&mut self, value: Option<&Vec<u8>>) -> ValueId {
        let Some(value) = value else { return ABSENT };
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = ValueId::try_from(self.bytes.len()).expect("too many distinct values");
        self.ids.insert(value.clone(), id);
        self.bytes.push(value.clone());
        id
    }

    fn show(&self, id: ValueId) -> String {
        if id == ABSENT {
            "absent".to_string()
        } else {
            show_bytes(&self.bytes[id as usize])
        }
    }
}

/// An operation in interned form. `observed` is the value the call reported
/// finding, or `None` when its result is unknown (then any value is fine).
#[derive(Clone, Copy, Debug)]
enum ModelOp {
    Put {
        value: ValueId,
        observed: Option<ValueId>,
    },
    Get {
        observed: ValueId,
    },
    Delete {
        observed: Option<ValueId>,
    },
    Cas {
        expected: ValueId,
        value: ValueId,
        observed: Option<(bool, ValueId)>,
    },
}

impl ModelOp {
    /// The register value after this call, if its recorded result is what
    /// the register would return from `state`.
    fn apply(self, state: ValueId) -> Option<ValueId> {
        match self {
            ModelOp::Put { value, observed } => {
                observed.is_none_or(|o| o == state).then_some(value)
            }
            ModelOp::Get { observed } => (observed == state).then_some(state),
            ModelOp::Delete { observed } => observed.is_none_or(|o| o == state).then_some(ABSENT),
            ModelOp::Cas {
                expected,
                value,
                observed,
            } => {
                let swaps = state == expected;
                let matches = observed
                    .is_none_or(|(succeeded, current)| succeeded == swaps && current == state);
                matches.then_some(if swaps { value } else { state })
            }
        }
    }

    /// The value the call reported finding before it acted.
    fn observed(self) -> Option<ValueId> {
        match self {
            ModelOp::Put { observed, .. } | ModelOp::Delete { observed } => observed,
            ModelOp::Get { observed } => Some(observed),
            ModelOp::Cas { observed, .. } => observed.map(|(_, current)| current),
        }
    }

    /// The value the call stores if it writes.
    fn written(self) -> Option<ValueId> {
        match self {
            ModelOp::Put { value, .. } | ModelOp::Cas { value, .. } => Some(value),
            ModelOp::Delete { .. } => Some(ABSENT),
            ModelOp::Get { .. } => None,
        }
    }

    /// The value the call may have stored: like `written`, except that a
    /// cas known to have failed stored nothing.
    fn may_write(self) -> Option<ValueId> {
        match self {
            ModelOp::Cas {
                observed: Some((false, _)),
                ..
            } => None,
            _ => self.written(),
        }
    }

    /// Whether the call overwrites the value regardless of what it was.
    fn is_blind_write(self) -> bool {
        matches!(self, ModelOp::Put { .. } | ModelOp::Delete { .. })
    }
}

/// A call that takes part in the search.
#[derive(Clone, Debug)]
struct SearchOp {
    /// Index of the call in the key's sorted call list.
    call: usize,
    op: ModelOp,
    /// Result unknown: may be placed anywhere after `invoke_ns`, or never.
    unknown: bool,
    invoke_ns: u64,
    /// `u64::MAX` when `unknown`.
    return_ns: u64,
}

impl SearchOp {
    /// The call in search form, or `None` when it cannot have had an
    /// effect (failed, or an indeterminate read).
    fn new(index: usize, call: &Call, values: &mut Values) -> Result<Option<SearchOp>, String> {
        let unknown = call.ret == Ret::Unknown;
        let op = match (&call.op, &call.ret) {
            (_, Ret::Failed) | (Op::Get, Ret::Unknown) => return Ok(None),
            (Op::Put(value), Ret::Put { previous }) => ModelOp::Put {
                value: values.id(Some(value)),
                observed: Some(values.id(previous.as_ref())),
            },
            (Op::Put(value), Ret::Unknown) => ModelOp::Put {
                value: values.id(Some(value)),
                observed: None,
            },
            (Op::Get, Ret::Get { value }) => ModelOp::Get {
                observed: values.id(value.as_ref()),
            },
            (Op::Delete, Ret::Delete { previous }) => ModelOp::Delete {
                observed: Some(values.id(previous.as_ref())),
            },
            (Op::Delete, Ret::Unknown) => ModelOp::Delete { observed: None },
            (Op::Cas { expected, value }, ret) => {
                let observed = match ret {
                    Ret::Cas { succeeded, current } => {
                        Some((*succeeded, values.id(current.as_ref())))
                    }
                    Ret::Unknown => None,
                    _ => return Err(format!("{ret:?} is not a result of a cas")),
                };
                ModelOp::Cas {
                    expected: values.id(expected.as_ref()),
                    value: values.id(Some(value)),
                    observed,
                }
            }
            (op, ret) => return Err(format!("{ret:?} is not a result of {op:?}")),
        };
        if !unknown && call.return_ns < call.invoke_ns {
            return Err("it returned before it was invoked".to_string());
        }
        Ok(Some(SearchOp {
            call: index,
            op,
            unknown,
            invoke_ns: call.invoke_ns,
            return_ns: if unknown { u64::MAX } else { call.return_ns },
        }))
    }

    /// The value the call reported finding, if its result is known.
    fn observed(&self) -> Option<ValueId> {
        if self.unknown {
            None
        } else {
            self.op.observed()
        }
    }
}

fn determinate_count(ops: &[SearchOp]) -> usize {
    ops.iter().filter(|op| !op.unknown).count()
}

/// A result that no ordering can explain, found without searching.
struct Impossible {
    call: usize,
    reason: String,
}

/// Finds a result that contradicts itself or reports a value nobody wrote.
fn impossible_result(ops: &[SearchOp], values: &Values) -> Option<Impossible> {
    // Counting the value of a cas that reported failure too: the search
    // catches one that did swap after all, and says more about it.
    let mut written: HashSet<ValueId> = ops.iter().filter_map(|op| op.op.written()).collect();
    written.insert(ABSENT);
    for op in ops.iter().filter(|op| !op.unknown) {
        if let ModelOp::Cas {
            expected,
            observed: Some((succeeded, current)),
            ..
        } = op.op
        {
            if succeeded != (current == expected) {
                let reason = if succeeded {
                    format!(
                        "reported success although the value it found, {}, is not the expected {}",
                        values.show(current),
                        values.show(expected)
                    )
                } else {
                    format!(
                        "reported failure although the value it found, {}, is the expected one",
                        values.show(current)
                    )
                };
                return Some(Impossible {
                    call: op.call,
                    reason,
                });
            }
        }
        if let Some(seen) = op.observed() {
            if !written.contains(&seen) {
                return Some(Impossible {
                    call: op.call,
                    reason: format!(
                        "returned {}, a value that no call on this key ever wrote",
                        values.show(seen)
                    ),
                });
            }
        }
    }
    None
}

/// Drops indeterminate writes whose result nobody could notice: every call
/// with a known result reports the value it found, so a write whose value is
/// never reported (nor expected by an indeterminate cas that could build on
/// it) can be left out of any valid order.
fn drop_unseen_writes(ops: &mut Vec<SearchOp>) {
    let mut seen: HashSet<ValueId> = ops.iter().filter_map(SearchOp::observed).collect();
    seen.extend(
        ops.iter()
            .filter(|op| op.unknown)
            .filter_map(|op| match op.op {
                ModelOp::Cas { expected, .. } => Some(expected),
                _ => None,
            }),
    );
    ops.retain(|op| !op.unknown || op.op.written().is_some_and(|value| seen.contains(&value)));
}

// ---------------------------------------------------------------------------
// The search.

/// The deepest point the search reached, for the failure report.
#[derive(Clone, Debug, Default)]
struct Best {
    /// Indices into the search ops, in the order placed.
    order: Vec<usize>,
    /// How many of them have known results.
    order_known: usize,
    /// Register value after `order`.
    state: ValueId,
}

enum Outcome {
    Linearizable,
    NotLinearizable(Best),
    Inconclusive(Best),
}

#[derive(Clone, Copy, Debug)]
enum Event {
    /// List ends (head and tail).
    Sentinel,
    Invoke(usize),
    /// The return of a call with a known result.
    Return,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    prev: usize,
    next: usize,
    event: Event,
}

/// The invocation and return events of the unplaced calls, as a doubly linked
/// list ordered by time. Placing a call unlinks its events; undoing that
/// relinks them (in reverse order), which is valid because the search undoes
/// placements strictly last-in, first-out.
struct EventList {
    nodes: Vec<Node>,
    invoke_node: Vec<usize>,
    return_node: Vec<Option<usize>>,
}

const HEAD: usize = 0;
const TAIL: usize = 1;

impl EventList {
    fn new(ops: &[SearchOp]) -> Self {
        // (time, returns after invocations at the same instant, op)
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoke_ns, false, i));
            if !op.unknown {
                events.push((op.return_ns, true, i));
            }
        }
        events.sort_unstable();

        let sentinel = Node {
            prev: HEAD,
            next: TAIL,
            event: Event::Sentinel,
        };
        let mut list = EventList {
            nodes: vec![sentinel, sentinel],
            invoke_node: vec![0; ops.len()],
            return_node: vec![None; ops.len()],
        };
        let mut prev = HEAD;
        for (_, is_return, op) in events {
            let index = list.nodes.len();
            let event = if is_return {
                list.return_node[op] = Some(index);
                Event::Return
            } else {
                list.invoke_node[op] = index;
                Event::Invoke(op)
            };
            list.nodes.push(Node {
                prev,
                next: TAIL,
                event,
            });
            list.nodes[prev].next = index;
            prev = index;
        }
        list.nodes[TAIL].prev = prev;
        list
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn unlink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = next;
        self.nodes[next].prev = prev;
    }

    fn relink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = node;
        self.nodes[next].prev = node;
    }

    fn remove(&mut self, op: usize) {
        self.unlink(self.invoke_node[op]);
        if let Some(node) = self.return_node[op] {
            self.unlink(node);
        }
    }

    fn restore(&mut self, op: usize) {
        if let Some(node) = self.return_node[op] {
            self.relink(node);
        }
        self.relink(self.invoke_node[op]);
    }
}

/// A placed call, with what is needed to undo it.
struct Frame {
    op: usize,
    state_before: ValueId,
    /// Placed as the only option at its point (see `Search::run`), so
    /// undoing it also exhausts that point.
    forced: bool,
}

/// Searches for an order of `ops` that respects real time and the register,
/// placing every call with a known result.
fn search(ops: &[SearchOp], value_count: usize, budget: u64) -> Outcome {
    let bitset_words = ops.len().div_ceil(64);
    let known = determinate_count(ops);
    let mut observers = vec![0; value_count];
    let mut writers = vec![0; value_count];
    for op in ops {
        if let Some(value) = op.observed() {
            observers[value as usize] += 1;
        }
        if let Some(value) = op.op.may_write() {
            writers[value as usize] += 1;
        }
    }
    Search {
        ops,
        list: EventList::new(ops),
        bitset_words,
        memo_key: vec![0; bitset_words + 1],
        visited: HashSet::new(),
        stack: Vec::new(),
        state: ABSENT,
        known,
        unplaced_known: known,
        observers,
        writers,
        best: Best::default(),
        steps: 0,
        budget,
    }
    .run()
}

struct Search<'a> {
    ops: &'a [SearchOp],
    list: EventList,
    bitset_words: usize,
    /// The current configuration: the placed-set bitset, then one word
    /// holding the register value and whether the last placed call was
    /// indeterminate (which restricts what may come next).
    memo_key: Vec<u64>,
    /// Configurations already reached; none of them leads to a solution.
    visited: HashSet<Box<[u64]>>,
    stack: Vec<Frame>,
    state: ValueId,
    known: usize,
    unplaced_known: usize,
    /// Per value: unplaced calls with known results that observed it.
    observers: Vec<u32>,
    /// Per value: unplaced calls that may still write it.
    writers: Vec<u32>,
    best: Best,
    steps: u64,
    budget: u64,
}

impl Search<'_> {
    /// Depth-first search. `cursor` walks the event list from its head: an
    /// invocation is a candidate to place next; the first return reached
    /// belongs to an unplaced call that had to be placed by then, so the
    /// point is exhausted and the search backtracks.
    ///
    /// At each new point, a call with a known result that fits without
    /// changing the value (a read, a failed cas) is placed with no
    /// alternatives tried: it can be moved to the front of any valid
    /// continuation, since nothing unplaced had to precede it and it changes
    /// nothing for the calls after it.
    fn run(mut self) -> Outcome {
        let mut cursor = self.list.first();
        let mut new_point = true;
        while self.unplaced_known > 0 {
            if self.steps > self.budget {
                return Outcome::Inconclusive(std::mem::take(&mut self.best));
            }
            if new_point {
                new_point = false;
                if let Some(read) = self.state_preserving_candidate() {
                    if self.place(read, self.state, true) {
                        cursor = self.list.first();
                        new_point = true;
                        continue;
                    }
                    // Explored before, so this point fails as well.
                    cursor = TAIL;
                }
            }
            match self.list.nodes[cursor].event {
                Event::Invoke(i) => {
                    if let Some(next) = self.fit(i) {
                        if self.place(i, next, false) {
                            cursor = self.list.first();
                            new_point = true;
                            continue;
                        }
                    }
                    cursor = self.list.nodes[cursor].next;
                }
                Event::Return | Event::Sentinel => match self.backtrack() {
                    Some(resume) => cursor = resume,
                    None => return Outcome::NotLinearizable(std::mem::take(&mut self.best)),
                },
            }
        }
        Outcome::Linearizable
    }

    /// A candidate with a known result that fits the current value and
    /// leaves it unchanged.
    fn state_preserving_candidate(&self) -> Option<usize> {
        let mut cursor = self.list.first();
        while let Event::Invoke(i) = self.list.nodes[cursor].event {
            let op = &self.ops[i];
            if !op.unknown && op.op.apply(self.state) == Some(self.state) {
                return Some(i);
            }
            cursor = self.list.nodes[cursor].next;
        }
        None
    }

    /// Places `op`, leaving the register at `next_state`, unless that
    /// configuration was reached before.
    fn place(&mut self, op: usize, next_state: ValueId, forced: bool) -> bool {
        let unknown = self.ops[op].unknown;
        self.memo_key[op / 64] |= 1 << (op % 64);
        self.memo_key[self.bitset_words] = u64::from(next_state) | (u64::from(unknown) << 32);
        if self.visited.contains(&self.memo_key[..]) {
            self.memo_key[op / 64] &= !(1 << (op % 64));
            return false;
        }
        self.visited
            .insert(self.memo_key.clone().into_boxed_slice());
        self.steps += 1;
        self.stack.push(Frame {
            op,
            state_before: self.state,
            forced,
        });
        self.state = next_state;
        self.list.remove(op);
        self.count(op, -1);
        if !unknown {
            self.unplaced_known -= 1;
            let order_known = self.known - self.unplaced_known;
            if order_known > self.best.order_known {
                self.best = Best {
                    order: self.stack.iter().map(|frame| frame.op).collect(),
                    order_known,
                    state: self.state,
                };
            }
        }
        true
    }

    /// The register value after placing call `i` now, if that is consistent
    /// and worth exploring. Indeterminate calls are placed only when they
    /// change the value, and a blind write never directly follows another
    /// indeterminate call (it would erase it unseen, so the earlier one may as
    /// well not have happened). And the value may only change if no unplaced
    /// call still needs to observe it, or something can write it again.
    fn fit(&self, i: usize) -> Option<ValueId> {
        let op = &self.ops[i];
        let next = op.op.apply(self.state)?;
        if op.unknown {
            let after_unknown = self.stack.last().is_some_and(|f| self.ops[f.op].unknown);
            if next == self.state || (after_unknown && op.op.is_blind_write()) {
                return None;
            }
        }
        if next != self.state {
            let current = self.state as usize;
            let own = u32::from(op.observed() == Some(self.state));
            if self.observers[current] > own && self.writers[current] == 0 {
                return None;
            }
        }
        Some(next)
    }

    /// Adds `delta` to the observer and writer counts of call `i`.
    fn count(&mut self, i: usize, delta: i32) {
        let op = &self.ops[i];
        if let Some(value) = op.observed() {
            let n = &mut self.observers[value as usize];
            *n = n.wrapping_add_signed(delta);
        }
        if let Some(value) = op.op.may_write() {
            let n = &mut self.writers[value as usize];
            *n = n.wrapping_add_signed(delta);
        }
    }

    /// Undoes placements up to and including the last one that had
    /// alternatives, and returns where the scan of its point resumes: just
    /// after its invocation. `None` when there is nothing left to undo.
    fn backtrack(&mut self) -> Option<usize> {
        loop {
            let frame = self.stack.pop()?;
            self.list.restore(frame.op);
            self.memo_key[frame.op / 64] &= !(1 << (frame.op % 64));
            self.state = frame.state_before;
            self.count(frame.op, 1);
            if !self.ops[frame.op].unknown {
                self.unplaced_known += 1;
            }
            if !frame.forced {
                return Some(self.list.nodes[self.list.invoke_node[frame.op]].next);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Failure reports.

/// Where the deepest attempt got stuck: the unplaced call with the earliest
/// return, and every unplaced call with a known result that could have gone
/// before it.
struct Stuck {
    blocking: usize,
    candidates: Vec<usize>,
    /// Per search op: whether the deepest attempt placed it.
    placed: Vec<bool>,
}

impl Stuck {
    fn at(ops: &[SearchOp], best: &Best) -> Stuck {
        let mut placed = vec![false; ops.len()];
        for &op in &best.order {
            placed[op] = true;
        }
        let unplaced = || (0..ops.len()).filter(|&i| !placed[i] && !ops[i].unknown);
        let blocking = unplaced()
            .min_by_key(|&i| (ops[i].return_ns, i))
            .expect("a failed search leaves a call with a known result unplaced");
        let deadline = ops[blocking].return_ns;
        let candidates = unplaced()
            .filter(|&i| ops[i].invoke_ns <= deadline)
            .collect();
        Stuck {
            blocking,
            candidates,
            placed,
        }
    }
}

fn explain_failure(
    ops: &[SearchOp],
    values: &Values,
    best: &Best,
    stuck: &Stuck,
    reporter: &Reporter<'_>,
) -> String {
    let name_ops = |list: &[usize]| {
        let names: Vec<String> = list.iter().map(|&i| reporter.name(ops[i].call)).collect();
        names.join(", ")
    };
    let mut message = String::from("no linearization exists. ");
    if best.order.is_empty() {
        message
            .push_str("No call with a known result can be ordered first (the key starts absent).");
    } else {
        let tail_start = best.order.len().saturating_sub(MAX_NAMED_CALLS);
        message.push_str(&format!(
            "At best {} of {} calls with known results can be ordered consistently, ending with {}{}; \
             the value is then {}.",
            best.order_known,
            determinate_count(ops),
            if tail_start > 0 { "... " } else { "" },
            name_ops(&best.order[tail_start..]),
            values.show(best.state),
        ));
    }
    // Why a call cannot be placed next: either it reported another value,
    // or placing it would leave a call that saw the current value unable to
    // see it again (nothing unplaced writes it).
    let reason = |i: usize| match ops[i].op.apply(best.state) {
        None => format!(
            "it found {}",
            values.show(ops[i].observed().unwrap_or(ABSENT))
        ),
        Some(_) => {
            let needs_value =
                |j: &usize| *j != i && !stuck.placed[*j] && ops[*j].observed() == Some(best.state);
            match (0..ops.len()).find(needs_value) {
                Some(j) => format!(
                    "{} could then no longer find {}",
                    reporter.name(ops[j].call),
                    values.show(best.state)
                ),
                None => "nothing consistent can follow it".to_string(),
            }
        }
    };
    let blocking = &ops[stuck.blocking];
    message.push_str(&format!(
        " Next, {} must take effect by {} (when it returned), but {}.",
        reporter.name(blocking.call),
        show_time(blocking.return_ns),
        reason(stuck.blocking),
    ));
    let others: Vec<String> = stuck
        .candidates
        .iter()
        .filter(|&&i| i != stuck.blocking)
        .take(MAX_NAMED_CALLS)
        .map(|&i| format!("{}: {}", reporter.name(ops[i].call), reason(i)))
        .collect();
    if !others.is_empty() {
        let more = stuck.candidates.len() > others.len() + 1;
        message.push_str(&format!(
            " Nor can the other calls that could go first: {}{}.",
            others.join("; "),
            if more { "; ..." } else { "" }
        ));
    }
    message
}

/// Chooses which of a key's calls a violation lists (all of them, or a
/// window around `focus`) and names calls accordingly.
struct Reporter<'a> {
    key: &'a [u8],
    calls: &'a [Call],
    listed: std::ops::Range<usize>,
}

impl<'a> Reporter<'a> {
    fn new(key: &'a [u8], calls: &'a [Call], focus: usize) -> Self {
        let listed = if calls.len() <= MAX_LISTED_CALLS {
            0..calls.len()
        } else {
            let start = focus
                .saturating_sub(MAX_LISTED_CALLS / 2)
                .min(calls.len() - MAX_LISTED_CALLS);
            start..start + MAX_LISTED_CALLS
        };
        Reporter { key, calls, listed }
    }

    /// `#n (summary)` with n its position among the listed calls, or the
    /// summary alone for a call outside the list.
    fn name(&self, index: usize) -> String {
        let call = &self.calls[index];
        let summary = format!(
            "c{} {} => {}",
            call.client,
            show_op(&call.op),
            show_ret(&call.ret)
        );
        if self.listed.contains(&index) {
            format!("#{} ({summary})", index - self.listed.start)
        } else {
            format!(
                "({summary}, invoked at {}, not listed)",
                show_time(call.invoke_ns)
            )
        }
    }

    fn into_violation(self, mut message: String) -> Violation {
        if self.listed.len() < self.calls.len() {
            message.push_str(&format!(
                " (Listing the {} calls around the failure, of {} on this key.)",
                self.listed.len(),
                self.calls.len()
            ));
        }
        Violation {
            key: self.key.to_vec(),
            message,
            calls: self.calls[self.listed].to_vec(),
        }
    }
}

fn call_line(call: &Call) -> String {
    let returned = match call.ret {
        Ret::Unknown => "?".to_string(),
        _ => show_time(call.return_ns),
    };
    format!(
        "{:>16} .. {:>16}  c{:<3} {} => {}",
        show_time(call.invoke_ns),
        returned,
        call.client,
        show_op(&call.op),
        show_ret(&call.ret)
    )
}

fn show_time(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

fn show_bytes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() <= MAX_VALUE_CHARS {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX_VALUE_CHARS).collect();
        format!("{head:?}...")
    }
}

fn show_value(value: &Option<Vec<u8>>) -> String {
    value
        .as_deref()
        .map_or_else(|| "absent".to_string(), show_bytes)
}

fn show_op(op: &Op) -> String {
    match op {
        Op::Put(value) => format!("put {}", show_bytes(value)),
        Op::Get => "get".to_string(),
        Op::Delete => "delete".to_string(),
        Op::Cas { expected, value } => {
            format!("cas {} -> {}", show_value(expected), show_bytes(value))
        }
    }
}

fn show_ret(ret: &Ret) -> String {
    match ret {
        Ret::Put { previous } | Ret::Delete { previous } => {
            format!("ok, previous {}", show_value(previous))
        }
        Ret::Get { value } => show_value(value),
        Ret::Cas { succeeded, current } => format!(
            "{}, found {}",
            if *succeeded { "swapped" } else { "not swapped" },
            show_value(current)
        ),
        Ret::Unknown => "unknown".to_string(),
        Ret::Failed => "failed (no effect)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"k";

    fn bytes(text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    fn val(text: Option<&str>) -> Option<Vec<u8>> {
        text.map(bytes)
    }

    fn call(client: u32, op: Op, ret: Ret, invoke_ns: u64, return_ns: u64) -> Call {
        Call {
            client,
            key: KEY.to_vec(),
            op,
            ret,
            invoke_ns,
            return_ns,
        }
    }

    fn put(value: &str) -> Op {
        Op::Put(bytes(value))
    }

    fn cas(expected: Option<&str>, value: &str) -> Op {
        Op::Cas {
            expected: val(expected),
            value: bytes(value),
        }
    }

    fn put_ok(previous: Option<&str>) -> Ret {
        Ret::Put {
            previous: val(previous),
        }
    }

    fn got(value: Option<&str>) -> Ret {
        Ret::Get { value: val(value) }
    }

    fn deleted(previous: Option<&str>) -> Ret {
        Ret::Delete {
            previous: val(previous),
        }
    }

    fn cas_ret(succeeded: bool, current: Option<&str>) -> Ret {
        Ret::Cas {
            succeeded,
            current: val(current),
        }
    }

    #[track_caller]
    fn assert_rejected(history: &[Call]) -> Violation {
        match check(history) {
            Ok(report) => panic!("accepted a non-linearizable history ({report:?}): {history:#?}"),
            Err(violation) => {
                // The report must render; keep it in the test output.
                println!("{violation}");
                violation
            }
        }
    }

    #[track_caller]
    fn assert_accepted(history: &[Call]) -> Report {
        check(history).unwrap_or_else(|violation| panic!("rejected a valid history: {violation}"))
    }

    // --- histories that must be rejected ---------------------------------

    #[test]
    fn stale_read_of_absent_is_rejected() {
        assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(2, Op::Get, got(None), 20, 30),
        ]);
    }

    #[test]
    fn stale_read_of_older_value_is_rejected() {
        assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(1, put("b"), put_ok(Some("a")), 20, 30),
            call(2, Op::Get, got(Some("a")), 40, 50),
        ]);
    }

    #[test]
    fn lost_write_is_rejected() {
        assert_rejected(&[
            call(1, put("x"), put_ok(None), 0, 10),
            call(2, put("y"), put_ok(None), 20, 30),
        ]);
    }

    #[test]
    fn acknowledged_write_applied_twice_is_rejected() {
        assert_rejected(&[
            call(1, put("x"), put_ok(None), 0, 10),
            call(2, put("y"), put_ok(Some("x")), 20, 30),
            call(3, Op::Get, got(Some("x")), 40, 50),
        ]);
    }

    #[test]
    fn unknown_write_applied_twice_is_rejected() {
        let mut history = vec![
            call(1, put("x"), Ret::Unknown, 0, 5),
            call(2, Op::Get, got(Some("x")), 10, 20),
            call(3, put("y"), put_ok(Some("x")), 30, 40),
        ];
        // Up to here the unknown put took effect once: fine.
        assert_accepted(&history);
        history.push(call(2, Op::Get, got(Some("x")), 50, 60));
        assert_rejected(&history);
    }

    #[test]
    fn cas_reporting_failure_but_applied_is_rejected() {
        assert_rejected(&[
            call(1, put("w"), put_ok(None), 0, 10),
            call(2, cas(None, "v"), cas_ret(false, Some("w")), 20, 30),
            call(3, Op::Get, got(Some("v")), 40, 50),
        ]);
    }

    #[test]
    fn cas_reporting_failure_while_finding_expected_is_rejected() {
        let violation = assert_rejected(&[
            call(2, cas(None, "v"), cas_ret(false, None), 20, 30),
            call(3, Op::Get, got(Some("v")), 40, 50),
        ]);
        assert!(
            violation.message.contains("reported failure"),
            "{violation}"
        );
    }

    #[test]
    fn cas_reporting_overwritten_value_is_rejected() {
        assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(2, put("b"), put_ok(Some("a")), 20, 30),
            call(3, cas(Some("a"), "c"), cas_ret(true, Some("a")), 40, 50),
        ]);
        assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(2, put("b"), put_ok(Some("a")), 20, 30),
            call(3, cas(Some("z"), "c"), cas_ret(false, Some("a")), 40, 50),
        ]);
    }

    #[test]
    fn read_of_value_never_written_is_rejected() {
        let violation = assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 100),
            call(2, Op::Get, got(Some("ghost")), 10, 20),
        ]);
        assert!(violation.message.contains("ever wrote"), "{violation}");
        assert_eq!(violation.key, KEY);
        assert_eq!(violation.calls.len(), 2);
    }

    #[test]
    fn value_of_failed_write_is_never_written() {
        assert_rejected(&[
            call(1, put("a"), Ret::Failed, 0, 10),
            call(2, Op::Get, got(Some("a")), 20, 30),
        ]);
    }

    #[test]
    fn mismatched_result_is_rejected() {
        let violation = assert_rejected(&[call(1, put("a"), got(None), 0, 10)]);
        assert!(violation.message.contains("malformed"), "{violation}");
    }

    #[test]
    fn search_failure_names_the_stuck_call() {
        let violation = assert_rejected(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(1, put("b"), put_ok(Some("a")), 20, 30),
            call(2, Op::Get, got(Some("a")), 40, 50),
        ]);
        let message = &violation.message;
        assert!(message.contains("value is then \"a\""), "{violation}");
        assert!(message.contains("Next, #1 (c1 put \"b\""), "{violation}");
        assert!(
            message.contains("#2 (c2 get => \"a\") could then no longer find"),
            "{violation}"
        );
        let shown = violation.to_string();
        assert!(shown.contains("key \"k\""), "{shown}");
        assert!(shown.contains("0.000000040s"), "{shown}");
    }

    // --- histories that must be accepted ---------------------------------

    #[test]
    fn concurrent_puts_in_either_order_are_accepted() {
        assert_accepted(&[
            call(1, put("a"), put_ok(None), 0, 100),
            call(2, put("b"), put_ok(Some("a")), 10, 90),
            call(3, Op::Get, got(Some("b")), 200, 210),
        ]);
        assert_accepted(&[
            call(1, put("a"), put_ok(Some("b")), 0, 100),
            call(2, put("b"), put_ok(None), 10, 90),
            call(3, Op::Get, got(Some("a")), 200, 210),
        ]);
    }

    #[test]
    fn calls_touching_in_time_count_as_concurrent() {
        assert_accepted(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(2, Op::Get, got(None), 10, 20),
        ]);
    }

    #[test]
    fn unknown_put_taking_effect_after_it_returned_is_accepted() {
        assert_accepted(&[
            call(1, put("x"), Ret::Unknown, 0, 10),
            call(2, Op::Get, got(None), 20, 30),
            call(2, Op::Get, got(Some("x")), 1_000, 1_010),
        ]);
    }

    #[test]
    fn unknown_put_that_never_takes_effect_is_accepted() {
        assert_accepted(&[
            call(1, put("x"), Ret::Unknown, 0, 10),
            call(2, Op::Get, got(None), 20, 30),
            call(2, Op::Get, got(None), 100, 110),
        ]);
    }

    #[test]
    fn unknown_writes_can_chain() {
        assert_accepted(&[
            call(1, put("a"), Ret::Unknown, 0, 10),
            call(2, cas(Some("a"), "b"), Ret::Unknown, 0, 10),
            call(3, Op::Delete, Ret::Unknown, 0, 10),
            call(4, Op::Get, got(Some("b")), 20, 30),
            call(4, Op::Get, got(None), 40, 50),
        ]);
    }

    #[test]
    fn failed_calls_are_ignored() {
        let report = assert_accepted(&[
            call(1, put("x"), Ret::Failed, 0, 10),
            call(1, Op::Get, Ret::Unknown, 15, 18),
            call(2, Op::Get, got(None), 20, 30),
        ]);
        assert_eq!(
            report,
            Report {
                keys: 1,
                calls: 3,
                unknown: 1,
                failed: 1
            }
        );
    }

    #[test]
    fn delete_and_cas_round_trips_are_accepted() {
        assert_accepted(&[
            call(1, put("a"), put_ok(None), 0, 10),
            call(1, cas(Some("a"), "b"), cas_ret(true, Some("a")), 20, 30),
            call(2, Op::Delete, deleted(Some("b")), 40, 50),
            call(2, Op::Delete, deleted(None), 60, 70),
            call(3, cas(None, "c"), cas_ret(true, None), 80, 90),
            call(3, cas(Some("a"), "d"), cas_ret(false, Some("c")), 100, 110),
            call(1, Op::Get, got(Some("c")), 120, 130),
        ]);
    }

    #[test]
    fn keys_are_independent() {
        let mut other = call(2, Op::Get, got(None), 20, 30);
        other.key = bytes("other");
        let report = assert_accepted(&[call(1, put("a"), put_ok(None), 0, 10), other]);
        assert_eq!(report.keys, 2);
    }

    // --- randomized histories --------------------------------------------

    /// splitmix64: a tiny deterministic generator for test histories.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    /// The sequential register: applies `op` and returns its result.
    fn apply(register: &mut Option<Vec<u8>>, op: &Op) -> Ret {
        match op {
            Op::Put(value) => Ret::Put {
                previous: register.replace(value.clone()),
            },
            Op::Get => Ret::Get {
                value: register.clone(),
            },
            Op::Delete => Ret::Delete {
                previous: register.take(),
            },
            Op::Cas { expected, value } => {
                let current = register.clone();
                let succeeded = current == *expected;
                if succeeded {
                    *register = Some(value.clone());
                }
                Ret::Cas { succeeded, current }
            }
        }
    }

    struct Shape {
        clients: u32,
        ops_per_client: usize,
        keys: usize,
        unknown_pct: u64,
        failed_pct: u64,
        /// Longest call duration; calls start 0..20 ns after the previous
        /// one of the same client, so about `clients` calls overlap.
        max_duration: u64,
    }

    /// Builds a valid history: each client issues calls back to back, every
    /// call that takes effect gets a random linearization point (inside its
    /// interval, or for some indeterminate calls after it), and results come
    /// from applying the calls to a register in that order.
    fn simulate(seed: u64, shape: &Shape) -> Vec<Call> {
        let mut rng = Rng(seed);
        let mut next_free = vec![0u64; shape.clients as usize];
        let mut recent: Vec<Vec<Vec<u8>>> = vec![Vec::new(); shape.keys];
        let mut calls = Vec::new();
        let mut points: Vec<(u64, usize)> = Vec::new();
        for n in 0..shape.clients as usize * shape.ops_per_client {
            // The client that is free first issues the next call.
            let client = (0..next_free.len())
                .min_by_key(|&c| (next_free[c], c))
                .unwrap();
            let key = rng.below(shape.keys as u64) as usize;
            let fresh = format!("c{client}-{n}").into_bytes();
            let op = match rng.below(100) {
                0..=34 => Op::Put(fresh.clone()),
                35..=64 => Op::Get,
                65..=74 => Op::Delete,
                _ => {
                    let expected = match rng.below(4) {
                        0 => None,
                        _ => {
                            let last = &recent[key];
                            let back = rng.below(3) as usize + 1;
                            last.len().checked_sub(back).map(|i| last[i].clone())
                        }
                    };
                    Op::Cas {
                        expected,
                        value: fresh.clone(),
                    }
                }
            };
            if !matches!(op, Op::Get | Op::Delete) {
                recent[key].push(fresh);
            }
            let invoke_ns = next_free[client] + rng.below(20);
            let duration = 1 + rng.below(shape.max_duration);
            let return_ns = invoke_ns + duration;
            next_free[client] = return_ns;
            let within = invoke_ns + rng.below(duration + 1);
            let (ret, point) = if rng.percent(shape.failed_pct) {
                (Ret::Failed, None)
            } else if rng.percent(shape.unknown_pct) {
                let point = match rng.below(3) {
                    0 => None,
                    1 => Some(within),
                    _ => Some(return_ns + rng.below(5 * shape.max_duration)),
                };
                (Ret::Unknown, point)
            } else {
                (Ret::Get { value: None }, Some(within)) // result filled in below
            };
            if let Some(point) = point {
                points.push((point, calls.len()));
            }
            calls.push(Call {
                client: client as u32,
                key: format!("key{key}").into_bytes(),
                op,
                ret,
                invoke_ns,
                return_ns,
            });
        }

        points.sort_unstable();
        let mut registers: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (_, i) in points {
            let call = &mut calls[i];
            let ret = apply(registers.entry(call.key.clone()).or_default(), &call.op);
            if call.ret != Ret::Unknown {
                call.ret = ret;
            }
        }
        calls
    }

    const MIXED: Shape = Shape {
        clients: 8,
        ops_per_client: 40,
        keys: 4,
        unknown_pct: 10,
        failed_pct: 5,
        max_duration: 200,
    };

    #[test]
    fn random_valid_histories_are_accepted() {
        for seed in 0..30 {
            let history = simulate(seed, &MIXED);
            let report = check(&history)
                .unwrap_or_else(|violation| panic!("seed {seed} rejected: {violation}"));
            assert_eq!(report.calls, history.len());
            assert_eq!(report.keys, MIXED.keys);
        }
    }

    #[test]
    fn random_history_with_a_read_of_an_unwritten_value_is_rejected() {
        for seed in 0..10 {
            let mut history = simulate(seed, &MIXED);
            let read = history
                .iter()
                .position(|call| matches!(call.ret, Ret::Get { .. }))
                .unwrap();
            history[read].ret = Ret::Get {
                value: Some(bytes("never written")),
            };
            assert!(check(&history).is_err(), "seed {seed}");
        }
    }

    /// Makes the last read it can return a value that an acknowledged put
    /// had written and an acknowledged put or delete had overwritten, both
    /// before the read began. With unique values, no order explains that.
    fn plant_stale_read(history: &mut [Call]) -> bool {
        for read in (0..history.len()).rev() {
            let r = &history[read];
            if !matches!(r.ret, Ret::Get { .. }) {
                continue;
            }
            let done_before = |c: &Call, t: u64| c.key == r.key && c.return_ns < t;
            let stale = history
                .iter()
                .filter(|w| matches!(w.ret, Ret::Put { .. } | Ret::Delete { .. }))
                .filter(|w| done_before(w, r.invoke_ns))
                .find_map(|w| {
                    history.iter().find_map(|p| match (&p.op, &p.ret) {
                        (Op::Put(value), Ret::Put { .. }) if done_before(p, w.invoke_ns) => {
                            Some(value.clone())
                        }
                        _ => None,
                    })
                });
            if let Some(value) = stale {
                history[read].ret = Ret::Get { value: Some(value) };
                return true;
            }
        }
        false
    }

    #[test]
    fn random_history_with_a_stale_read_is_rejected() {
        for seed in 0..10 {
            let mut history = simulate(seed, &MIXED);
            assert!(
                plant_stale_read(&mut history),
                "seed {seed}: no stale read to plant"
            );
            let violation = check(&history).expect_err("stale read accepted");
            assert!(
                violation.message.contains("no linearization"),
                "{violation}"
            );
        }
    }

    #[test]
    fn busy_single_key_with_unknowns_checks_quickly() {
        let shape = Shape {
            clients: 10,
            ops_per_client: 40,
            keys: 1,
            unknown_pct: 15,
            failed_pct: 0,
            max_duration: 200,
        };
        for seed in 0..3 {
            let history = simulate(seed, &shape);
            let report = check(&history)
                .unwrap_or_else(|violation| panic!("seed {seed} rejected: {violation}"));
            assert_eq!(report.calls, 400);
            assert!(report.unknown > 30, "{report:?}");
        }
    }

    #[test]
    fn exhausted_budget_is_reported_as_inconclusive() {
        let mut history = simulate(7, &MIXED);
        history.retain(|call| call.key == b"key0");
        history.sort_by_key(|call| call.invoke_ns);
        let violation = check_key(b"key0", history, 10).expect_err("budget of 10 sufficed");
        assert!(violation.message.starts_with("inconclusive"), "{violation}");
    }

    #[test]
    fn long_histories_list_a_window_around_the_failure() {
        let mut history: Vec<Call> = (0..500)
            .map(|i| call(1, Op::Get, got(None), i * 10, i * 10 + 5))
            .collect();
        history[300].ret = got(Some("a"));
        history.push(call(2, put("a"), put_ok(None), 2_990, 3_020));
        let violation = assert_rejected(&history);
        assert_eq!(violation.calls.len(), MAX_LISTED_CALLS);
        assert!(
            violation.message.contains("around the failure"),
            "{violation}"
        );
        assert!(violation.to_string().lines().count() <= MAX_LISTED_CALLS + 3);
    }

    /// Whether the history (one key) is linearizable, decided by trying
    /// every subset of its indeterminate calls in every order.
    fn brute_force(history: &[Call]) -> bool {
        let calls: Vec<&Call> = history.iter().filter(|c| c.ret != Ret::Failed).collect();
        let unknown: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].ret == Ret::Unknown)
            .collect();
        (0..1u32 << unknown.len()).any(|subset| {
            let chosen: Vec<usize> = (0..calls.len())
                .filter(|i| match unknown.iter().position(|u| u == i) {
                    Some(bit) => subset & (1 << bit) != 0,
                    None => true,
                })
                .collect();
            can_order(&calls, &chosen, &None)
        })
    }

    /// Whether the `rest` of the calls can follow a register holding
    /// `register`, in some order that respects real time.
    fn can_order(calls: &[&Call], rest: &[usize], register: &Option<Vec<u8>>) -> bool {
        rest.is_empty()
            || rest.iter().enumerate().any(|(k, &i)| {
                let must_wait = rest.iter().any(|&j| {
                    calls[j].ret != Ret::Unknown && calls[j].return_ns < calls[i].invoke_ns
                });
                let mut after = register.clone();
                let ret = apply(&mut after, &calls[i].op);
                let fits = calls[i].ret == Ret::Unknown || calls[i].ret == ret;
                !must_wait && fits && {
                    let mut left = rest.to_vec();
                    left.remove(k);
                    can_order(calls, &left, &after)
                }
            })
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng(1);
        // Few distinct values, so writes repeat values and results collide.
        let value = |rng: &mut Rng| ["a", "b", "c"].get(rng.below(4) as usize).map(|v| bytes(v));
        let (mut accepted, mut rejected) = (0, 0);
        for round in 0..3_000 {
            let mut register = None;
            let sequential = rng.percent(50);
            let history: Vec<Call> = (0..1 + rng.below(6))
                .map(|n| {
                    let op = match rng.below(4) {
                        0 => Op::Put(value(&mut rng).unwrap_or_else(|| bytes("a"))),
                        1 => Op::Get,
                        2 => Op::Delete,
                        _ => Op::Cas {
                            expected: value(&mut rng),
                            value: value(&mut rng).unwrap_or_else(|| bytes("b")),
                        },
                    };
                    // Mostly sequential results at staggered times, or
                    // arbitrary results at random times.
                    let invoke_ns = if sequential {
                        n * 3 + rng.below(4)
                    } else {
                        rng.below(10)
                    };
                    let ret = match rng.below(10) {
                        0..=2 => Ret::Unknown,
                        3 => Ret::Failed,
                        _ if sequential => apply(&mut register, &op),
                        _ => {
                            let mut arbitrary = value(&mut rng);
                            let ret = apply(&mut arbitrary, &op);
                            if rng.percent(50) {
                                apply(&mut register, &op)
                            } else {
                                ret
                            }
                        }
                    };
                    call(n as u32, op, ret, invoke_ns, invoke_ns + rng.below(7))
                })
                .collect();
            let expected = brute_force(&history);
            assert_eq!(
                check(&history).is_ok(),
                expected,
                "round {round}: {history:#?}"
            );
            if expected {
                accepted += 1;
            } else {
                rejected += 1;
            }
        }
        // Both outcomes are well represented.
        assert!(
            accepted > 500 && rejected > 500,
            "{accepted} accepted, {rejected} rejected"
        );
    }
}

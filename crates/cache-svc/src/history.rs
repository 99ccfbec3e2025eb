//! Recording concurrent register histories and checking them for linearizability.
//!
//! # What is checked
//!
//! Tests drive many concurrent clients against the cache and record every
//! operation as an [`Event`]: which key it touched, what it did or observed, when
//! it was invoked and when (if ever) it completed. Each key is modelled as a
//! *register* holding either a byte string or nothing (absent). A history is
//! **linearizable** if every operation can be assigned a single instant, its
//! *linearization point*, such that
//!
//! 1. the point lies between the operation's invocation and its completion
//!    (so an operation that completed before another was invoked also takes
//!    effect before it: real-time order is respected), and
//! 2. replaying the operations one at a time in the order of their points
//!    against a plain sequential register reproduces every result that was
//!    actually observed.
//!
//! Linearizability is *local* (Herlihy & Wing): a history is linearizable iff
//! its restriction to each object is. [`check`] therefore splits the history by
//! key and checks every key on its own, which keeps the search small.
//!
//! Timestamps are compared leniently: if one operation completes at exactly the
//! nanosecond another is invoked, the two are treated as concurrent.
//!
//! # Operations with an unknown outcome
//!
//! An event with `complete: None` is one whose outcome the client never learned
//! (a timeout, a dropped connection, an ambiguous error):
//!
//! * **Reads** whose result is unknown say nothing about the register and are
//!   dropped before checking.
//! * **Writes and deletes** whose outcome is unknown may have taken effect at any
//!   instant after their invocation, arbitrarily late, or never. The checker
//!   treats them as having no completion deadline and never *requires* them to
//!   be linearized. Because a write is only observable through reads that return
//!   its value, such an operation is only ever considered while some
//!   not-yet-linearized read still observes its value; ones nobody could have
//!   observed are discarded up front.
//!
//! # Algorithm
//!
//! The search is the Wing & Gong depth-first search with the memoization
//! introduced by Lowe ("Testing for linearizability", 2017) and used by Knossos
//! and Porcupine, often called *WGL*:
//!
//! * Operations are sorted by invocation time. At any point of the search the
//!   set of operations that may be linearized next are the *minimal* ones: not
//!   yet linearized and invoked no later than the earliest completion among the
//!   remaining completed operations (anything invoked later would have to follow
//!   that operation in real time).
//! * The search picks a minimal operation that is legal in the current register
//!   state, applies it and recurses; on a dead end it backtracks and tries the
//!   next candidate. It succeeds once every completed operation is linearized.
//! * Every configuration reached, i.e. the pair (set of linearized operations,
//!   register value), is remembered. Reaching it again by a different order can
//!   lead nowhere new, so that branch is cut. This is what turns the naive
//!   factorial search into something practical.
//!
//! On top of that the checker applies a few sound reductions:
//!
//! * **Eager reads.** A minimal read that matches the current value is
//!   linearized immediately without branching: a read does not change the
//!   state, and doing it as early as possible only relaxes the real-time
//!   constraints on everything else.
//! * **Blocked reads.** If the remaining operation with the earliest completion
//!   is a read, some write of the value it observed must be linearized before
//!   it, and every such write is already minimal. If no candidate writes that
//!   value the branch is dead.
//! * **Interchangeable unknown-outcome writes.** Two minimal unknown-outcome
//!   writes of the same value stay minimal forever and have identical effects, so
//!   only one of them is tried at each step.
//! * **Stale and impossible reads** are reported before any search, in
//!   O(n log n): a read's value must come from the *last* write linearized
//!   before it (or be the initial value), so a write cannot be its source if it
//!   was invoked after the read completed, or if another completed write was
//!   invoked after it completed and completed before the read was invoked. This
//!   catches the most common bug with a precise message and, unlike the search,
//!   stays cheap however long the history is.
//!
//! The set of linearized operations is stored compactly in the memo: every
//! completed operation before the first remaining one is necessarily linearized,
//! and linearized ones after it must have been invoked before it completed, so a
//! configuration is represented as (first remaining index, the few linearized
//! operations past it, register value).
//!
//! # Complexity and limits
//!
//! Checking linearizability is NP-complete in general (Gibbons & Korach), and no
//! algorithm avoids exponential worst cases. With memoization the number of
//! configurations is bounded roughly by `ops × 2^concurrency × distinct values`,
//! and for histories produced by a correct implementation the search almost
//! never backtracks, so ~5,000 operations per key with ~16 concurrent clients
//! check in well under a second. Violations the pre-check cannot see (such as
//! two sequential reads observing concurrent writes in opposite orders) are
//! the expensive case: to prove that *no* order works the search may have to
//! exhaust every configuration before the violation, which for thousands of
//! operations with 16 clients can exceed the budget, so tests that expect such
//! a violation should keep their histories short. Long runs of unknown-outcome writes also widen the
//! search. Each key's search is capped at a step budget
//! ([`DEFAULT_SEARCH_BUDGET`] for [`check`]); exceeding it yields a
//! [`Violation`] whose message is `"search budget exhausted"`, meaning
//! "undecided" rather than "wrong".

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// The value of a key: `None` means the key is absent.
pub type Value = Option<Vec<u8>>;

/// Number of search steps (candidate operations tried) allowed per key by [`check`].
pub const DEFAULT_SEARCH_BUDGET: u64 = 5_000_000;

/// The message of a [`Violation`] returned when the search gave up.
pub const BUDGET_EXHAUSTED: &str = "search budget exhausted";

/// What a recorded operation did to, or saw of, one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read that returned `observed`.
    Read { observed: Value },
    /// A set to `value` (including a successful compare-and-set).
    Write { value: Vec<u8> },
    /// A delete (the key becomes absent).
    Delete,
}

/// One operation of one client on one key.
#[derive(Clone, Debug)]
pub struct Event {
    /// Identifies the client; only used in explanations.
    pub client: u64,
    pub key: Vec<u8>,
    pub op: Op,
    /// When the operation was invoked, in ns since the test started ([`History::now`]).
    pub invoke: u64,
    /// When the operation completed, or `None` if its outcome is unknown (write
    /// timed out or errored ambiguously): it may take effect at any point after
    /// `invoke`, or never. Reads with an unknown outcome are ignored.
    pub complete: Option<u64>,
}

/// A thread-safe recorder of [`Event`]s sharing one clock.
///
/// Typical use from a client task:
///
/// ```ignore
/// let t = h.now();
/// let observed = client.get(&key).await?;
/// h.record(Event { client: id, key, op: Op::Read { observed }, invoke: t, complete: Some(h.now()) });
/// ```
///
/// Take `invoke` *before* sending the request and `complete` *after* the
/// response arrived, so the real linearization point lies inside the interval.
#[derive(Debug)]
pub struct History {
    events: Mutex<Vec<Event>>,
    start: Instant,
}

impl History {
    pub fn new() -> Arc<Self> {
        Arc::new(History {
            events: Mutex::new(Vec::new()),
            start: Instant::now(),
        })
    }

    /// Nanoseconds since this history was created, from a monotonic clock.
    pub fn now(&self) -> u64 {
        // Saturating is fine: u64 nanoseconds cover ~584 years.
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, e: Event) {
        self.lock().push(e);
    }

    /// A snapshot of everything recorded so far, in recording order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        // A client task that panicked must not hide the history from the
        // checker: the events recorded so far are still valid.
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a history is not linearizable (or could not be decided).
#[derive(Debug)]
pub struct Violation {
    /// The key whose sub-history failed.
    pub key: Vec<u8>,
    /// A human-readable explanation, or [`BUDGET_EXHAUSTED`].
    pub message: String,
}

impl Violation {
    /// True if the search gave up rather than finding a violation.
    pub fn is_budget_exhausted(&self) -> bool {
        self.message == BUDGET_EXHAUSTED
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}: {}", show_bytes(&self.key), self.message)
    }
}

impl std::error::Error for Violation {}

/// Checks every key's sub-history independently; `initial` is the state of
/// every key before the history (usually `None`).
///
/// Returns the number of operations that took part in the check (every event
/// except reads with an unknown outcome), or the first violating key in key
/// order with an explanation: the operation that could not be placed, the
/// register value at the furthest point the search reached, and the operations
/// concurrent with it.
pub fn check(events: &[Event], initial: &Value) -> Result<usize, Violation> {
    check_with_budget(events, initial, DEFAULT_SEARCH_BUDGET)
}

/// [`check`] with an explicit per-key search budget.
pub fn check_with_budget(
    events: &[Event],
    initial: &Value,
    budget: u64,
) -> Result<usize, Violation> {
    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    let mut checked = 0;
    for (i, e) in events.iter().enumerate() {
        if let Some(c) = e.complete {
            if c < e.invoke {
                return Err(Violation {
                    key: e.key.clone(),
                    message: format!("malformed event: {}", describe(e)),
                });
            }
        }
        if matches!(e.op, Op::Read { .. }) && e.complete.is_none() {
            continue;
        }
        by_key.entry(e.key.as_slice()).or_default().push(i);
        checked += 1;
    }
    for (key, indices) in by_key {
        check_key(events, &indices, initial.as_deref(), budget).map_err(|message| Violation {
            key: key.to_vec(),
            message,
        })?;
    }
    Ok(checked)
}

/// The register model only distinguishes reads from state changes: a delete is
/// a write of "absent".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

/// An operation of one key's sub-history, with values interned to small ids so
/// the search compares and memoizes integers instead of byte strings.
#[derive(Clone, Copy, Debug)]
struct KeyOp {
    invoke: u64,
    /// `u64::MAX` for unknown-outcome writes: they have no deadline.
    deadline: u64,
    known: bool,
    kind: Kind,
    value: u32,
    /// Index into the caller's events, for explanations.
    event: usize,
}

fn check_key(
    events: &[Event],
    indices: &[usize],
    initial: Option<&[u8]>,
    budget: u64,
) -> Result<(), String> {
    let mut values: Vec<Option<&[u8]>> = vec![initial];
    let mut ids: HashMap<Option<&[u8]>, u32> = HashMap::from([(initial, 0)]);
    let mut ops: Vec<KeyOp> = indices
        .iter()
        .map(|&event| {
            let e = &events[event];
            let (kind, v) = match &e.op {
                Op::Read { observed } => (Kind::Read, observed.as_deref()),
                Op::Write { value } => (Kind::Write, Some(value.as_slice())),
                Op::Delete => (Kind::Write, None),
            };
            let value = *ids.entry(v).or_insert_with(|| {
                values.push(v);
                u32::try_from(values.len() - 1).expect("fewer than 2^32 distinct values")
            });
            KeyOp {
                invoke: e.invoke,
                deadline: e.complete.unwrap_or(u64::MAX),
                known: e.complete.is_some(),
                kind,
                value,
                event,
            }
        })
        .collect();

    check_reads_explainable(events, &ops, values.len())?;

    // An unknown-outcome write is only observable through a read of its value
    // that completes after it was invoked; without one, leaving it out of the
    // linearization is always at least as good as including it.
    let mut last_read: Vec<Option<u64>> = vec![None; values.len()];
    for op in ops.iter().filter(|op| op.kind == Kind::Read) {
        let last = &mut last_read[op.value as usize];
        *last = (*last).max(Some(op.deadline));
    }
    ops.retain(|op| op.known || last_read[op.value as usize].is_some_and(|l| l >= op.invoke));
    ops.sort_by_key(|op| op.invoke);

    Search::new(events, indices, ops, values).run(budget)
}

/// A fast necessary condition that catches the most common bug, a stale or
/// invented read, with a precise explanation and without any search (which,
/// to prove a violation, may have to exhaust everything before it).
///
/// The value a read returns was written by the last write linearized before
/// it, or is the initial value if there is none. A write `w` cannot be that
/// last write if it was invoked after the read completed, or if some completed
/// write was invoked after `w` completed and itself completed before the read
/// was invoked: that write necessarily lies in between, whatever its value.
fn check_reads_explainable(events: &[Event], ops: &[KeyOp], n_values: usize) -> Result<(), String> {
    /// A write that may have produced a value, and until when that value can
    /// survive in the register at most.
    #[derive(Clone, Copy)]
    struct Source {
        invoke: u64,
        /// `u64::MAX` if nothing definitely overwrites it.
        survives_until: u64,
        /// `None` for the initial value.
        write: Option<usize>,
        /// The event that definitely overwrites it, if any.
        overwriter: Option<usize>,
    }

    let mut writes: Vec<&KeyOp> = ops
        .iter()
        .filter(|op| op.kind == Kind::Write && op.known)
        .collect();
    writes.sort_by_key(|op| op.invoke);
    // earliest_done[i]: the earliest completion (and its event) among the
    // completed writes invoked at or after writes[i].
    let mut earliest_done: Vec<Option<(u64, usize)>> = vec![None; writes.len() + 1];
    for i in (0..writes.len()).rev() {
        let here = (writes[i].deadline, writes[i].event);
        earliest_done[i] = Some(earliest_done[i + 1].map_or(here, |later| later.min(here)));
    }
    let source = |invoke, write, overwritten: Option<(u64, usize)>| Source {
        invoke,
        survives_until: overwritten.map_or(u64::MAX, |(at, _)| at),
        write,
        overwriter: overwritten.map(|(_, e)| e),
    };

    let mut sources: Vec<Vec<Source>> = vec![Vec::new(); n_values];
    // Any completed write at all lies between "the start" and a read invoked
    // after it completed.
    sources[0].push(source(0, None, earliest_done[0]));
    for op in ops.iter().filter(|op| op.kind == Kind::Write) {
        // An unknown-outcome write may take effect arbitrarily late, so
        // nothing definitely overwrites it.
        let overwritten = if op.known {
            earliest_done[writes.partition_point(|w| w.invoke <= op.deadline)]
        } else {
            None
        };
        sources[op.value as usize].push(source(op.invoke, Some(op.event), overwritten));
    }
    // Sort each value's sources by invocation and keep a running best, so a
    // read only needs a binary search for the sources invoked before it ended.
    for list in &mut sources {
        list.sort_by_key(|s| s.invoke);
        for i in 1..list.len() {
            let (prev, cur) = (list[i - 1], list[i]);
            if prev.survives_until > cur.survives_until {
                list[i] = Source {
                    invoke: cur.invoke,
                    ..prev
                };
            }
        }
    }

    for read in ops.iter().filter(|op| op.kind == Kind::Read) {
        let list = &sources[read.value as usize];
        let usable = list.partition_point(|s| s.invoke <= read.deadline);
        let Some(best) = usable.checked_sub(1).map(|i| list[i]) else {
            return Err(format!(
                "impossible read: {} observed a value that no write invoked before the read \
                 completed could have produced",
                describe(&events[read.event])
            ));
        };
        if best.survives_until < read.invoke {
            let produced_by = best
                .write
                .map_or_else(|| "the initial value".to_owned(), |w| describe(&events[w]));
            let overwriter = best
                .overwriter
                .map_or_else(String::new, |w| describe(&events[w]));
            return Err(format!(
                "stale read: {} returned a value overwritten before the read was invoked; \
                 even its longest-lived source, {produced_by}, was certainly followed by {overwriter}",
                describe(&events[read.event])
            ));
        }
    }
    Ok(())
}

/// The operations linearized on the way into one search node, with the value
/// the register held before each, so the node can be undone on backtracking.
struct Frame {
    applied: Vec<(usize, u32)>,
    candidates: Vec<usize>,
    next: usize,
}

/// The memo key: first remaining completed op, register value, and the sorted
/// linearized ops past that index (plus all linearized unknown-outcome ops).
type Config = (usize, u32, Box<[usize]>);

/// Where the search got furthest; the best place to look for the culprit.
struct Furthest {
    linearized: usize,
    blocking: usize,
    state: u32,
}

struct Search<'a> {
    events: &'a [Event],
    /// All of this key's events (including discarded unknown-outcome writes),
    /// so explanations can mention everything that was going on.
    key_events: &'a [usize],
    ops: Vec<KeyOp>,
    values: Vec<Option<&'a [u8]>>,
    /// Indices of unknown-outcome writes, in invocation order.
    unknown: Vec<usize>,
    completed: usize,

    linearized: Vec<bool>,
    /// Completed ops not yet linearized, by index (that is, invocation order).
    remaining: BTreeSet<usize>,
    /// The same ops by completion time, to find the earliest deadline.
    deadlines: BTreeSet<(u64, usize)>,
    /// Per value id: completed reads of it not yet linearized.
    pending_reads: Vec<u32>,
    /// Linearized unknown-outcome writes, in the order they were applied.
    unknown_applied: Vec<usize>,
    state: u32,
}

impl<'a> Search<'a> {
    fn new(
        events: &'a [Event],
        key_events: &'a [usize],
        ops: Vec<KeyOp>,
        values: Vec<Option<&'a [u8]>>,
    ) -> Self {
        let mut pending_reads = vec![0; values.len()];
        let mut remaining = BTreeSet::new();
        let mut deadlines = BTreeSet::new();
        let mut unknown = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if op.known {
                remaining.insert(i);
                deadlines.insert((op.deadline, i));
                if op.kind == Kind::Read {
                    pending_reads[op.value as usize] += 1;
                }
            } else {
                unknown.push(i);
            }
        }
        Search {
            events,
            key_events,
            linearized: vec![false; ops.len()],
            completed: remaining.len(),
            ops,
            values,
            unknown,
            remaining,
            deadlines,
            pending_reads,
            unknown_applied: Vec::new(),
            state: 0,
        }
    }

    fn run(mut self, budget: u64) -> Result<(), String> {
        let mut applied = Vec::new();
        self.eager_reads(&mut applied);
        if self.remaining.is_empty() {
            return Ok(());
        }
        let mut visited: HashSet<Config> = HashSet::new();
        visited.insert(self.config());
        let mut furthest = Furthest {
            linearized: 0,
            blocking: 0,
            state: 0,
        };
        self.note_progress(&mut furthest);
        let mut stack = vec![Frame {
            applied,
            candidates: self.candidates(),
            next: 0,
        }];
        let mut steps = 0u64;

        while let Some(top) = stack.last_mut() {
            let Some(&candidate) = top.candidates.get(top.next) else {
                // Every continuation from this node failed: undo it.
                for &(i, prev) in top.applied.iter().rev() {
                    self.undo(i, prev);
                }
                stack.pop();
                continue;
            };
            top.next += 1;
            steps += 1;
            if steps > budget {
                return Err(BUDGET_EXHAUSTED.to_owned());
            }

            let mut applied = vec![(candidate, self.apply(candidate))];
            self.eager_reads(&mut applied);
            if self.remaining.is_empty() {
                return Ok(());
            }
            if !visited.insert(self.config()) {
                for &(i, prev) in applied.iter().rev() {
                    self.undo(i, prev);
                }
                continue;
            }
            self.note_progress(&mut furthest);
            let candidates = self.candidates();
            stack.push(Frame {
                applied,
                candidates,
                next: 0,
            });
        }
        Err(self.explain(&furthest))
    }

    /// Linearizes op `i` and returns the register value before it.
    fn apply(&mut self, i: usize) -> u32 {
        let op = self.ops[i];
        self.linearized[i] = true;
        if op.known {
            self.remaining.remove(&i);
            self.deadlines.remove(&(op.deadline, i));
        } else {
            self.unknown_applied.push(i);
        }
        let prev = self.state;
        match op.kind {
            Kind::Read => self.pending_reads[op.value as usize] -= 1,
            Kind::Write => self.state = op.value,
        }
        prev
    }

    fn undo(&mut self, i: usize, prev: u32) {
        let op = self.ops[i];
        self.linearized[i] = false;
        if op.known {
            self.remaining.insert(i);
            self.deadlines.insert((op.deadline, i));
        } else {
            let popped = self.unknown_applied.pop();
            debug_assert_eq!(popped, Some(i), "undo must mirror apply order");
        }
        if op.kind == Kind::Read {
            self.pending_reads[op.value as usize] += 1;
        }
        self.state = prev;
    }

    /// Ops invoked after this instant must wait for the op completing at it.
    fn horizon(&self) -> u64 {
        self.deadlines.first().map_or(u64::MAX, |&(d, _)| d)
    }

    /// Linearizes every minimal read matching the current value. Repeats
    /// because each one may raise the horizon and make further reads minimal.
    fn eager_reads(&mut self, applied: &mut Vec<(usize, u32)>) {
        loop {
            let horizon = self.horizon();
            let matching: Vec<usize> = self
                .remaining
                .iter()
                .copied()
                .take_while(|&i| self.ops[i].invoke <= horizon)
                .filter(|&i| self.ops[i].kind == Kind::Read && self.ops[i].value == self.state)
                .collect();
            if matching.is_empty() {
                return;
            }
            for i in matching {
                applied.push((i, self.apply(i)));
            }
        }
    }

    /// The writes worth trying next, most promising first. Minimal reads never
    /// appear: after `eager_reads` none of them matches the current value.
    fn candidates(&self) -> Vec<usize> {
        let horizon = self.horizon();
        let mut out: Vec<usize> = self
            .remaining
            .iter()
            .copied()
            .take_while(|&i| self.ops[i].invoke <= horizon)
            .filter(|&i| self.ops[i].kind == Kind::Write)
            .collect();

        let mut tried_values = Vec::new();
        for &i in &self.unknown {
            let op = &self.ops[i];
            if op.invoke > horizon {
                break;
            }
            // Skip if already applied, if it would not change anything, if no
            // pending read could observe it, or if an interchangeable one is
            // already a candidate.
            if self.linearized[i]
                || op.value == self.state
                || self.pending_reads[op.value as usize] == 0
                || tried_values.contains(&op.value)
            {
                continue;
            }
            tried_values.push(op.value);
            out.push(i);
        }

        // The remaining op with the earliest deadline must be linearized before
        // anything invoked after it completes. If it is a read, the write it
        // observed has to come first and is necessarily among the candidates.
        let wanted = self
            .deadlines
            .first()
            .map(|&(_, m)| self.ops[m])
            .filter(|m| m.kind == Kind::Read)
            .map(|m| m.value);
        if let Some(wanted) = wanted {
            if !out.iter().any(|&i| self.ops[i].value == wanted) {
                return Vec::new();
            }
        }
        // Writes that unblock that read first, then the most urgent ones: on
        // histories from a correct system this makes backtracking rare.
        out.sort_by_key(|&i| (Some(self.ops[i].value) != wanted, self.ops[i].deadline));
        out
    }

    fn config(&self) -> Config {
        let first = *self.remaining.first().expect("search is not finished");
        // Linearized completed ops past `first` were minimal while `first` was
        // pending, so they were invoked no later than it completes.
        let limit = self.ops[first].deadline;
        let mut extra: Vec<usize> = (first + 1..self.ops.len())
            .take_while(|&i| self.ops[i].invoke <= limit)
            .filter(|&i| self.linearized[i] && self.ops[i].known)
            .chain(self.unknown_applied.iter().copied())
            .collect();
        extra.sort_unstable();
        (first, self.state, extra.into_boxed_slice())
    }

    fn note_progress(&self, furthest: &mut Furthest) {
        let linearized = self.completed - self.remaining.len();
        if linearized >= furthest.linearized {
            if let Some(&(_, blocking)) = self.deadlines.first() {
                *furthest = Furthest {
                    linearized,
                    blocking,
                    state: self.state,
                };
            }
        }
    }

    fn explain(&self, furthest: &Furthest) -> String {
        let blocking = &self.events[self.ops[furthest.blocking].event];
        let start = blocking.invoke;
        let end = blocking.complete.unwrap_or(u64::MAX);
        let mut msg = format!(
            "not linearizable: at best {} of {} completed operations could be ordered; \
             then the register held {} and no order lets {} take effect",
            furthest.linearized,
            self.completed,
            show(self.values[furthest.state as usize]),
            describe(blocking),
        );

        // For the common "stale read" the most useful context is the last
        // state change that definitely happened before the op started.
        let prior = self
            .key_events
            .iter()
            .map(|&i| &self.events[i])
            .filter(|e| !matches!(e.op, Op::Read { .. }))
            .filter(|e| e.complete.is_some_and(|c| c < start))
            .max_by_key(|e| e.complete);
        if let Some(prior) = prior {
            msg.push_str(&format!(
                "; the last write/delete completed before it was invoked: {}",
                describe(prior)
            ));
        }

        const MAX_LISTED: usize = 12;
        let concurrent: Vec<&Event> = self
            .key_events
            .iter()
            .map(|&i| &self.events[i])
            .filter(|e| !std::ptr::eq(*e, blocking))
            .filter(|e| e.invoke <= end && e.complete.unwrap_or(u64::MAX) >= start)
            .collect();
        if concurrent.is_empty() {
            msg.push_str("; no operations were concurrent with it");
        } else {
            msg.push_str("; concurrent with it:");
            for e in concurrent.iter().take(MAX_LISTED) {
                msg.push_str("\n  ");
                msg.push_str(&describe(e));
            }
            if concurrent.len() > MAX_LISTED {
                msg.push_str(&format!(
                    "\n  ... and {} more",
                    concurrent.len() - MAX_LISTED
                ));
            }
        }
        msg
    }
}

fn describe(e: &Event) -> String {
    let what = match &e.op {
        Op::Read { observed } => format!("read -> {}", show(observed.as_deref())),
        Op::Write { value } => format!("write {}", show_bytes(value)),
        Op::Delete => "delete".to_owned(),
    };
    let complete = e
        .complete
        .map_or_else(|| "unknown".to_owned(), |c| format!("{c}ns"));
    format!(
        "client {} {what} [invoked {}ns, completed {complete}]",
        e.client, e.invoke
    )
}

fn show(v: Option<&[u8]>) -> String {
    v.map_or_else(|| "<absent>".to_owned(), show_bytes)
}

/// Printable UTF-8 as a quoted string, anything else as hex.
fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => {
            let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const K: &[u8] = b"k";

    fn ev(client: u64, key: &[u8], op: Op, invoke: u64, complete: Option<u64>) -> Event {
        Event {
            client,
            key: key.to_vec(),
            op,
            invoke,
            complete,
        }
    }

    fn w(client: u64, v: &str, invoke: u64, complete: Option<u64>) -> Event {
        let op = Op::Write {
            value: v.as_bytes().to_vec(),
        };
        ev(client, K, op, invoke, complete)
    }

    fn r(client: u64, v: Option<&str>, invoke: u64, complete: Option<u64>) -> Event {
        let op = Op::Read {
            observed: v.map(|s| s.as_bytes().to_vec()),
        };
        ev(client, K, op, invoke, complete)
    }

    fn del(client: u64, invoke: u64, complete: Option<u64>) -> Event {
        ev(client, K, Op::Delete, invoke, complete)
    }

    fn ok(events: &[Event]) -> usize {
        check(events, &None).unwrap_or_else(|v| panic!("expected linearizable, got: {v}"))
    }

    fn violation(events: &[Event]) -> Violation {
        match check(events, &None) {
            Ok(n) => panic!("expected a violation, but {n} ops linearized"),
            Err(v) => {
                assert!(!v.is_budget_exhausted(), "search gave up: {v}");
                v
            }
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(ok(&[]), 0);
    }

    #[test]
    fn sequential_history_ok() {
        let h = [
            r(1, None, 0, Some(5)),
            w(1, "a", 10, Some(20)),
            r(2, Some("a"), 30, Some(40)),
            w(2, "b", 50, Some(60)),
            r(1, Some("b"), 70, Some(80)),
            del(1, 90, Some(100)),
            r(2, None, 110, Some(120)),
        ];
        assert_eq!(ok(&h), 7);
    }

    #[test]
    fn initial_value_is_respected() {
        let h = [r(1, Some("seed"), 0, Some(5))];
        assert!(check(&h, &Some(b"seed".to_vec())).is_ok());
        assert!(check(&h, &None).is_err());
    }

    #[test]
    fn stale_read_after_completed_write_fails() {
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, Some(30)),
            r(2, Some("a"), 40, Some(50)),
        ];
        let v = violation(&h);
        assert_eq!(v.key, K);
        assert!(v.message.starts_with("stale read"), "{v}");
        assert!(v.message.contains("read -> \"a\""), "{v}");
        assert!(
            v.message.contains("followed by client 1 write \"b\""),
            "{v}"
        );
    }

    #[test]
    fn concurrent_read_may_see_old_or_new() {
        for seen in ["a", "b"] {
            let h = [
                w(1, "a", 0, Some(10)),
                w(1, "b", 20, Some(60)),
                r(2, Some(seen), 30, Some(40)),
            ];
            ok(&h);
        }
        // But not something else.
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, Some(60)),
            r(2, None, 30, Some(40)),
        ];
        violation(&h);
    }

    #[test]
    fn reads_match_in_either_order_for_concurrent_writes() {
        // Two overlapping writes; one reader sees b then a, so b came first.
        let h = [
            w(1, "a", 0, Some(100)),
            w(2, "b", 0, Some(100)),
            r(3, Some("b"), 10, Some(20)),
            r(3, Some("a"), 30, Some(40)),
            r(3, Some("a"), 200, Some(210)),
        ];
        ok(&h);
    }

    #[test]
    fn indeterminate_write_that_appears_later_ok() {
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, None),
            r(2, Some("a"), 30, Some(40)),
            r(2, Some("b"), 1_000, Some(1_010)),
            r(3, Some("b"), 2_000, Some(2_010)),
        ];
        assert_eq!(ok(&h), 5);
    }

    #[test]
    fn indeterminate_write_never_observed_ok() {
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, None),
            r(2, Some("a"), 30, Some(40)),
            r(2, Some("a"), 1_000, Some(1_010)),
        ];
        ok(&h);
        // An unknown-outcome delete may also not have happened.
        let h = [
            w(1, "a", 0, Some(10)),
            del(1, 20, None),
            r(2, Some("a"), 1_000, Some(1_010)),
        ];
        ok(&h);
    }

    #[test]
    fn indeterminate_write_cannot_take_effect_before_invocation() {
        let h = [r(2, Some("b"), 0, Some(10)), w(1, "b", 20, None)];
        violation(&h);
    }

    #[test]
    fn indeterminate_write_takes_effect_at_most_once() {
        // Once b is seen and then overwritten, an unknown b cannot reappear.
        let h = [
            w(1, "b", 0, None),
            r(2, Some("b"), 10, Some(20)),
            w(2, "c", 30, Some(40)),
            r(2, Some("b"), 50, Some(60)),
        ];
        violation(&h);
        // ...unless a second unknown write of b could explain it.
        let h = [
            w(1, "b", 0, None),
            r(2, Some("b"), 10, Some(20)),
            w(2, "c", 30, Some(40)),
            w(3, "b", 45, None),
            r(2, Some("b"), 50, Some(60)),
        ];
        ok(&h);
    }

    #[test]
    fn unknown_read_constrains_nothing() {
        let h = [
            w(1, "a", 0, Some(10)),
            r(2, Some("garbage"), 20, None),
            r(2, Some("a"), 30, Some(40)),
        ];
        // The unknown read is not counted.
        assert_eq!(ok(&h), 2);
    }

    #[test]
    fn read_of_value_never_written_fails() {
        let h = [w(1, "a", 0, Some(10)), r(2, Some("zzz"), 20, Some(30))];
        let v = violation(&h);
        assert!(v.message.starts_with("impossible read"), "{v}");
        // Nor a value whose write started only after the read finished.
        let h = [r(2, Some("a"), 0, Some(10)), w(1, "a", 20, Some(30))];
        violation(&h);
    }

    #[test]
    fn delete_then_read_none() {
        let h = [
            w(1, "a", 0, Some(10)),
            del(1, 20, Some(30)),
            r(2, None, 40, Some(50)),
        ];
        ok(&h);
        let h = [
            w(1, "a", 0, Some(10)),
            del(1, 20, Some(30)),
            r(2, Some("a"), 40, Some(50)),
        ];
        violation(&h);
    }

    #[test]
    fn two_keys_are_independent() {
        let x = |op, i, c| ev(1, b"x", op, i, Some(c));
        let y = |op, i, c| ev(2, b"y", op, i, Some(c));
        let a = || Op::Write {
            value: b"a".to_vec(),
        };
        let read = |v: Option<&[u8]>| Op::Read {
            observed: v.map(<[u8]>::to_vec),
        };
        // Writing x does not make y present.
        let h = [
            x(a(), 0, 10),
            y(read(None), 20, 30),
            x(read(Some(b"a")), 40, 50),
            y(a(), 60, 70),
            y(read(Some(b"a")), 80, 90),
        ];
        assert_eq!(ok(&h), 5);

        // A violation on y is reported against y even though x is fine.
        let mut bad = h.to_vec();
        bad.push(y(read(None), 100, 110));
        let v = violation(&bad);
        assert_eq!(v.key, b"y");
        assert!(v.to_string().starts_with("key \"y\": "), "{v}");
    }

    #[test]
    fn flip_flop_fails() {
        // While b is being written, a reader sees b and afterwards a again: the
        // write cannot be both before and after.
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, Some(100)),
            r(2, Some("b"), 30, Some(40)),
            r(2, Some("a"), 50, Some(60)),
        ];
        // Each read on its own is fine, so it takes the search to find this.
        let v = violation(&h);
        assert!(v.message.starts_with("not linearizable"), "{v}");
        assert!(v.message.contains("register held \"b\""), "{v}");
        assert!(
            v.message.contains("client 2 read -> \"a\" [invoked 50ns"),
            "{v}"
        );
        assert!(
            v.message
                .contains("concurrent with it:\n  client 1 write \"b\""),
            "{v}"
        );
        // Same with a write whose outcome is unknown.
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, None),
            r(2, Some("b"), 30, Some(40)),
            r(3, Some("a"), 50, Some(60)),
        ];
        violation(&h);
        // Overlapping reads may legitimately disagree in that order.
        let h = [
            w(1, "a", 0, Some(10)),
            w(1, "b", 20, Some(100)),
            r(2, Some("b"), 30, Some(55)),
            r(3, Some("a"), 50, Some(60)),
        ];
        ok(&h);
    }

    #[test]
    fn malformed_event_is_rejected() {
        let h = [w(1, "a", 10, Some(5))];
        assert!(check(&h, &None).unwrap_err().message.contains("malformed"));
    }

    #[test]
    fn budget_exhaustion_is_reported() {
        // Many concurrent writes and a read that needs backtracking.
        let mut h: Vec<Event> = (0..8).map(|c| w(c, &c.to_string(), 0, Some(100))).collect();
        h.push(r(9, Some("0"), 50, Some(60)));
        h.push(r(9, Some("7"), 200, Some(210)));
        assert!(check(&h, &None).is_ok());
        let v = check_with_budget(&h, &None, 1).unwrap_err();
        assert!(v.is_budget_exhausted(), "{v}");
        assert_eq!(v.message, "search budget exhausted");
    }

    #[test]
    fn binary_values_are_shown_as_hex() {
        let h = [
            ev(
                1,
                &[0xff, 0x00],
                Op::Write { value: vec![1, 2] },
                0,
                Some(10),
            ),
            ev(1, &[0xff, 0x00], Op::Read { observed: None }, 20, Some(30)),
        ];
        let v = violation(&h);
        assert!(v.to_string().starts_with("key 0xff00: "), "{v}");
        assert!(v.message.contains("0x0102"), "{v}");
    }

    #[test]
    fn history_records_from_many_threads() {
        let h = History::new();
        assert!(h.is_empty());
        let threads: Vec<_> = (0..4u64)
            .map(|client| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        let t = h.now();
                        h.record(ev(client, K, Op::Delete, t, Some(h.now())));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("recorder thread panicked");
        }
        assert_eq!(h.len(), 40);
        assert!(h.events().iter().all(|e| e.complete >= Some(e.invoke)));
        assert_eq!(ok(&h.events()), 40);
    }

    /// xorshift64*: deterministic, dependency-free randomness for tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Simulates `clients` clients each doing `per_client` back-to-back ops on
    /// `key` against a real register: every op takes effect at a random instant
    /// inside its interval and reads return the register value at that instant.
    /// Values are drawn from a small set so reads are ambiguous and the checker
    /// has to work. `lost_pct` percent of ops lose their outcome: writes that
    /// may or may not take effect, reads whose result is unknown.
    fn simulate(
        seed: u64,
        key: &[u8],
        clients: u64,
        per_client: usize,
        lost_pct: u64,
    ) -> Vec<Event> {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // (linearization point, event index, takes effect)
        let mut points: Vec<(u64, usize, bool)> = Vec::new();
        let mut events = Vec::new();
        for client in 0..clients {
            let mut clock = rng.below(100);
            for _ in 0..per_client {
                let invoke = clock + rng.below(50);
                let duration = 1 + rng.below(200);
                let point = invoke + rng.below(duration);
                let complete = invoke + duration;
                let roll = rng.below(100);
                let op = if roll < 45 {
                    Op::Read { observed: None }
                } else if roll < 90 {
                    Op::Write {
                        value: format!("v{}", rng.below(6)).into_bytes(),
                    }
                } else {
                    Op::Delete
                };
                let lost = rng.below(100) < lost_pct;
                let effective = !(lost && rng.below(2) == 0);
                points.push((point, events.len(), effective));
                events.push(ev(client, key, op, invoke, (!lost).then_some(complete)));
                clock = complete;
            }
        }
        points.sort_unstable();
        let mut register: Value = None;
        for (_, i, effective) in points {
            match &mut events[i].op {
                Op::Read { observed } => observed.clone_from(&register),
                Op::Write { value } if effective => register = Some(value.clone()),
                Op::Delete if effective => register = None,
                _ => {}
            }
        }
        events
    }

    #[test]
    fn big_simulated_history_passes_quickly() {
        let mut events = simulate(1, b"hot", 16, 5_000 / 16, 3);
        events.extend(simulate(2, b"warm", 8, 200, 3));
        events.extend(simulate(3, b"cold", 2, 50, 3));
        let expected = events
            .iter()
            .filter(|e| e.complete.is_some() || !matches!(e.op, Op::Read { .. }))
            .count();
        let started = Instant::now();
        assert_eq!(ok(&events), expected);
        eprintln!("checked {} events in {:?}", events.len(), started.elapsed());
    }

    #[test]
    fn many_seeds_pass() {
        for seed in 10..40 {
            let events = simulate(seed, K, 6, 60, 5);
            ok(&events);
        }
    }

    #[test]
    fn corrupted_simulated_history_fails() {
        // Make one read return a value that was overwritten long before: find a
        // read whose value differs from the last write that completed before it
        // and was not overlapped by any other write.
        let mut found = 0;
        for seed in 100..200 {
            let mut events = simulate(seed, K, 4, 40, 0);
            let Some((victim, stale)) = find_stale_candidate(&events) else {
                continue;
            };
            events[victim].op = Op::Read {
                observed: Some(stale),
            };
            let v = violation(&events);
            assert!(v.message.starts_with("stale read"), "{v}");
            found += 1;
        }
        assert!(found > 10, "only {found} corruptible histories");
    }

    /// A read `r` and a value `s` such that reading `s` at `r` is impossible:
    /// some write of `t != s` completed before `r` was invoked, every write of
    /// `s` completed before that write was invoked, and nothing else overlaps.
    fn find_stale_candidate(events: &[Event]) -> Option<(usize, Vec<u8>)> {
        let writes: Vec<&Event> = events
            .iter()
            .filter(|e| !matches!(e.op, Op::Read { .. }))
            .collect();
        for (ri, read) in events.iter().enumerate().rev() {
            if !matches!(read.op, Op::Read { .. }) {
                continue;
            }
            let Some(last) = writes
                .iter()
                .filter(|e| e.complete < Some(read.invoke))
                .max_by_key(|e| e.complete)
            else {
                continue;
            };
            let Some(last_done) = last.complete else {
                continue;
            };
            for old in &writes {
                let Op::Write { value: s } = &old.op else {
                    continue;
                };
                let t_differs = !matches!(&last.op, Op::Write { value } if value == s);
                let all_s_before = writes.iter().all(|e| match &e.op {
                    Op::Write { value } if value == s => e.complete < Some(last.invoke),
                    _ => true,
                });
                let last_alone = writes.iter().all(|e| {
                    std::ptr::eq(*e, *last)
                        || e.complete < Some(last.invoke)
                        || e.invoke > last_done
                });
                let none_later = writes.iter().all(|e| {
                    e.invoke > read.complete.unwrap_or(0) || e.complete < Some(read.invoke)
                });
                if t_differs && all_s_before && last_alone && none_later {
                    return Some((ri, s.clone()));
                }
            }
        }
        None
    }

    /// Exhaustive reference: tries every order consistent with real time,
    /// leaving out any subset of unknown-outcome writes.
    fn brute_force(events: &[Event], used: &mut [bool], state: &Value) -> bool {
        let pending = |used: &[bool], j: usize| !used[j] && events[j].complete.is_some();
        if !(0..events.len()).any(|j| pending(used, j)) {
            return true;
        }
        for i in 0..events.len() {
            let blocked = (0..events.len()).any(|j| {
                pending(used, j) && events[j].complete.is_some_and(|c| c < events[i].invoke)
            });
            if used[i] || blocked {
                continue;
            }
            let next = match &events[i].op {
                Op::Read { observed } if observed == state => state.clone(),
                Op::Read { .. } => continue,
                Op::Write { value } => Some(value.clone()),
                Op::Delete => None,
            };
            used[i] = true;
            let found = brute_force(events, used, &next);
            used[i] = false;
            if found {
                return true;
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng(7);
        let (mut valid, mut prechecked, mut searched) = (0, 0, 0);
        for _ in 0..10_000 {
            let n = 1 + rng.below(7) as usize;
            let events: Vec<Event> = (0..n as u64)
                .map(|client| {
                    let invoke = rng.below(40);
                    let complete = invoke + rng.below(25);
                    let value = |rng: &mut Rng| ["a", "b"][rng.below(2) as usize];
                    match rng.below(10) {
                        0..=3 => {
                            let observed = [None, Some("a"), Some("b")][rng.below(3) as usize];
                            r(client, observed, invoke, Some(complete))
                        }
                        4..=6 => w(client, value(&mut rng), invoke, Some(complete)),
                        7 => w(client, value(&mut rng), invoke, None),
                        8 => del(client, invoke, Some(complete)),
                        _ => del(client, invoke, None),
                    }
                })
                .collect();
            let expected = brute_force(&events, &mut vec![false; n], &None);
            match check(&events, &None) {
                Ok(_) if expected => valid += 1,
                Err(v) if !expected && v.message.contains(" read: ") => prechecked += 1,
                Err(v) if !expected && v.message.starts_with("not linearizable") => searched += 1,
                got => panic!("brute force says {expected}, checker {got:?}:\n{events:#?}"),
            }
        }
        // Make sure every path was actually exercised.
        assert!(
            valid > 1_000 && prechecked > 1_000 && searched > 40,
            "{valid} valid, {prechecked} prechecked, {searched} found by search"
        );
    }

    #[test]
    fn real_register_under_threads_passes() {
        use std::collections::HashMap;
        let h = History::new();
        let store: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>> = Arc::default();
        let threads: Vec<_> = (0..8u64)
            .map(|client| {
                let h = Arc::clone(&h);
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut rng = Rng(client + 1);
                    for n in 0..150 {
                        let key = vec![b'a' + (rng.below(3) as u8)];
                        let t = h.now();
                        let op = {
                            let mut map = store.lock().expect("store lock");
                            match rng.below(3) {
                                0 => Op::Read {
                                    observed: map.get(&key).cloned(),
                                },
                                1 => {
                                    let value = format!("{client}-{n}").into_bytes();
                                    map.insert(key.clone(), value.clone());
                                    Op::Write { value }
                                }
                                _ => {
                                    map.remove(&key);
                                    Op::Delete
                                }
                            }
                        };
                        if n % 16 == 0 {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        h.record(Event {
                            client,
                            key,
                            op,
                            invoke: t,
                            complete: Some(h.now()),
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread panicked");
        }
        assert_eq!(h.len(), 8 * 150);
        assert_eq!(ok(&h.events()), 8 * 150);
    }
}

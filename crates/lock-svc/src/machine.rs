//! The Raft-facing side of the lock table: [`LockMachine`] implements
//! `consensus::StateMachine` over a shared [`LockState`], and routes the
//! events of each applied command to the request handlers waiting on them
//! through the [`Waits`] registry.
//!
//! Every replica applies and emits the same events; only the replica whose
//! handler is blocked on a wait has a listener for it. That includes a
//! former leader: its handler is still told when the wait it queued is
//! granted after a leader change, because it still applies the log.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use prost::Message;
use proto::lock::v1::internal::command::Cmd;
use proto::lock::v1::internal::outcome::Result as Res;
use proto::lock::v1::internal::{Command, Error, ErrorCode, Outcome};

use crate::lessor::Lessor;
use crate::state::{Event, LockState};

/// Undelivered outcomes kept for handlers that have not registered yet.
const UNCLAIMED: usize = 65_536;

/// Waits that handlers block on, by waiter id.
#[derive(Default)]
pub struct Waits {
    inner: Mutex<WaitsInner>,
}

#[derive(Default)]
struct WaitsInner {
    /// Set when the replica stops: handlers must not wait for outcomes
    /// this replica will never apply.
    closed: bool,
    listeners: HashMap<u64, tokio::sync::oneshot::Sender<Outcome>>,
    unclaimed: HashMap<u64, Outcome>,
    order: VecDeque<u64>,
}

impl Waits {
    /// Resolves with the outcome of wait `id` (possibly decided already),
    /// or fails if the replica stops first.
    /// A second listener for the same wait (a retry with the same request
    /// id on this replica) replaces the first, whose receiver then fails
    /// while the registry is open: it was superseded.
    pub fn wait(&self, id: u64) -> tokio::sync::oneshot::Receiver<Outcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut w = self.inner.lock();
        if let Some(o) = w.unclaimed.remove(&id) {
            let _ = tx.send(o);
        } else if !w.closed {
            w.listeners.insert(id, tx);
        }
        rx
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Fails every pending and future wait (the replica is stopping), so
    /// their clients retry on another replica and re-attach there.
    pub fn close(&self) {
        let mut w = self.inner.lock();
        w.closed = true;
        w.listeners.clear();
    }

    /// Stops listening for wait `id` (the handler went away).
    pub fn forget(&self, id: u64) {
        self.inner.lock().listeners.remove(&id);
    }

    fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut w = self.inner.lock();
        for e in events {
            // A listener whose handler went away leaves the outcome
            // unclaimed, for a retry that re-attaches to the wait.
            let undelivered = match w.listeners.remove(&e.waiter_id) {
                Some(tx) => tx.send(e.outcome).err(),
                None => Some(e.outcome),
            };
            if let Some(outcome) = undelivered {
                w.unclaimed.insert(e.waiter_id, outcome);
                w.order.push_back(e.waiter_id);
                while w.order.len() > UNCLAIMED {
                    if let Some(old) = w.order.pop_front() {
                        w.unclaimed.remove(&old);
                    }
                }
            }
        }
    }
}

/// Snapshot encoding: this byte, then the table in postcard (compact
/// binary). Earlier builds wrote byte 1 (holders without `request_id`)
/// or JSON (starting with `{`); both still restore.
const SNAPSHOT_POSTCARD: u8 = 2;
const SNAPSHOT_POSTCARD_FIRST: u8 = 1;

/// What a snapshot carries after the table (layout 2 on).
#[derive(serde::Serialize, serde::Deserialize)]
struct Extras {
    leases_in_memory: bool,
}

fn write_snapshot(state: &LockState, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    out.write_all(&[SNAPSHOT_POSTCARD])?;
    let extras = Extras {
        leases_in_memory: state.leases_in_memory,
    };
    let bad = |e: postcard::Error| std::io::Error::other(e.to_string());
    postcard::to_io(state, &mut *out).map_err(bad)?;
    postcard::to_io(&extras, out).map_err(bad)?;
    Ok(())
}

fn encode(state: &LockState) -> Vec<u8> {
    let mut out = Vec::new();
    write_snapshot(state, &mut out).expect("lock state serializes");
    out
}

fn decode(data: &[u8]) -> Result<LockState, String> {
    match data.first() {
        Some(&SNAPSHOT_POSTCARD) => {
            let (mut state, rest): (LockState, _) =
                postcard::take_from_bytes(&data[1..]).map_err(|e| e.to_string())?;
            let extras: Extras = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
            state.leases_in_memory = extras.leases_in_memory;
            Ok(state)
        }
        Some(&SNAPSHOT_POSTCARD_FIRST) => {
            crate::state::with_first_layout(|| postcard::from_bytes(&data[1..]))
                .map_err(|e| e.to_string())
        }
        Some(b'{') => serde_json::from_slice(data).map_err(|e| e.to_string()),
        _ => Err("unknown lock snapshot encoding".into()),
    }
}

/// The replicated lock table as a consensus state machine.
pub struct LockMachine {
    pub state: Arc<RwLock<LockState>>,
    pub waits: Arc<Waits>,
    /// Told of sessions opening and ending (it keeps leases on the leader).
    pub lessor: Arc<Lessor>,
}

impl consensus::StateMachine for LockMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let (outcome, events) = match Command::decode(command) {
            Ok(cmd) => {
                let ending = match &cmd.cmd {
                    Some(Cmd::CloseSession(c)) => vec![c.session_id],
                    Some(Cmd::ExpireSessions(e)) => e.session_ids.clone(),
                    _ => Vec::new(),
                };
                let opening = matches!(cmd.cmd, Some(Cmd::OpenSession(_)));
                // The lessor learns under the table's lock, ordered with
                // its activation (which reads the table).
                let mut st = self.state.write();
                let applied = st.apply(index, cmd);
                if let (true, Some(Res::Session(s))) = (opening, &applied.0.result) {
                    self.lessor.opened(s.session_id, s.ttl_ms);
                }
                for id in ending {
                    if !st.sessions.contains_key(&id) {
                        self.lessor.ended(id);
                    }
                }
                applied
            }
            Err(e) => (
                Outcome {
                    result: Some(proto::lock::v1::internal::outcome::Result::Error(Error {
                        code: ErrorCode::InvalidArgument as i32,
                        message: format!("undecodable command: {e}"),
                        reason: "MALFORMED_REQUEST".into(),
                        metadata: Default::default(),
                    })),
                },
                Vec::new(),
            ),
        };
        self.waits.publish(events);
        outcome.encode_to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        encode(&self.state.read())
    }

    /// The only work on the driver thread is a copy of the table — O(1),
    /// its maps are persistent — so a large table does not stall requests:
    /// encoding and writing happen on the snapshot thread.
    fn snapshot_job(&self) -> consensus::SnapshotJob {
        let state = self.state.read().clone();
        Box::new(move |out: &mut dyn std::io::Write| write_snapshot(&state, out))
    }

    fn restore(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        *self.state.write() = decode(data)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus::StateMachine;

    fn machine() -> LockMachine {
        LockMachine {
            state: Arc::new(RwLock::new(LockState::new(Default::default()))),
            waits: Arc::new(Waits::default()),
            lessor: Arc::new(Lessor::default()),
        }
    }

    #[test]
    fn snapshots_are_compact_and_old_json_ones_still_restore() {
        let m = machine();
        {
            let mut s = m.state.write();
            s.next_token = 42;
            s.now_ms = 7;
            s.expired.insert(3, 9);
            s.leases_in_memory = true;
        }
        let mut file = Vec::new();
        (m.snapshot_job())(&mut file).unwrap();
        assert_eq!(file[0], SNAPSHOT_POSTCARD);
        assert_eq!(file, m.snapshot());
        let json = serde_json::to_vec(&*m.state.read()).unwrap();
        assert!(file.len() < json.len());
        let mut r = machine();
        r.restore(1, &file).unwrap();
        assert_eq!(*r.state.read(), *m.state.read());
        assert!(r.state.read().leases_in_memory);
        // JSON (earlier builds) predates leases in memory.
        m.state.write().leases_in_memory = false;
        let mut r = machine();
        r.restore(1, &json).unwrap();
        assert_eq!(*r.state.read(), *m.state.read());
        assert!(machine().restore(1, b"\x09junk").is_err());
    }

    /// Snapshots written by the build before holders recorded their
    /// request id (fixtures made by that build: the same table as postcard
    /// layout 1 and as JSON) restore to the same table, and it works on.
    #[test]
    fn snapshots_of_the_first_compact_layout_restore() {
        let (mut a, mut b) = (machine(), machine());
        a.restore(1, include_bytes!("testdata/snapshot-first-layout.bin"))
            .unwrap();
        b.restore(1, include_bytes!("testdata/snapshot-first-layout.json"))
            .unwrap();
        assert_eq!(*a.state.read(), *b.state.read());
        {
            let st = a.state.read();
            assert_eq!(st.sessions.len(), 2);
            assert_eq!(st.locks.len(), 3);
            assert_eq!(st.waiters.len(), 1);
            let h = st.resources["r1"].holders.get(&3).unwrap();
            assert_eq!(
                (h.session, h.call, h.request_id),
                (1, 101, crate::state::UNKNOWN_REQUEST)
            );
            assert!(st.abandoned_set.contains(&999));
        }
        // Releasing r1 (a lock of unknown request id) forgets its request
        // and grants the waiter; the new layout round-trips.
        let release = proto::lock::v1::internal::Command {
            now_ms: 2000,
            cmd: Some(Cmd::Release(proto::lock::v1::internal::Release {
                session_id: 1,
                lock_id: 3,
                resource: String::new(),
            })),
        };
        a.apply(8, &release.encode_to_vec());
        {
            let st = a.state.read();
            assert!(!st.sessions[&1].requests.contains_key(&11));
            assert_eq!(st.resources["r1"].holders.get(&6).unwrap().session, 2);
        }
        let mut c = machine();
        c.restore(8, &a.snapshot()).unwrap();
        assert_eq!(*c.state.read(), *a.state.read());
    }
}

//! The queue's two kinds of replicated state machines.
//!
//! - [`PartitionMachine`]: one per partition group. Applies
//!   [`Proposal`]s to the pure [`PartitionState`] and keeps the payloads in
//!   the partition's [`Segments`]: a `Produce` appends the payloads of the
//!   messages it stored, and every offset the state reports removed has its
//!   payload dropped. Snapshots are taken off the driver thread: the
//!   capture ([`PartitionState::capture`], copy-on-write chunks: O(chunks),
//!   not O(messages)) and a [`crate::segments::SegmentsView`]
//!   (open handles on the append-only segment files), and the job writes
//!   the state followed by every live payload, so a snapshot alone rebuilds
//!   a replica (on a restart or on a follower that fell behind).
//! - [`MetaMachine`]: the metadata group ([`MetaState`], JSON snapshots).
//!
//! Commands and outcomes are postcard-encoded: compact and fast for
//! batches of payloads. Both machines wake whoever waits on their
//! `changed` notifications (long-polling receivers, the reconciler).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::meta::{MetaCommand, MetaOutcome, MetaState};
use crate::partition::{Command, Outcome, PartitionConfig, PartitionState, QueueError};
use crate::segments::{self, Segments};

/// A partition command as proposed: for a `Produce`, the payloads of its
/// messages, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    pub cmd: Command,
    pub payloads: Vec<Vec<u8>>,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding to a Vec cannot fail")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| e.to_string())
}

/// A partition's state and payloads, shared by its state machine (writer)
/// and the service's handlers (readers).
pub struct PartitionData {
    pub state: PartitionState,
    pub segments: Segments,
    /// Set when the payload store failed; the partition then answers
    /// STORAGE_FAILURE for reads rather than hand out wrong payloads.
    pub storage_error: Option<String>,
}

/// What the service holds of a partition replica.
pub struct Shared {
    pub data: RwLock<PartitionData>,
    /// Signalled after every applied command: long polls re-check.
    pub changed: Notify,
    /// Messages acked by any group, applied here (for the consume rate).
    pub acked: std::sync::atomic::AtomicU64,
    /// Produce and consume rates (msg/s), refreshed by the tick loop.
    pub rates: parking_lot::Mutex<Rates>,
}

/// Per-second rates, smoothed (EWMA, about 5 s).
#[derive(Debug, Default, Clone, Copy)]
pub struct Rates {
    pub produce: f64,
    pub consume: f64,
    last_offset: u64,
    last_acked: u64,
    last_at: Option<std::time::Instant>,
}

impl Rates {
    /// Folds in the counters as of now.
    pub fn update(&mut self, next_offset: u64, acked: u64) {
        let now = std::time::Instant::now();
        if let Some(at) = self.last_at {
            let dt = now.duration_since(at).as_secs_f64();
            if dt < 0.5 {
                return;
            }
            let alpha = (dt / 5.0).min(1.0);
            let p = next_offset.saturating_sub(self.last_offset) as f64 / dt;
            let c = acked.saturating_sub(self.last_acked) as f64 / dt;
            self.produce += alpha * (p - self.produce);
            self.consume += alpha * (c - self.consume);
        }
        self.last_offset = next_offset;
        self.last_acked = acked;
        self.last_at = Some(now);
    }
}

impl Shared {
    pub fn new(config: PartitionConfig, dir: PathBuf) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            data: RwLock::new(PartitionData {
                state: PartitionState::new(config),
                segments: Segments::create(&dir)?,
                storage_error: None,
            }),
            changed: Notify::new(),
            acked: Default::default(),
            rates: Default::default(),
        }))
    }
}

pub struct PartitionMachine {
    pub shared: Arc<Shared>,
}

impl consensus::StateMachine for PartitionMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome = match decode::<Proposal>(command) {
            Ok(mut p) => {
                // A lease is named by the index of the Receive that made
                // it: unique, and known to every replica.
                if let Command::Receive { lease_id, .. } = &mut p.cmd {
                    *lease_id = index;
                }
                self.apply_proposal(p)
            }
            Err(e) => Outcome::Error(QueueError::InvalidArgument {
                field: "command".into(),
                message: format!("undecodable: {e}"),
            }),
        };
        self.shared.changed.notify_waiters();
        encode(&outcome)
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        (self.snapshot_job())(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    fn snapshot_job(&self) -> consensus::SnapshotJob {
        // Runs on the driver thread, under the lock: only capture here, in
        // O(chunks + groups' entries), not O(backlog) (the capture shares
        // the state's message chunks copy-on-write). The O(backlog)
        // serialization happens in the job, on the snapshot thread; the
        // capture serializes to the same bytes as the state, so the format
        // (and `restore_from`) is unchanged.
        let data = self.shared.data.read();
        let capture = data.state.capture();
        let view = data.segments.view();
        drop(data);
        Box::new(move |out: &mut dyn Write| {
            let state = encode(&capture);
            // Release the shared chunks now: while the capture lives, the
            // state copies each chunk it changes, and the payloads may take long.
            drop(capture);
            out.write_all(&(state.len() as u64).to_le_bytes())?;
            out.write_all(&state)?;
            view.write_to(out)
        })
    }

    fn restore(&mut self, index: u64, mut data: &[u8]) -> Result<(), String> {
        self.restore_from(index, &mut data)
    }

    fn restore_from(&mut self, _index: u64, input: &mut dyn Read) -> Result<(), String> {
        let mut word = [0u8; 8];
        input.read_exact(&mut word).map_err(|e| e.to_string())?;
        let mut state = vec![0; u64::from_le_bytes(word) as usize];
        input.read_exact(&mut state).map_err(|e| e.to_string())?;
        let state: PartitionState = decode(&state)?;
        let mut data = self.shared.data.write();
        let mut segments = Segments::create(data.segments.dir()).map_err(|e| e.to_string())?;
        segments::read_into(&mut segments, input).map_err(|e| e.to_string())?;
        if segments.len() as u64 != state.depth() {
            return Err(format!(
                "snapshot holds {} payloads for {} messages",
                segments.len(),
                state.depth()
            ));
        }
        *data = PartitionData {
            state,
            segments,
            storage_error: None,
        };
        drop(data);
        self.shared.changed.notify_waiters();
        Ok(())
    }
}

impl PartitionMachine {
    fn apply_proposal(&mut self, p: Proposal) -> Outcome {
        let mut data = self.shared.data.write();
        let produce = matches!(p.cmd, Command::Produce { .. });
        let (outcome, effects) = data.state.apply(p.cmd);
        if produce {
            if let Outcome::Produced(results) = &outcome {
                let batch: Vec<(u64, &[u8])> = results
                    .iter()
                    .zip(&p.payloads)
                    .filter(|(r, _)| !r.duplicate)
                    .map(|(r, payload)| (r.offset, payload.as_slice()))
                    .collect();
                if let Err(e) = data.segments.append(&batch) {
                    tracing::error!(error = %e, "cannot store payloads");
                    data.storage_error = Some(e.to_string());
                }
            }
        }
        for offset in effects.removed {
            data.segments.remove(offset);
        }
        if let Outcome::Acked(results) = &outcome {
            let n = results.iter().filter(|r| r.is_ok()).count() as u64;
            self.shared
                .acked
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        outcome
    }
}

/// The metadata group's state machine. `changed` carries the applied index.
pub struct MetaMachine {
    pub state: Arc<RwLock<MetaState>>,
    pub changed: watch::Sender<u64>,
}

impl consensus::StateMachine for MetaMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome = match decode::<MetaCommand>(command) {
            Ok(cmd) => self.state.write().apply(cmd),
            Err(e) => MetaOutcome::Error(crate::meta::MetaError::Invalid(format!(
                "undecodable command: {e}"
            ))),
        };
        self.changed.send_replace(index);
        encode(&outcome)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.state.read()).expect("metadata serializes")
    }

    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        *self.state.write() = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        self.changed.send_replace(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::{GroupConfig, NewMessage, StartAt};
    use consensus::StateMachine;

    fn produce(now_ms: u64, payloads: &[&[u8]]) -> Vec<u8> {
        encode(&Proposal {
            cmd: Command::Produce {
                now_ms,
                messages: payloads
                    .iter()
                    .map(|p| NewMessage {
                        size: p.len() as u64,
                        ..Default::default()
                    })
                    .collect(),
            },
            payloads: payloads.iter().map(|p| p.to_vec()).collect(),
        })
    }

    #[test]
    fn snapshots_carry_state_and_payloads_and_restore_elsewhere() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = Shared::new(PartitionConfig::default(), tmp.path().join("a")).unwrap();
        let mut a = PartitionMachine {
            shared: shared.clone(),
        };
        a.apply(
            6,
            &encode(&Proposal {
                cmd: Command::CreateGroup {
                    now_ms: 1,
                    group: "g".into(),
                    config: GroupConfig::default(),
                    start: StartAt::Earliest,
                },
                payloads: vec![],
            }),
        );
        let out: Outcome = decode(&a.apply(7, &produce(2, &[b"one", b"two", b"three"]))).unwrap();
        assert!(matches!(out, Outcome::Produced(ref r) if r.len() == 3));
        let job = a.snapshot_job();
        // Changes after the capture do not reach the snapshot.
        a.apply(8, &produce(3, &[b"four"]));
        let mut file = Vec::new();
        job(&mut file).unwrap();

        let other = Shared::new(PartitionConfig::default(), tmp.path().join("b")).unwrap();
        let mut b = PartitionMachine {
            shared: other.clone(),
        };
        b.restore_from(7, &mut file.as_slice()).unwrap();
        let d = other.data.read();
        assert_eq!(d.state.depth(), 3);
        assert_eq!(d.segments.read(1).unwrap(), b"two");
        assert!(d.segments.read(3).is_err());
        assert_eq!(shared.data.read().segments.read(3).unwrap(), b"four");
    }

    #[test]
    fn acked_payloads_leave_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = Shared::new(PartitionConfig::default(), tmp.path().join("a")).unwrap();
        let mut m = PartitionMachine {
            shared: shared.clone(),
        };
        let cmd = |cmd: Command| {
            encode(&Proposal {
                cmd,
                payloads: vec![],
            })
        };
        m.apply(
            1,
            &cmd(Command::CreateGroup {
                now_ms: 1,
                group: "g".into(),
                config: GroupConfig::default(),
                start: StartAt::Earliest,
            }),
        );
        m.apply(2, &produce(1, &[b"a", b"b"]));
        let Outcome::Received(got) = decode(&m.apply(
            3,
            &cmd(Command::Receive {
                now_ms: 2,
                group: "g".into(),
                consumer: "c".into(),
                max: 10,
                lease_id: 3,
            }),
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(got.len(), 2);
        m.apply(
            4,
            &cmd(Command::Ack {
                now_ms: 3,
                group: "g".into(),
                receipts: got.iter().map(|d| d.receipt).collect(),
            }),
        );
        let d = shared.data.read();
        assert_eq!(d.state.depth(), 0);
        assert_eq!(d.segments.len(), 0);
        assert_eq!(d.segments.bytes(), 0);
    }
}

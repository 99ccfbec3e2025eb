//! Cache membership: which nodes hold lines and directories, agreed in
//! Raft group [`GROUP`] (on every node) and numbered by an *epoch*.
//!
//! A member is a node id with an *incarnation* (the log index of its last
//! `Join`). A node joins every time it starts — its memory, so its lines
//! and the directory of the keys it is home of, did not survive — and
//! again after it was fenced out. Every change bumps the epoch; nodes
//! refuse protocol messages of another epoch. On a change each node drops
//! the lines whose home is no longer the same (node, incarnation), forgets
//! directory entries of keys it is no longer home of, and removes holders
//! that left or restarted: what makes a home's directory complete again.
//!
//! [`Membership`] is pure; [`MembershipMachine`] is its `StateMachine`.

use std::collections::BTreeMap;
use std::sync::Arc;

use dsync_client::routing::MemberRing;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Raft group id of the membership group.
pub const GROUP: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `node` (re)joins with a fresh incarnation.
    Join { node: u64 },
    /// Removes `node` if it is still at `incarnation` (a fence decided
    /// against an older incarnation is moot).
    Fence { node: u64, incarnation: u64 },
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("membership commands encode")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub epoch: u64,
    /// node id → incarnation.
    pub members: BTreeMap<u64, u64>,
}

impl Membership {
    /// Applies a command at log `index`; answers whether it changed
    /// anything.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> bool {
        match *cmd {
            Command::Join { node } => {
                self.members.insert(node, index);
            }
            Command::Fence { node, incarnation } => {
                if self.members.get(&node) != Some(&incarnation) {
                    return false;
                }
                self.members.remove(&node);
            }
        }
        self.epoch += 1;
        true
    }

    pub fn incarnation(&self, node: u64) -> Option<u64> {
        self.members.get(&node).copied()
    }

    /// The placement of keys under this membership.
    pub fn view(&self) -> View {
        View {
            epoch: self.epoch,
            members: self.members.clone(),
            ring: MemberRing::new(self.members.keys().copied()),
        }
    }
}

/// An epoch's membership with its ring, for routing keys to homes.
pub struct View {
    pub epoch: u64,
    pub members: BTreeMap<u64, u64>,
    ring: MemberRing,
}

impl View {
    /// The home of `key`: (node, incarnation).
    pub fn home(&self, key: &[u8]) -> Option<(u64, u64)> {
        let node = self.ring.home(key)?;
        Some((node, self.members[&node]))
    }

    pub fn empty() -> Self {
        Membership::default().view()
    }
}

/// The membership group's state machine: the state behind a lock, and a
/// watch channel that tells the node's transition task about new epochs.
pub struct MembershipMachine {
    pub state: Arc<RwLock<Membership>>,
    pub changed: watch::Sender<u64>,
}

impl consensus::StateMachine for MembershipMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let Ok(cmd) = postcard::from_bytes::<Command>(command) else {
            tracing::error!(index, "undecodable membership command skipped");
            return Vec::new();
        };
        let epoch = {
            let mut s = self.state.write();
            s.apply(index, &cmd);
            s.epoch
        };
        self.changed.send_replace(epoch);
        epoch.to_be_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&*self.state.read()).expect("membership encodes")
    }

    fn restore(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        let m: Membership = postcard::from_bytes(data).map_err(|e| e.to_string())?;
        let epoch = m.epoch;
        *self.state.write() = m;
        self.changed.send_replace(epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_and_fences_bump_the_epoch() {
        let mut m = Membership::default();
        assert!(m.apply(5, &Command::Join { node: 1 }));
        assert!(m.apply(6, &Command::Join { node: 2 }));
        assert_eq!(m.epoch, 2);
        assert_eq!(m.incarnation(1), Some(5));
        // A fence of an older incarnation is moot.
        assert!(!m.apply(
            7,
            &Command::Fence {
                node: 1,
                incarnation: 4
            }
        ));
        assert_eq!(m.epoch, 2);
        assert!(m.apply(
            8,
            &Command::Fence {
                node: 1,
                incarnation: 5
            }
        ));
        assert_eq!(m.epoch, 3);
        assert_eq!(m.incarnation(1), None);
        // Rejoining gives a new incarnation.
        assert!(m.apply(9, &Command::Join { node: 1 }));
        assert_eq!(m.incarnation(1), Some(9));
    }

    #[test]
    fn homes_move_only_for_keys_of_a_leaving_member() {
        let mut m = Membership::default();
        for (i, n) in [1, 2, 3].into_iter().enumerate() {
            m.apply(i as u64 + 1, &Command::Join { node: n });
        }
        let before = m.view();
        m.apply(
            10,
            &Command::Fence {
                node: 3,
                incarnation: 3,
            },
        );
        let after = m.view();
        let mut moved = 0;
        for i in 0..3000 {
            let key = format!("key-{i}");
            let (b, _) = before.home(key.as_bytes()).unwrap();
            let (a, _) = after.home(key.as_bytes()).unwrap();
            if b != a {
                assert_eq!(b, 3, "only node 3's keys move");
                moved += 1;
            }
        }
        assert!(moved > 500 && moved < 1500, "about a third moves: {moved}");
    }
}

//! A point-in-time view of one group on one node, for admin RPCs and metrics.

/// Raft role of this node in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(r: raft::StateRole) -> Self {
        match r {
            raft::StateRole::Follower => Role::Follower,
            raft::StateRole::PreCandidate => Role::PreCandidate,
            raft::StateRole::Candidate => Role::Candidate,
            raft::StateRole::Leader => Role::Leader,
        }
    }
}

/// Who leads a group as one node sees it: what
/// [`GroupHandle::watch_leader`](crate::GroupHandle::watch_leader)
/// publishes each time it changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaderView {
    pub term: u64,
    /// None while this node knows no leader (an election is on).
    pub leader: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: u64,
    pub node: u64,
    pub role: Role,
    pub term: u64,
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
    /// That leader's address, when it is another node the transport knows.
    pub leader_addr: Option<String>,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: the highest log index known replicated on each
    /// member, by node id (empty on followers).
    pub matched: Vec<(u64, u64)>,
    /// Proposals (including membership changes) this node accepted as
    /// leader since it started.
    pub proposals: u64,
    /// Snapshots this node took and installed since it started.
    pub snapshots_taken: u64,
    pub snapshots_installed: u64,
    /// False once the driver stopped (shutdown or a storage failure).
    pub running: bool,
}

impl GroupStatus {
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// The error for a request only the leader may answer, with this
    /// node's hint (as the driver gives it).
    pub fn not_leader(&self) -> crate::Error {
        let other = self.leader.filter(|l| *l != self.node);
        crate::Error::NotLeader {
            leader: other,
            leader_addr: other.and(self.leader_addr.clone()),
            term: self.term,
        }
    }

    /// The proto form served by admin APIs.
    pub fn to_proto(&self) -> proto::common::v1::GroupStatus {
        use proto::common::v1::RaftRole;
        let role = match self.role {
            Role::Follower => RaftRole::Follower,
            Role::PreCandidate => RaftRole::PreCandidate,
            Role::Candidate => RaftRole::Candidate,
            Role::Leader => RaftRole::Leader,
        };
        proto::common::v1::GroupStatus {
            group_id: self.group,
            node_id: self.node,
            role: role as i32,
            term: self.term,
            leader_id: self.leader.unwrap_or(0),
            commit_index: self.commit,
            applied_index: self.applied,
            last_index: self.last_index,
            snapshot_index: self.snapshot_index,
            voters: self.voters.clone(),
            learners: self.learners.clone(),
        }
    }
}

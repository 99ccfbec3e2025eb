//! `dsync.admin.v1.Admin`: status and membership of a replica's Raft
//! groups, served by every service.
//!
//! Membership path (used by StatefulSet scaling, see `k8s/README.md`):
//! - scale up: the new replica starts empty and calls `AddMember` for
//!   itself; the leader adds it to every group as a learner, waits until it
//!   has replicated the log (or a snapshot), then promotes it to voter;
//! - scale down: `RemoveMember` for the replica about to go (the leader
//!   first hands leadership away if it is the one being removed).

use std::time::{Duration, Instant};

use consensus::grpc_status::to_status;
use consensus::{Error, GroupStatus, Node};
use proto::admin::v1::admin_server::Admin;
use proto::admin::v1::*;
use tonic::{Request, Response, Status};

/// How long `AddMember` waits for a learner to catch up before promoting.
const CATCH_UP: Duration = Duration::from_secs(60);

pub struct AdminService {
    pub service: &'static str,
    pub node: Node,
    pub advertise: String,
    pub features: Vec<&'static str>,
    /// Turns true when the replica stops: ends `WatchLeader` streams, which
    /// would otherwise hold a graceful shutdown open.
    pub closed: tokio::sync::watch::Receiver<bool>,
}

/// The stream `WatchLeader` answers with.
pub type LeaderStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchLeaderResponse, Status>> + Send>>;

/// True when every group has this node as a member and knows a leader.
pub fn healthy(node: &Node) -> bool {
    let all = node.status();
    !all.is_empty()
        && all.iter().all(|s| {
            s.running
                && s.leader.is_some()
                && (s.voters.contains(&s.node) || s.learners.contains(&s.node))
        })
}

/// Where the replicas reach node `id`, as replica `node` (advertising
/// `advertise`) knows it: its own advertise address, else its peer address
/// (empty when unknown).
fn node_addr(node: &Node, advertise: &str, id: u64) -> String {
    if id == node.id() {
        advertise.to_owned()
    } else {
        node.transport().peer_addr(id).unwrap_or_default()
    }
}

impl AdminService {
    fn members(&self, s: &GroupStatus) -> Vec<Member> {
        let addr = |id: u64| node_addr(&self.node, &self.advertise, id);
        s.voters
            .iter()
            .map(|&id| Member {
                node_id: id,
                addr: addr(id),
                voter: true,
            })
            .chain(s.learners.iter().map(|&id| Member {
                node_id: id,
                addr: addr(id),
                voter: false,
            }))
            .collect()
    }

    fn first(&self) -> Result<GroupStatus, Status> {
        self.node
            .status()
            .into_iter()
            .next()
            .ok_or_else(|| Status::unavailable("no Raft group is running on this replica"))
    }

    fn leader_groups(&self) -> Result<Vec<consensus::GroupHandle>, Status> {
        let mut out = Vec::new();
        for g in self.node.groups() {
            let h = self
                .node
                .group(g)
                .ok_or_else(|| to_status(&Error::Stopped(g), g))?;
            let s = h.status();
            if !s.is_leader() {
                let leader_addr = s.leader.and_then(|l| self.node.transport().peer_addr(l));
                return Err(to_status(
                    &Error::NotLeader {
                        leader: s.leader,
                        leader_addr,
                        term: s.term,
                    },
                    g,
                ));
            }
            out.push(h);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchLeaderStream = LeaderStream;

    async fn watch_leader(
        &self,
        req: Request<WatchLeaderRequest>,
    ) -> Result<Response<LeaderStream>, Status> {
        let group = match req.into_inner().group_id {
            0 => self.first()?.group,
            g => g,
        };
        let h = self
            .node
            .group(group)
            .ok_or_else(|| Status::not_found(format!("no Raft group {group} on this replica")))?;
        let (node, advertise) = (self.node.clone(), self.advertise.clone());
        let hint = move |v: consensus::LeaderView| WatchLeaderResponse {
            node_id: node.id(),
            leader: Some(proto::common::v1::LeaderHint {
                leader_id: v.leader.unwrap_or(0),
                leader_addr: v
                    .leader
                    .map(|l| node_addr(&node, &advertise, l))
                    .unwrap_or_default(),
                group_id: group,
                term: v.term,
            }),
        };
        let state = Some((h.watch_leader(), self.closed.clone(), true));
        let events = futures::stream::unfold(state, move |state| {
            let hint = hint.clone();
            async move {
                let (mut rx, mut closed, first) = state?;
                if !first {
                    let stopped = tokio::select! {
                        changed = rx.changed() => changed.is_err(),
                        _ = closed.wait_for(|c| *c) => true,
                    };
                    if stopped {
                        let end = Status::unavailable("the replica stopped: watch another one");
                        return Some((Err(end), None));
                    }
                }
                let view = *rx.borrow_and_update();
                Some((Ok(hint(view)), Some((rx, closed, false))))
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let all = self.node.status();
        let members = all.first().map(|s| self.members(s)).unwrap_or_default();
        Ok(Response::new(StatusResponse {
            service: self.service.to_owned(),
            node_id: self.node.id(),
            addr: self.advertise.clone(),
            groups: all.iter().map(GroupStatus::to_proto).collect(),
            members,
            healthy: healthy(&self.node),
            features: self.features.iter().map(|f| f.to_string()).collect(),
        }))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        let r = req.into_inner();
        if r.node_id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("node_id and addr are required"));
        }
        for h in self.leader_groups()? {
            let g = h.id();
            let s = h.status();
            if s.voters.contains(&r.node_id) {
                continue;
            }
            if !s.learners.contains(&r.node_id) {
                h.add_learner(r.node_id, &r.addr)
                    .await
                    .map_err(|e| to_status(&e, g))?;
            }
            if !r.promote {
                continue;
            }
            // Promote only once the learner holds the log up to the commit
            // index of when it was added: promoting an empty node would
            // make quorum depend on a replica that has nothing yet.
            let target = h.status().commit;
            let deadline = Instant::now() + CATCH_UP;
            loop {
                let st = h.status();
                if !st.is_leader() {
                    return Err(Status::unavailable(format!(
                        "leadership of group {g} moved while adding node {}; retry",
                        r.node_id
                    )));
                }
                let matched = st
                    .matched
                    .iter()
                    .find(|(id, _)| *id == r.node_id)
                    .map_or(0, |(_, m)| *m);
                if matched >= target {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "node {} is a learner of group {g} but did not catch up ({matched}/{target}) within {}s; \
                         it stays a learner, retry to promote",
                        r.node_id,
                        CATCH_UP.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            h.promote(r.node_id).await.map_err(|e| to_status(&e, g))?;
            tracing::info!(group = g, node = r.node_id, addr = %r.addr, "member added and promoted");
        }
        let members = self.members(&self.first()?);
        Ok(Response::new(AddMemberResponse { members }))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        let id = req.into_inner().node_id;
        if id == 0 {
            return Err(Status::invalid_argument("node_id is required"));
        }
        for h in self.leader_groups()? {
            let g = h.id();
            let s = h.status();
            if !s.voters.contains(&id) && !s.learners.contains(&id) {
                continue;
            }
            if id == s.node {
                // Hand leadership away first; the client retries on the
                // new leader, which removes this node.
                let to =
                    s.voters.iter().copied().find(|&v| v != id).ok_or_else(|| {
                        Status::failed_precondition("cannot remove the last voter")
                    })?;
                h.transfer_leader(to).await.map_err(|e| to_status(&e, g))?;
                return Err(to_status(
                    &Error::NotLeader {
                        leader: Some(to),
                        leader_addr: self.node.transport().peer_addr(to),
                        term: s.term,
                    },
                    g,
                ));
            }
            if s.voters.len() == 1 && s.voters.contains(&id) {
                return Err(Status::failed_precondition("cannot remove the last voter"));
            }
            h.remove(id).await.map_err(|e| to_status(&e, g))?;
            tracing::info!(group = g, node = id, "member removed");
        }
        let members = self.members(&self.first()?);
        Ok(Response::new(RemoveMemberResponse { members }))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let to = req.into_inner().to_node_id;
        for h in self.leader_groups()? {
            h.transfer_leader(to)
                .await
                .map_err(|e| to_status(&e, h.id()))?;
        }
        Ok(Response::new(TransferLeaderResponse {}))
    }
}

//! Translating consensus errors to gRPC statuses, the same way in every
//! service: a non-leader answers `UNAVAILABLE` with a [`LeaderHint`] in the
//! `dsync-leader-bin` metadata, which clients decode with [`leader_hint`].

use prost::Message as _;
use proto::common::v1::LeaderHint;
use proto::LEADER_HINT_METADATA;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::Error;

/// The gRPC status for a consensus error on `group`, with the leader hint
/// attached when there is one.
pub fn to_status(e: &Error, group: u64) -> Status {
    match e {
        Error::NotLeader {
            leader,
            leader_addr,
        } => {
            let hint = LeaderHint {
                leader_id: leader.unwrap_or(0),
                leader_addr: leader_addr.clone().unwrap_or_default(),
                group_id: group,
                term: 0,
            };
            let msg = match (leader, leader_addr) {
                (Some(id), Some(addr)) => format!("not the leader of group {group}; leader is node {id} at {addr}"),
                (Some(id), None) => format!("not the leader of group {group}; leader is node {id}"),
                _ => format!("group {group} has no leader right now (election in progress); retry shortly"),
            };
            let mut status = Status::new(Code::Unavailable, msg);
            status.metadata_mut().insert_bin(
                LEADER_HINT_METADATA,
                MetadataValue::from_bytes(&hint.encode_to_vec()),
            );
            status
        }
        Error::Timeout => Status::new(
            Code::DeadlineExceeded,
            format!("group {group}: timed out before commit; the request may or may not have been applied"),
        ),
        Error::Dropped(why) => Status::new(
            Code::Unavailable,
            format!("group {group}: request dropped ({why}); it was not applied, retry"),
        ),
        Error::Stopped(_) => Status::new(
            Code::Unavailable,
            format!("group {group} is not running on this replica"),
        ),
        Error::Invalid(why) => Status::new(Code::InvalidArgument, why.clone()),
        Error::Storage(why) => Status::new(Code::Internal, format!("storage failure: {why}")),
    }
}

pub use proto::leader_hint;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_round_trips_its_hint() {
        let e = Error::NotLeader {
            leader: Some(3),
            leader_addr: Some("10.0.0.3:7000".into()),
        };
        let st = to_status(&e, 9);
        assert_eq!(st.code(), Code::Unavailable);
        assert!(st.message().contains("node 3 at 10.0.0.3:7000"));
        let hint = leader_hint(&st).unwrap();
        assert_eq!(hint.leader_id, 3);
        assert_eq!(hint.leader_addr, "10.0.0.3:7000");
        assert_eq!(hint.group_id, 9);
        assert_eq!(
            to_status(&Error::Invalid("x".into()), 1).code(),
            Code::InvalidArgument
        );
        assert!(leader_hint(&to_status(&Error::Timeout, 1)).is_none());
    }
}

//! Translating consensus errors to gRPC statuses, the same way in every
//! service. Each carries a `google.rpc.ErrorInfo` (see `proto::status`)
//! whose reason says what the caller can do:
//!
//! | error | code | reason |
//! |---|---|---|
//! | not the leader, leader known | `UNAVAILABLE` | `NOT_LEADER` (+ `LeaderHint`) |
//! | no leader (election) | `UNAVAILABLE` | `NO_LEADER` (+ `LeaderHint`, id 0) |
//! | timed out before commit, or superseded / stopped in flight | `UNAVAILABLE` | `OUTCOME_UNKNOWN` |
//! | dropped, not applied | `UNAVAILABLE` | `NOT_APPLIED` |
//! | group stopped here | `UNAVAILABLE` | `REPLICA_STOPPING` |
//! | invalid request | `INVALID_ARGUMENT` | `INVALID_ARGUMENT` |
//! | storage failure | `INTERNAL` | `STORAGE_FAILURE` |

use proto::common::v1::LeaderHint;
use proto::status::{error, with_leader_hint};
use tonic::{Code, Status};

use crate::error::Error;

/// The gRPC status for a consensus error on `group`, with the leader hint
/// attached when this replica is not the leader.
pub fn to_status(e: &Error, group: u64) -> Status {
    let g = ("group_id", group.to_string());
    match e {
        Error::NotLeader {
            leader,
            leader_addr,
            term,
        } => {
            let hint = LeaderHint {
                leader_id: leader.unwrap_or(0),
                leader_addr: leader_addr.clone().unwrap_or_default(),
                group_id: group,
                term: *term,
            };
            let msg = match (leader, leader_addr) {
                (Some(id), Some(addr)) => format!("not the leader of group {group}; leader is node {id} at {addr}"),
                (Some(id), None) => format!("not the leader of group {group}; leader is node {id}"),
                _ => format!("group {group} has no leader right now (election in progress); retry shortly"),
            };
            let reason = if leader.is_some() { "NOT_LEADER" } else { "NO_LEADER" };
            let metadata = [
                g,
                ("leader_id", hint.leader_id.to_string()),
                ("leader_addr", hint.leader_addr.clone()),
                ("term", term.to_string()),
            ];
            with_leader_hint(Code::Unavailable, msg, reason, metadata, &hint)
        }
        Error::Timeout => error(
            Code::Unavailable,
            format!("group {group}: timed out before commit; the request may or may not have been applied (retry with the same request_id)"),
            "OUTCOME_UNKNOWN",
            [g],
        ),
        Error::Unknown(why) => error(
            Code::Unavailable,
            format!("group {group}: the outcome is unknown ({why}); the request may or may not have been applied (retry with the same request_id)"),
            "OUTCOME_UNKNOWN",
            [g],
        ),
        Error::Dropped(why) => error(
            Code::Unavailable,
            format!("group {group}: request dropped ({why}); it was not applied, retry"),
            "NOT_APPLIED",
            [g],
        ),
        Error::Stopped(_) => error(
            Code::Unavailable,
            format!("group {group} is not running on this replica; retry on another"),
            "REPLICA_STOPPING",
            [g],
        ),
        Error::Invalid(why) => error(Code::InvalidArgument, why.clone(), "INVALID_ARGUMENT", [g]),
        Error::Storage(why) => error(
            Code::Internal,
            format!("storage failure: {why}"),
            "STORAGE_FAILURE",
            [g],
        ),
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
            term: 7,
        };
        let st = to_status(&e, 9);
        assert_eq!(st.code(), Code::Unavailable);
        assert!(st.message().contains("node 3 at 10.0.0.3:7000"));
        let hint = leader_hint(&st).unwrap();
        assert_eq!(hint.leader_id, 3);
        assert_eq!(hint.leader_addr, "10.0.0.3:7000");
        assert_eq!(hint.group_id, 9);
        assert_eq!(hint.term, 7);
        // The same hint, from the metadata entry older clients read.
        let md = st.metadata().get_bin(proto::LEADER_HINT_METADATA).unwrap();
        let raw = md.to_bytes().unwrap();
        assert_eq!(
            <LeaderHint as prost::Message>::decode(raw.as_ref()).unwrap(),
            hint
        );
        let info = proto::status::error_info(&st).unwrap();
        assert_eq!(info.reason, "NOT_LEADER");
        assert_eq!(info.domain, "dsync.io");
        assert_eq!(info.metadata["leader_addr"], "10.0.0.3:7000");
        assert_eq!(info.metadata["term"], "7");
        let timeout = to_status(&Error::Timeout, 1);
        assert_eq!(timeout.code(), Code::Unavailable);
        assert_eq!(proto::status::reason(&timeout), "OUTCOME_UNKNOWN");
        assert_eq!(
            to_status(&Error::Invalid("x".into()), 1).code(),
            Code::InvalidArgument
        );
        assert!(leader_hint(&to_status(&Error::Timeout, 1)).is_none());
    }
}

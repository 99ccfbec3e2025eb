//! Generated gRPC code for every dsync API, compiled from `proto/` at build
//! time. Nothing hand-written lives here except the module tree and the
//! encoded descriptor set that services hand to gRPC reflection.

/// Encoded `FileDescriptorSet` of every dsync proto, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("dsync.admin.v1");
    }
}

pub mod cache {
    pub mod v1 {
        tonic::include_proto!("dsync.cache.v1");
        /// The node-to-node coherence protocol of cache-svc.
        pub mod internal {
            tonic::include_proto!("dsync.cache.v1.internal");
        }
    }
}

pub mod common {
    pub mod v1 {
        tonic::include_proto!("dsync.common.v1");
    }
}

pub mod demo {
    pub mod v1 {
        tonic::include_proto!("dsync.demo.v1");
    }
}

pub mod lock {
    pub mod v1 {
        tonic::include_proto!("dsync.lock.v1");
        /// Raft commands and outcomes of lock-svc's state machine.
        pub mod internal {
            tonic::include_proto!("dsync.lock.v1.internal");
        }
    }
}

pub mod queue {
    pub mod v1 {
        tonic::include_proto!("dsync.queue.v1");
    }
}

/// etcd's lease and lock APIs (a subset, under `proto/thirdparty/etcd`),
/// for running the lock benchmark against etcd. Not part of dsync's API.
pub mod etcd {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("dsync.raft.v1");
    }
}

/// Metadata key under which a non-leader replica attaches the encoded
/// [`common::v1::LeaderHint`] to an `UNAVAILABLE` status.
pub const LEADER_HINT_METADATA: &str = "dsync-leader-bin";

/// The [`common::v1::LeaderHint`] a non-leader attached to a status, if any
/// (from the status details, else from the `dsync-leader-bin` metadata).
pub fn leader_hint(status: &tonic::Status) -> Option<common::v1::LeaderHint> {
    if let Some(h) = status::leader_hint_detail(status) {
        return Some(h);
    }
    let v = status.metadata().get_bin(LEADER_HINT_METADATA)?;
    let bytes = v.to_bytes().ok()?;
    <common::v1::LeaderHint as prost::Message>::decode(bytes.as_ref()).ok()
}

/// Rich error statuses: every dsync error carries a `google.rpc.Status`
/// in `grpc-status-details-bin` with a `google.rpc.ErrorInfo` (domain
/// [`DOMAIN`](status::DOMAIN), a `reason` from the table in lock.proto and
/// string metadata), and a not-leader error also carries the
/// [`common::v1::LeaderHint`] as a second detail. Servers build them here;
/// clients in any language decode them with their gRPC library's
/// status-details support.
pub mod status {
    use prost::Message as _;
    use tonic::metadata::MetadataValue;
    use tonic::{Code, Status};
    use tonic_types::pb;

    use crate::common::v1::LeaderHint;

    /// `ErrorInfo.domain` of every dsync error.
    pub const DOMAIN: &str = "dsync.io";
    const ERROR_INFO_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";
    const LEADER_HINT_URL: &str = "type.googleapis.com/dsync.common.v1.LeaderHint";

    /// A status with an `ErrorInfo` detail.
    pub fn error<K: Into<String>, V: Into<String>>(
        code: Code,
        message: impl Into<String>,
        reason: &str,
        metadata: impl IntoIterator<Item = (K, V)>,
    ) -> Status {
        build(code, message.into(), reason, metadata, None)
    }

    /// A status with an `ErrorInfo` and a [`LeaderHint`] detail; the hint is
    /// also put in the `dsync-leader-bin` metadata entry.
    pub fn with_leader_hint<K: Into<String>, V: Into<String>>(
        code: Code,
        message: impl Into<String>,
        reason: &str,
        metadata: impl IntoIterator<Item = (K, V)>,
        hint: &LeaderHint,
    ) -> Status {
        build(code, message.into(), reason, metadata, Some(hint))
    }

    fn build<K: Into<String>, V: Into<String>>(
        code: Code,
        message: String,
        reason: &str,
        metadata: impl IntoIterator<Item = (K, V)>,
        hint: Option<&LeaderHint>,
    ) -> Status {
        let info = pb::ErrorInfo {
            reason: reason.to_owned(),
            domain: DOMAIN.to_owned(),
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        };
        let mut details = vec![prost_types::Any {
            type_url: ERROR_INFO_URL.to_owned(),
            value: info.encode_to_vec(),
        }];
        let mut md = tonic::metadata::MetadataMap::new();
        if let Some(h) = hint {
            let bytes = h.encode_to_vec();
            md.insert_bin(
                crate::LEADER_HINT_METADATA,
                MetadataValue::from_bytes(&bytes),
            );
            details.push(prost_types::Any {
                type_url: LEADER_HINT_URL.to_owned(),
                value: bytes,
            });
        }
        let rpc = pb::Status {
            code: code as i32,
            message: message.clone(),
            details,
        };
        Status::with_details_and_metadata(code, message, rpc.encode_to_vec().into(), md)
    }

    fn details(status: &Status) -> Vec<prost_types::Any> {
        pb::Status::decode(status.details())
            .map(|s| s.details)
            .unwrap_or_default()
    }

    /// The `ErrorInfo` of a status, if it has one.
    pub fn error_info(status: &Status) -> Option<pb::ErrorInfo> {
        details(status)
            .into_iter()
            .find(|a| a.type_url == ERROR_INFO_URL)
            .and_then(|a| pb::ErrorInfo::decode(a.value.as_slice()).ok())
    }

    /// The `ErrorInfo` reason of a status ("" when it has none).
    pub fn reason(status: &Status) -> String {
        error_info(status).map(|i| i.reason).unwrap_or_default()
    }

    /// The [`LeaderHint`] detail of a status, if it has one.
    pub fn leader_hint_detail(status: &Status) -> Option<LeaderHint> {
        details(status)
            .into_iter()
            .find(|a| a.type_url == LEADER_HINT_URL)
            .and_then(|a| LeaderHint::decode(a.value.as_slice()).ok())
    }
}

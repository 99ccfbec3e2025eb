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

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("dsync.raft.v1");
    }
}

/// Metadata key under which a non-leader replica attaches the encoded
/// [`common::v1::LeaderHint`] to an `UNAVAILABLE` status.
pub const LEADER_HINT_METADATA: &str = "dsync-leader-bin";

/// The [`common::v1::LeaderHint`] a non-leader attached to a status, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<common::v1::LeaderHint> {
    let v = status.metadata().get_bin(LEADER_HINT_METADATA)?;
    let bytes = v.to_bytes().ok()?;
    <common::v1::LeaderHint as prost::Message>::decode(bytes.as_ref()).ok()
}

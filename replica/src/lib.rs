//! The state baton's coordinators must agree on, replicated among them with raft (openraft)
//! and persisted in each coordinator's embedded database (redb).
//!
//! ```text
//! operator / cloud path --propose(Command)--> [Replica] --(follower: Propose RPC)--> leader
//! leader: append to the raft log --AppendEntries (gRPC, baton.v1.Replica)--> followers
//! committed entries --apply--> State (every coordinator, same order) --> placement reads it
//! ```
//!
//! Worker membership is not here (discovery owns it: mDNS on a LAN, etcd on Kubernetes); only
//! decisions: which workers an operator drained or refused, and the cloud budget ledger (its
//! reservations decided when applied, so the log orders two coordinators' last dollar). One
//! coordinator is a one-node group running the same code.
//!
//! Why openraft rather than the `raft` crate the design names: openraft is async on tokio (our
//! runtime) and drives itself, with storage and network as traits we implement over redb and
//! tonic, and ships a conformance suite for the storage; the `raft` crate is a core we would
//! drive by hand (ticks, `Ready` handling, the order of persisting and sending), which is the
//! part most easily gotten wrong, and it brings a second protobuf stack and slog.
//! docs/architecture.md has the longer note.

mod config;
pub mod loopback;
mod network;
mod node;
pub mod state;
mod store;

pub use config::{ReplicaConfig, ReplicaConfigError};
pub use node::{ProposeError, Replica, Status};
pub use state::{Command, CommandId, Decision, DecisionKind, Owner, Proposal, Response, State};
pub use store::{LogStore, StateMachine, open_storage, read_state};

use std::io::Cursor;

openraft::declare_raft_types!(
    /// openraft's types for baton's replicated state.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A raft node id: each coordinator's, configured, stable across restarts.
pub type NodeId = u64;

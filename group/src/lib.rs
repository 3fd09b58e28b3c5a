//! Worker groups as processes (issue 21): each rank of a tensor- and pipeline-parallel group is
//! its own process holding its shard ([`baton_engine::Shard`]); the group's driver gives every
//! rank the same operations ([`RankOp`]) in the same order over one TCP link per rank, so their
//! sequences and block tables stay identical.
//!
//! ```text
//! driver (the worker serving the group) --RankOp frames--> rank 0 .. rank N*M-1 (`baton rank`)
//!   step: stage 0's ranks embed and run their layers (TP ranks all-reduce through /dev/shm)
//!         --hidden states (to the driver, then to stage 1's ranks)--> ... --> last stage rank 0
//!         --logits--> driver
//! ```
//!
//! A rank proves the group's secret when it connects and names its shard; the driver refuses a
//! rank whose shard, model or layout does not fit the group, before any operation. A rank that
//! dies closes its link: the driver's operation fails at once (`Unavailable`), and the ranks
//! of its stage fail their all-reduce after the collective's time-out instead of hanging.
//!
//! Hidden states pass through the driver between stages: they are small (one row of the hidden
//! width per token: 2.3 KB per decoded token on SmolLM2) next to the KV, which moves rank to rank.

pub mod driver;
pub mod launch;
pub mod rank;
pub mod wire;

pub use baton_engine::local_group::{RankOp, RankReply};
pub use driver::RemoteGroup;
pub use launch::{GroupConfig, SECRET_ENV, load_engine, stages};
pub use rank::{RankArgs, serve_rank};

use baton_core::ErrorClass;

/// Why a group operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot work, naming it.
    #[error("{field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A rank's link closed or timed out: the rank died, hangs, or its host is gone.
    #[error("rank {rank}: link lost: {reason}")]
    RankLost { rank: usize, reason: String },
    /// A peer sent bytes that are not a frame of this protocol.
    #[error("rank {rank}: bad frame: {reason}")]
    BadFrame { rank: usize, reason: String },
    /// The group refused a rank (or the rank's own check refused the group).
    #[error("rank {rank} refused: {reason}")]
    Refused { rank: usize, reason: String },
    /// The rank's engine failed the operation.
    #[error("rank {rank}: {message}")]
    Rank {
        rank: usize,
        class: ErrorClass,
        message: String,
    },
    #[error(transparent)]
    Engine(#[from] baton_engine::Error),
    #[error(transparent)]
    Collective(#[from] baton_collective::Error),
}

impl Error {
    /// The class of this error, for the mapping at the serving edge.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidConfig { .. } | Error::Refused { .. } => ErrorClass::InvalidRequest,
            Error::RankLost { .. } | Error::BadFrame { .. } | Error::Collective(_) => {
                ErrorClass::Unavailable
            }
            Error::Rank { class, .. } => *class,
            Error::Engine(e) => e.class(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

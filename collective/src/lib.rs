//! Collectives between the ranks of a tensor-parallel worker group (issue 21): after the
//! attention output and MLP down projections each rank holds a partial sum of the same
//! activations, and an all-reduce gives every rank the whole.
//!
//! ```text
//! rank r: partial[r] --all_reduce_sum--> [Collective] --> sum over ranks 0..n, in rank order
//!           shm (one host, CPU): slots in one shared segment, futex barriers
//!           nccl (GPUs, `cuda` feature): later
//! ```
//!
//! Invariants: every rank gets the same bits, summed in rank order (0 + 1 + ... + n-1), so a
//! group's results do not depend on which rank arrived first; a rank waits blocked in the
//! kernel, never spinning (TP 3 on 2 cores would starve the rank it waits for); a rank that never
//! arrives fails the others' call after the group's time-out instead of hanging them.

mod shm;

use std::time::Duration;

pub use shm::ShmGroup;

/// What the ranks of one group do together.
pub trait Collective: Send + Sync {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn world(&self) -> usize;
    /// The most values one call carries; a caller with more splits them (a sum is elementwise,
    /// so where it splits changes no bit).
    fn capacity(&self) -> usize;
    /// Replaces `data` on every rank with the elementwise sum of every rank's `data`, added in
    /// rank order. Every rank calls it with the same length.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), Error>;
}

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting that cannot work, naming it.
    #[error("{field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The shared segment could not be made or mapped.
    #[error("{path}: {reason}")]
    Segment { path: String, reason: String },
    /// More values than the group's slots hold.
    #[error("all-reduce of {len} values is larger than the group's {max}")]
    TooLarge { len: usize, max: usize },
    /// Some rank did not arrive in time: it died or hangs. The group is broken: every later
    /// call on any rank fails at once.
    #[error("the group is broken: a rank did not arrive within {waited:?}")]
    Broken { waited: Duration },
}

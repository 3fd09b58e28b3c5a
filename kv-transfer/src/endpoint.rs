//! Where a worker's transfer agent is reached: one endpoint per backend it listens on.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a worker's transfer agent accepts connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// The Unix socket of an agent on this host that speaks shared memory.
    Shm(PathBuf),
}

impl Endpoint {
    /// The backend that serves this endpoint.
    pub fn transport(&self) -> crate::agent::Transport {
        match self {
            Endpoint::Tcp(_) => crate::agent::Transport::Tcp,
            Endpoint::Shm(_) => crate::agent::Transport::Shm,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Shm(p) => write!(f, "shm://{}", p.display()),
        }
    }
}

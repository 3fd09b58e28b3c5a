//! Where a role finds its mutual-TLS certificates (`[coordinator.tls]`, `[prefill.tls]`,
//! `[decode.tls]`). Only the paths: `baton-proto`'s `tls` module reads them into tonic's
//! configurations, and `baton certs` writes a development set.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// PEM files of one process's identity in the cluster's certificate authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate: a peer must present a certificate it signed.
    pub ca: PathBuf,
    /// This process's certificate (`baton certs` writes one per role).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The name a role's certificate carries (its DNS subject alternative name) and a client checks,
/// whatever address the peer has: workers are found by IP, so the role is the name.
pub fn server_name(role: &str) -> String {
    format!("baton-{role}")
}

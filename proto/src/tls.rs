//! Mutual TLS on baton's gRPC hops (coordinator -> workers): tonic's server and client
//! configurations from a role's [`TlsFiles`]. A worker serving with one accepts only clients
//! whose certificate the cluster CA signed; the coordinator checks a worker's certificate
//! against the same CA and the role's name ([`server_name`]), not the address it dialled.

use baton_core::tls::{TlsFiles, server_name};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A certificate file that cannot be used, naming the key (`tls.ca`, `tls.cert`, `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TlsError {
    pub field: &'static str,
    pub reason: String,
}

fn pem(files: &TlsFiles, field: &'static str) -> Result<Vec<u8>, TlsError> {
    let path = match field {
        "tls.ca" => &files.ca,
        "tls.cert" => &files.cert,
        _ => &files.key,
    };
    let bytes = std::fs::read(path).map_err(|e| TlsError {
        field,
        reason: format!("{}: {e}", path.display()),
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError {
            field,
            reason: format!("{} is not a PEM file", path.display()),
        });
    }
    Ok(bytes)
}

fn identity(files: &TlsFiles) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        pem(files, "tls.cert")?,
        pem(files, "tls.key")?,
    ))
}

/// A worker's server side: its identity, and clients must present a certificate the CA signed.
pub fn server_config(files: &TlsFiles) -> Result<ServerTlsConfig, TlsError> {
    Ok(ServerTlsConfig::new()
        .identity(identity(files)?)
        .client_ca_root(Certificate::from_pem(pem(files, "tls.ca")?)))
}

/// The coordinator's side of a hop to a worker of `role`: its own identity, and the worker's
/// certificate must be the CA's and name the role.
pub fn client_config(files: &TlsFiles, role: &str) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(files, "tls.ca")?))
        .identity(identity(files)?)
        .domain_name(server_name(role)))
}

//! Discovery settings, shared by the coordinator (which watches) and the workers (which
//! announce): the `[coordinator.discovery]`, `[prefill.discovery]` and `[decode.discovery]`
//! tables.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::advert::{ClusterKey, check_cluster_name};
use crate::error::{Error, Result};

/// Which backend finds workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Addresses typed in config (the coordinator's `prefill_workers` and `decode_workers`);
    /// workers announce nothing.
    #[default]
    Static,
    /// Multicast DNS on the local network (`_baton._tcp.local.`): start a worker on any
    /// machine of the LAN and the coordinator finds it.
    Mdns,
    /// Keys under `/baton/<cluster>/workers/` in etcd, each under a lease the worker keeps
    /// alive (Kubernetes).
    Etcd,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "static" => Ok(Self::Static),
            "mdns" => Ok(Self::Mdns),
            "etcd" => Ok(Self::Etcd),
            other => Err(format!("{other:?} is not one of static, mdns, etcd")),
        }
    }
}

/// etcd's knobs (`[*.discovery.etcd]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// etcd client URLs. Default ["http://127.0.0.1:2379"].
    pub endpoints: Vec<String>,
    /// A worker's lease: its key disappears this long after the worker stops renewing it
    /// (a duration, 2 s to 5 min). Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            lease_ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// `static`, `mdns` or `etcd`. Default `static`.
    pub backend: BackendKind,
    /// The cluster's name: workers and coordinators of one cluster share it, and adverts of
    /// another are ignored (1 to 63 ASCII letters, digits, `-`). Default "baton".
    pub cluster: String,
    /// A file holding the cluster key (at least 16 bytes; `openssl rand -hex 32 > F`): every
    /// advert is signed with it and unsigned or wrongly signed ones are ignored. Required by
    /// `mdns` and `etcd`. Its contents are never printed. Default: unset.
    pub cluster_key_file: Option<PathBuf>,
    /// Coordinator: a discovered worker that answers no call for this long leaves the
    /// cluster's placement (its KV links close) until it answers again (a duration, 250 ms to
    /// 10 min). Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leave_after: Duration,
    /// Worker: the address other machines reach this worker's gRPC service at, where its
    /// listen address does not say (it listens on 0.0.0.0). Default: unset; under `mdns` the
    /// addresses mDNS resolves, under `etcd` the listen address.
    pub advertise_host: Option<String>,
    /// etcd's knobs (`[*.discovery.etcd]`).
    pub etcd: EtcdConfig,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Static,
            cluster: "baton".into(),
            cluster_key_file: None,
            leave_after: Duration::from_secs(5),
            advertise_host: None,
            etcd: EtcdConfig::default(),
        }
    }
}

impl DiscoveryConfig {
    /// Checks every field; `prefix` names the table in errors (`discovery`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if let Err(reason) = check_cluster_name(&self.cluster) {
            return bad("discovery.cluster", reason);
        }
        if self.leave_after < Duration::from_millis(250)
            || self.leave_after > Duration::from_secs(600)
        {
            return bad(
                "discovery.leave_after",
                "must be between 250 ms and 10 min".into(),
            );
        }
        if self.backend != BackendKind::Static && self.cluster_key_file.is_none() {
            return bad(
                "discovery.cluster_key_file",
                format!(
                    "the {} backend needs a cluster key (a file of at least {} bytes)",
                    match self.backend {
                        BackendKind::Mdns => "mdns",
                        _ => "etcd",
                    },
                    ClusterKey::MIN_LEN
                ),
            );
        }
        if let Some(host) = &self.advertise_host
            && (host.is_empty() || host.contains(['/', ' ']))
        {
            return bad(
                "discovery.advertise_host",
                format!("{host:?} is not a host name or address"),
            );
        }
        if self.backend == BackendKind::Etcd {
            if self.etcd.endpoints.is_empty() {
                return bad(
                    "discovery.etcd.endpoints",
                    "at least one endpoint is required".into(),
                );
            }
            if self.etcd.lease_ttl < Duration::from_secs(2)
                || self.etcd.lease_ttl > Duration::from_secs(300)
            {
                return bad(
                    "discovery.etcd.lease_ttl",
                    "must be between 2 s and 5 min".into(),
                );
            }
        }
        Ok(())
    }

    /// The cluster key, read from its file; `None` under `static` without a key file.
    pub fn key(&self) -> Result<Option<ClusterKey>> {
        self.cluster_key_file
            .as_deref()
            .map(ClusterKey::from_file)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_backends_need_a_key_and_name_the_field() {
        let config = DiscoveryConfig {
            backend: BackendKind::Mdns,
            ..DiscoveryConfig::default()
        };
        let err = config.validate().expect_err("no key");
        assert!(
            err.to_string().contains("discovery.cluster_key_file"),
            "{err}"
        );
        assert!(DiscoveryConfig::default().validate().is_ok());
        let err = DiscoveryConfig {
            cluster: "no spaces".into(),
            ..DiscoveryConfig::default()
        }
        .validate()
        .expect_err("bad name");
        assert!(err.to_string().contains("discovery.cluster"), "{err}");
    }
}

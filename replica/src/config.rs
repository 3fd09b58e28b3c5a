//! A replica's settings: its node id, where it listens for its peers, every member's address,
//! its database file and raft's timings. Checked once, naming the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_core::tls::TlsFiles;

/// One coordinator's place in the raft group.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This coordinator's node id; a key of `members`.
    pub node_id: u64,
    /// Where this coordinator serves its peers (`baton.v1.Replica`).
    pub listen: SocketAddr,
    /// Every member's node id and the address its peers reach it at (`host:port`), this one's
    /// included. Every coordinator of a group must list the same members.
    pub members: BTreeMap<u64, String>,
    /// The redb file holding the raft log and the state; empty: kept in memory (a one-node
    /// group only).
    pub data: PathBuf,
    /// The leader's heartbeat period.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in this range stands for election.
    pub election_timeout: (Duration, Duration),
    /// How long a proposal may wait for a leader (during an election) before it fails.
    pub propose_timeout: Duration,
    /// Mutual TLS between coordinators; required when `listen` is not on loopback.
    pub tls: Option<TlsFiles>,
    /// A snapshot of the state is taken after this many entries applied since the last one;
    /// the log before it is then dropped (but for `log_kept_after_snapshot` entries), and a
    /// replica that lags further is sent the snapshot instead.
    pub snapshot_after: u64,
    /// Entries kept behind a snapshot, so a replica that lags a little catches up from the log.
    pub log_kept_after_snapshot: u64,
}

/// A setting that cannot work, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ReplicaConfigError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ReplicaConfigError {
    ReplicaConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ReplicaConfig {
    /// A one-node group on `listen` (a single coordinator runs the same code as several).
    pub fn single(node_id: u64, listen: SocketAddr, data: PathBuf) -> ReplicaConfig {
        ReplicaConfig {
            node_id,
            listen,
            members: BTreeMap::from([(node_id, listen.to_string())]),
            data,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            propose_timeout: Duration::from_secs(5),
            tls: None,
            snapshot_after: 5000,
            log_kept_after_snapshot: 1000,
        }
    }

    pub fn validate(&self) -> Result<(), ReplicaConfigError> {
        if !self.members.contains_key(&self.node_id) {
            return Err(bad(
                "replica.members",
                format!("must include this coordinator's node id {}", self.node_id),
            ));
        }
        for (id, addr) in &self.members {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(bad(
                    format!("replica.members.{id}"),
                    format!("{addr:?} is not host:port"),
                ));
            }
        }
        if self.data.as_os_str().is_empty() && self.members.len() > 1 {
            return Err(bad(
                "replica.data",
                "a group of several coordinators needs each member's database file (a member \
                 restarted without its log would rejoin empty)",
            ));
        }
        let (min, max) = self.election_timeout;
        if self.heartbeat.is_zero() {
            return Err(bad("replica.heartbeat_ms", "must be above 0"));
        }
        if min <= self.heartbeat * 2 || max <= min {
            return Err(bad(
                "replica.election_timeout_ms",
                format!(
                    "needs heartbeat * 2 < min < max (heartbeat {} ms, range {}-{} ms)",
                    self.heartbeat.as_millis(),
                    min.as_millis(),
                    max.as_millis()
                ),
            ));
        }
        if self.snapshot_after == 0 {
            return Err(bad("replica.snapshot_after", "must be at least 1"));
        }
        if self.propose_timeout <= max {
            return Err(bad(
                "replica.propose_timeout_ms",
                "must be longer than the election timeout, or a proposal fails in every election",
            ));
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() {
            return Err(bad(
                "replica.listen",
                format!(
                    "{} is not on loopback: coordinators must reach each other over mutual TLS \
                     ([coordinator.tls])",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReplicaConfig {
        ReplicaConfig::single(
            1,
            "127.0.0.1:7000".parse().expect("as written"),
            "r.redb".into(),
        )
    }

    #[test]
    fn a_single_node_group_is_valid() {
        config().validate().expect("as written");
    }

    #[test]
    fn bad_settings_name_their_field() {
        let field = |c: ReplicaConfig| c.validate().expect_err("refused").field;
        let mut c = config();
        c.node_id = 2;
        assert_eq!(field(c), "replica.members");
        let mut c = config();
        c.members.insert(3, "nowhere".into());
        assert_eq!(field(c), "replica.members.3");
        let mut c = config();
        c.election_timeout = (Duration::from_millis(150), Duration::from_millis(600));
        assert_eq!(field(c), "replica.election_timeout_ms");
        let mut c = config();
        c.propose_timeout = Duration::from_millis(500);
        assert_eq!(field(c), "replica.propose_timeout_ms");
        let mut c = config();
        c.listen = "10.0.0.1:7000".parse().expect("as written");
        assert_eq!(field(c), "replica.listen");
    }
}

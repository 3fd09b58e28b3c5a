//! Whether a worker may serve on the addresses it binds: security may be off only while every
//! listener is on loopback. A worker reachable from other machines needs mutual TLS on its gRPC
//! port (`[<role>.tls]`: only the cluster's CA's certificates are served) and the cluster key
//! (`discovery.cluster_key_file`: KV links prove it at connect, events are signed with it);
//! without either it refuses to start unless `<role>.insecure_remote = true`, which then warns
//! on every start. A pure decision; the worker logs and refuses.

use std::net::SocketAddr;

/// What a worker is about to serve with.
#[derive(Debug, Clone)]
pub struct Exposure<'a> {
    /// `prefill` or `decode`: names the config keys in messages.
    pub role: &'a str,
    /// Each bound listener with the key that sets it (`listen`, `kv.tcp_listen`).
    pub listeners: Vec<(&'static str, SocketAddr)>,
    pub tls: bool,
    pub cluster_key: bool,
    pub insecure_remote: bool,
}

/// The decision on an [`Exposure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Loopback only, or secured.
    Serve,
    /// Beyond this host without security, allowed by `insecure_remote`: log this warning.
    ServeWarned(String),
    /// Refused: the field to change, and why.
    Refuse { field: &'static str, reason: String },
}

impl<'a> Exposure<'a> {
    /// A worker about to serve: `listen` (its bound gRPC address) and `kv_listen`, with what
    /// its config sets.
    pub fn of_worker(
        role: &'a str,
        listen: SocketAddr,
        kv_listen: SocketAddr,
        tls: bool,
        cluster_key: bool,
        insecure_remote: bool,
    ) -> Self {
        Self {
            role,
            listeners: vec![("listen", listen), ("kv.tcp_listen", kv_listen)],
            tls,
            cluster_key,
            insecure_remote,
        }
    }

    /// The verdict acted on: `Ok` to serve (the warning logged where there is one), else the
    /// field to change and why.
    pub fn enforce(&self) -> Result<(), (&'static str, String)> {
        match self.verdict() {
            Verdict::Serve => Ok(()),
            Verdict::ServeWarned(warning) => {
                tracing::warn!("{warning}");
                Ok(())
            }
            Verdict::Refuse { field, reason } => Err((field, reason)),
        }
    }

    pub fn verdict(&self) -> Verdict {
        let Some((key, addr)) = self.listeners.iter().find(|(_, a)| !a.ip().is_loopback()) else {
            return Verdict::Serve;
        };
        let role = self.role;
        let mut missing = Vec::new();
        if !self.tls {
            missing.push(format!(
                "[{role}.tls] (mutual TLS on gRPC; `baton certs` writes a set)"
            ));
        }
        if !self.cluster_key {
            missing.push(format!(
                "{role}.discovery.cluster_key_file (authenticates KV links and signs events)"
            ));
        }
        if missing.is_empty() {
            return Verdict::Serve;
        }
        if self.insecure_remote {
            Verdict::ServeWarned(format!(
                "{role}.{key} = {addr} is reachable beyond this host without {} ({role}.insecure_remote = true): any machine that reaches it can submit work, join its KV links and read KV",
                missing.join(" or ")
            ))
        } else {
            Verdict::Refuse {
                field: key,
                reason: format!(
                    "{addr} is reachable beyond this host, which needs {}; or set {role}.insecure_remote = true to serve without",
                    missing.join(" and ")
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure(listen: &str, kv: &str, tls: bool, key: bool, insecure: bool) -> Exposure<'static> {
        Exposure {
            role: "decode",
            listeners: vec![
                ("listen", listen.parse().expect("addr")),
                ("kv.tcp_listen", kv.parse().expect("addr")),
            ],
            tls,
            cluster_key: key,
            insecure_remote: insecure,
        }
    }

    #[test]
    fn loopback_serves_without_security() {
        let e = exposure("127.0.0.1:1", "[::1]:0", false, false, false);
        assert_eq!(e.verdict(), Verdict::Serve);
    }

    #[test]
    fn a_remote_listener_needs_tls_and_the_cluster_key() {
        for (tls, key, wants) in [
            (false, false, vec!["[decode.tls]", "cluster_key_file"]),
            (true, false, vec!["cluster_key_file"]),
            (false, true, vec!["[decode.tls]"]),
        ] {
            let e = exposure("127.0.0.1:1", "0.0.0.0:0", tls, key, false);
            let Verdict::Refuse { field, reason } = e.verdict() else {
                panic!("served without security: tls {tls} key {key}")
            };
            assert_eq!(field, "kv.tcp_listen");
            for w in wants {
                assert!(reason.contains(w), "{reason}");
            }
            assert!(reason.contains("decode.insecure_remote"), "{reason}");
        }
        let e = exposure("10.0.0.1:50062", "0.0.0.0:0", true, true, false);
        assert_eq!(e.verdict(), Verdict::Serve);
    }

    #[test]
    fn insecure_remote_serves_and_says_so() {
        let e = exposure("0.0.0.0:50062", "127.0.0.1:0", false, true, true);
        let Verdict::ServeWarned(w) = e.verdict() else {
            panic!("not warned")
        };
        assert!(
            w.contains("decode.listen") && w.contains("[decode.tls]"),
            "{w}"
        );
    }
}

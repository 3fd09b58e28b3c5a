//! Who may call the client APIs: API keys, kept in the configuration as SHA-256 hashes, each
//! with an optional request rate and concurrency limit. Both frontends ask [`Auth::admit`]
//! before anything else; the operator endpoints (`/health`, `/ready`, `/metrics`) and gRPC
//! health and reflection stay open.
//!
//! client --Authorization: Bearer KEY--> [auth] --Caller (name, concurrency permit)--> generate
//!
//! Invariants: a key itself is never stored, logged or printed, only its hash and its name; a
//! caller's concurrency permit lives as long as its request (the stream included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// One API key (`[[coordinator.auth.keys]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds it, in logs and metrics: ASCII letters, digits and -_.
    pub name: String,
    /// SHA-256 of the key, 64 hex digits (`baton keys new` makes a key and prints this line;
    /// or `printf %s "$KEY" | sha256sum`). The key itself is never in the configuration.
    pub sha256: String,
    /// Requests this key may start per minute (a bucket of a tenth of it refills
    /// continuously). Default: unset, no rate limit.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests of this key in flight at once (streams included). Default: unset, no limit
    /// beyond the coordinator's `max_inflight`.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

/// The client APIs' authentication (`[coordinator.auth]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// API keys clients present as `Authorization: Bearer KEY` (HTTP) or `authorization:
    /// Bearer KEY` metadata (gRPC). Default: none, no authentication, which is allowed only
    /// while both client listeners are on loopback (or with `insecure_remote`).
    pub keys: Vec<ApiKeyConfig>,
    /// Serve the client APIs without API keys on a non-loopback address anyway (a warning on
    /// every start). Default false: such a configuration does not start.
    pub insecure_remote: bool,
}

impl AuthConfig {
    /// Every bad value names its key under `auth.`.
    pub fn validate(&self, listeners: &[std::net::SocketAddr]) -> Result<()> {
        let bad = |field: String, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        for (i, key) in self.keys.iter().enumerate() {
            let ok_name = !key.name.is_empty()
                && key
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok_name {
                return bad(
                    format!("auth.keys[{i}].name"),
                    "must be ASCII letters, digits and -_.",
                );
            }
            if baton_core::hex::decode32(&key.sha256).is_none() {
                return bad(
                    format!("auth.keys[{i}].sha256"),
                    "must be 64 hex digits (the SHA-256 of the key, not the key)",
                );
            }
            if key.requests_per_minute == Some(0) {
                return bad(
                    format!("auth.keys[{i}].requests_per_minute"),
                    "must be positive",
                );
            }
            if key.max_concurrent == Some(0) {
                return bad(format!("auth.keys[{i}].max_concurrent"), "must be positive");
            }
            if let Some(j) = self.keys[..i].iter().position(|k| k.name == key.name) {
                return bad(
                    format!("auth.keys[{i}].name"),
                    &format!("{:?} is also the name of auth.keys[{j}]", key.name),
                );
            }
            if let Some(j) = self.keys[..i]
                .iter()
                .position(|k| k.sha256.eq_ignore_ascii_case(&key.sha256))
            {
                return bad(
                    format!("auth.keys[{i}].sha256"),
                    &format!("is also the hash of auth.keys[{j}]"),
                );
            }
        }
        let remote = listeners.iter().find(|a| !a.ip().is_loopback());
        if let Some(addr) = remote
            && self.keys.is_empty()
            && !self.insecure_remote
        {
            return bad(
                "auth.keys".into(),
                &format!(
                    "the client APIs listen on {addr}, beyond this host, and no API key is \
                     configured; add [[coordinator.auth.keys]] (or set auth.insecure_remote = \
                     true to serve anyone who can reach it)"
                ),
            );
        }
        Ok(())
    }
}

/// SHA-256 of an API key, as the configuration holds it.
pub fn key_digest(key: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A request rate as a bucket of tokens: `capacity` at most, refilled at `per_second`; each
/// request takes one. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    /// `per_minute` requests a minute, bursts of a tenth of that (at least one).
    pub fn per_minute(per_minute: u32) -> Self {
        let capacity = (f64::from(per_minute) / 10.0).max(1.0);
        Self {
            capacity,
            per_second: f64::from(per_minute) / 60.0,
            tokens: capacity,
            at: None,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> std::result::Result<(), Duration> {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// Who is calling, held for the request's lifetime.
#[derive(Debug)]
pub struct Caller {
    /// The key's name; `None` when authentication is off.
    pub name: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Key {
    name: String,
    rate: Option<Mutex<TokenBucket>>,
    concurrency: Option<Arc<Semaphore>>,
}

/// The configured keys, by hash.
pub struct Auth {
    keys: HashMap<[u8; 32], Key>,
}

/// Why a caller was turned away (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Unknown,
    Rate,
    Concurrency,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Missing => "missing",
            Refused::Unknown => "unknown",
            Refused::Rate => "rate",
            Refused::Concurrency => "concurrency",
        }
    }
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Self {
        let keys = config
            .keys
            .iter()
            .filter_map(|k| {
                let digest = baton_core::hex::decode32(&k.sha256)?;
                Some((
                    digest,
                    Key {
                        name: k.name.clone(),
                        rate: k
                            .requests_per_minute
                            .map(|r| Mutex::new(TokenBucket::per_minute(r))),
                        concurrency: k
                            .max_concurrent
                            .map(|c| Arc::new(Semaphore::new(c as usize))),
                    },
                ))
            })
            .collect();
        Self { keys }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The caller of a request whose `Authorization` value is `authorization`, within its
    /// key's limits.
    pub fn admit(
        &self,
        authorization: Option<&str>,
        now: Instant,
    ) -> std::result::Result<Caller, (Refused, Error)> {
        if !self.enabled() {
            return Ok(Caller {
                name: None,
                _permit: None,
            });
        }
        let presented = authorization
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let Some(presented) = presented else {
            return Err((
                Refused::Missing,
                Error::Unauthenticated {
                    reason: "no API key: send Authorization: Bearer <key>".into(),
                },
            ));
        };
        let Some(key) = self.keys.get(&key_digest(presented)) else {
            return Err((
                Refused::Unknown,
                Error::Unauthenticated {
                    reason: "the API key is not one this server knows".into(),
                },
            ));
        };
        let permit = match &key.concurrency {
            None => None,
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                (
                    Refused::Concurrency,
                    Error::KeyLimit {
                        key: key.name.clone(),
                        limit: "max_concurrent",
                        retry_after: Duration::from_secs(1),
                    },
                )
            })?),
        };
        if let Some(rate) = &key.rate {
            let taken = rate.lock().unwrap_or_else(|p| p.into_inner()).take(now);
            if let Err(wait) = taken {
                return Err((
                    Refused::Rate,
                    Error::KeyLimit {
                        key: key.name.clone(),
                        limit: "requests_per_minute",
                        retry_after: wait,
                    },
                ));
            }
        }
        Ok(Caller {
            name: Some(key.name.clone()),
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        baton_core::hex::encode(&d)
    }

    fn config(keys: Vec<ApiKeyConfig>) -> AuthConfig {
        AuthConfig {
            keys,
            insecure_remote: false,
        }
    }

    fn key(name: &str, secret: &str) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            sha256: hex(key_digest(secret)),
            requests_per_minute: None,
            max_concurrent: None,
        }
    }

    #[test]
    fn sha256_of_a_key_matches_the_standard_digest() {
        // printf %s abc | sha256sum
        assert_eq!(
            hex(key_digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn only_a_known_bearer_key_is_admitted() {
        let auth = Auth::new(&config(vec![key("team-a", "sk-a")]));
        let now = Instant::now();
        assert_eq!(
            auth.admit(None, now).expect_err("refused").0,
            Refused::Missing
        );
        assert_eq!(
            auth.admit(Some("Basic sk-a"), now).expect_err("refused").0,
            Refused::Missing
        );
        assert_eq!(
            auth.admit(Some("Bearer sk-b"), now).expect_err("refused").0,
            Refused::Unknown
        );
        let caller = auth.admit(Some("bearer  sk-a "), now).expect("admitted");
        assert_eq!(caller.name.as_deref(), Some("team-a"));
        let open = Auth::new(&AuthConfig::default());
        assert!(open.admit(None, now).is_ok());
    }

    #[test]
    fn concurrency_is_held_until_the_caller_drops() {
        let mut k = key("a", "sk");
        k.max_concurrent = Some(1);
        let auth = Auth::new(&config(vec![k]));
        let now = Instant::now();
        let first = auth.admit(Some("Bearer sk"), now).expect("first");
        let (why, e) = auth.admit(Some("Bearer sk"), now).expect_err("refused");
        assert_eq!(why, Refused::Concurrency);
        assert!(e.retry_after().is_some());
        drop(first);
        assert!(auth.admit(Some("Bearer sk"), now).is_ok());
    }

    #[test]
    fn rate_refills_over_time_and_says_when() {
        let mut bucket = TokenBucket::per_minute(60); // 1/s, bursts of 6
        let t0 = Instant::now();
        for _ in 0..6 {
            bucket.take(t0).expect("burst");
        }
        let wait = bucket.take(t0).expect_err("refused");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
        assert!(bucket.take(t0 + Duration::from_millis(999)).is_err());
        assert!(bucket.take(t0 + Duration::from_millis(2000)).is_ok());
    }

    #[test]
    fn config_names_the_bad_key_and_refuses_open_remote_listeners() {
        let loopback: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let remote: std::net::SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let field = |c: &AuthConfig, at: &[std::net::SocketAddr]| match c.validate(at) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut bad = key("a", "x");
        bad.sha256 = "sk-live-123".into();
        assert_eq!(
            field(&config(vec![bad]), &[loopback]),
            "auth.keys[0].sha256"
        );
        assert_eq!(
            field(&config(vec![key("a", "x"), key("a", "y")]), &[loopback]),
            "auth.keys[1].name"
        );
        assert_eq!(field(&config(vec![]), &[loopback, remote]), "auth.keys");
        assert!(config(vec![]).validate(&[loopback]).is_ok());
        assert!(config(vec![key("a", "x")]).validate(&[remote]).is_ok());
        let insecure = AuthConfig {
            keys: vec![],
            insecure_remote: true,
        };
        assert!(insecure.validate(&[remote]).is_ok());
    }
}

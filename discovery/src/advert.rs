//! A worker's advert: the few fields a coordinator needs to decide whether to talk to it (which
//! cluster, which worker, which role, which model, where), signed with the cluster key.
//!
//! On the wire an advert is a set of short `key=value` pairs: an mDNS TXT record carries them
//! as they are, an etcd value as lines. The signature is a keyed BLAKE3 hash over the pairs'
//! canonical form (every pair but the signature, sorted by key, `key=value\n` each), so any
//! backend that carries the pairs unchanged carries a checkable advert.
//!
//! Replay: an advert names when it was issued (`t`, Unix milliseconds). A reader keeps the
//! newest it has seen per worker and ignores an older one (a recorded advert replayed after
//! the worker restarted cannot roll it back) and one issued further ahead than
//! [`MAX_CLOCK_SKEW`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::{Fingerprint, WorkerId};

use crate::error::{Error, Refusal};

/// The wire format's version (`v`); an advert of another version is refused.
pub const VERSION: &str = "1";

/// How far in the future an advert's issue time may lie (clocks of a LAN's machines differ).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Longest cluster name, in bytes.
pub const MAX_CLUSTER_LEN: usize = 63;

/// Longest host id, in bytes.
pub const MAX_HOST_ID_LEN: usize = 128;

/// Most pairs an advert may hold; more is refused before anything is hashed.
const MAX_PAIRS: usize = 16;

/// Longest value of any pair.
const MAX_VALUE_LEN: usize = 255;

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    fn code(self) -> &'static str {
        match self {
            Role::Prefill => "p",
            Role::Decode => "d",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cluster key: every advert and event is signed with a key derived from it. Its bytes are
/// never printed (`Debug` says only how long it is).
#[derive(Clone)]
pub struct ClusterKey {
    adverts: [u8; 32],
    events: [u8; 32],
    kv_links: [u8; 32],
}

impl ClusterKey {
    /// Fewest bytes a key may have.
    pub const MIN_LEN: usize = 16;

    /// A key from its secret bytes (a key file's contents, trailing whitespace trimmed).
    pub fn new(secret: &[u8]) -> Result<Self, Error> {
        let secret = secret.trim_ascii_end();
        if secret.len() < Self::MIN_LEN {
            return Err(Error::InvalidConfig {
                field: "cluster_key_file",
                reason: format!(
                    "the cluster key holds {} bytes; at least {} are needed",
                    secret.len(),
                    Self::MIN_LEN
                ),
            });
        }
        Ok(Self {
            adverts: blake3::derive_key("baton 2026 cluster key: adverts", secret),
            events: blake3::derive_key("baton 2026 cluster key: events", secret),
            kv_links: blake3::derive_key("baton 2026 cluster key: kv links", secret),
        })
    }

    /// Reads a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::InvalidConfig {
            field: "cluster_key_file",
            reason: format!("{}: {e}", path.display()),
        })?;
        Self::new(&bytes)
    }

    pub(crate) fn sign_advert(&self, canonical: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.adverts, canonical).as_bytes()
    }

    /// The key KV links prove at connect (kv-transfer's `LinkKey`), derived apart from the
    /// signing keys so a proof can never pass for a signature.
    pub fn kv_link_key(&self) -> [u8; 32] {
        self.kv_links
    }

    /// The signature of an event payload.
    pub fn sign_event(&self, payload: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.events, payload).as_bytes()
    }

    /// Whether `signature` is this key's over `payload` (compared in constant time).
    pub fn verify_event(&self, payload: &[u8], signature: &[u8; 32]) -> bool {
        blake3::Hash::from_bytes(self.sign_event(payload)) == blake3::Hash::from_bytes(*signature)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// What a worker says about itself to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The cluster it belongs to; a reader ignores adverts of other clusters.
    pub cluster: String,
    pub worker_id: WorkerId,
    pub role: Role,
    /// The model it serves: a reader refuses a worker whose model differs from the cluster's.
    pub fingerprint: Fingerprint,
    /// Its host: workers with equal host ids may share memory.
    pub host_id: String,
    /// Its gRPC port; the address is the advert's source (mDNS) or [`Advert::host`].
    pub grpc_port: u16,
    /// Its event publisher's port; 0 while it has none.
    pub event_port: u16,
    /// The address to dial, where the backend does not tell it (etcd); `None` under mDNS,
    /// whose resolution gives the addresses.
    pub host: Option<String>,
    /// When it was issued, in Unix milliseconds.
    pub issued_ms: u64,
}

impl Advert {
    /// The advert's pairs, signed.
    pub fn to_pairs(&self, key: &ClusterKey) -> BTreeMap<String, String> {
        let mut pairs = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            pairs.insert(k.to_string(), v);
        };
        put("v", VERSION.into());
        put("c", self.cluster.clone());
        put("id", self.worker_id.to_string());
        put("r", self.role.code().into());
        put("fp", baton_core::hex::encode(&self.fingerprint.0));
        put("h", self.host_id.clone());
        put("g", self.grpc_port.to_string());
        put("e", self.event_port.to_string());
        put("t", self.issued_ms.to_string());
        if let Some(host) = &self.host {
            put("a", host.clone());
        }
        sign_pairs(&mut pairs, key);
        pairs
    }

    /// Checks and reads an advert's pairs: the version, the signature under `key`, the cluster
    /// (`cluster`), then every field. Never panics on any input.
    pub fn from_pairs(
        pairs: &BTreeMap<String, String>,
        key: &ClusterKey,
        cluster: &str,
    ) -> Result<Self, Refusal> {
        if pairs.len() > MAX_PAIRS {
            return Err(Refusal::Malformed("too many fields".into()));
        }
        if let Some((k, _)) = pairs.iter().find(|(_, v)| v.len() > MAX_VALUE_LEN) {
            return Err(Refusal::Malformed(format!("field {k:?} is too long")));
        }
        let get = |k: &str| {
            pairs
                .get(k)
                .map(String::as_str)
                .ok_or_else(|| Refusal::Malformed(format!("no field {k:?}")))
        };
        if get("v")? != VERSION {
            return Err(Refusal::Malformed(format!(
                "version {:?}, not {VERSION}",
                get("v")?
            )));
        }
        let Some(signature) = pairs.get("s") else {
            return Err(Refusal::Unsigned);
        };
        let mut unsigned = pairs.clone();
        unsigned.remove("s");
        let expected = key.sign_advert(&canonical(&unsigned));
        // Compared in constant time: blake3's Hash equality is.
        let given = baton_core::hex::decode32(signature).ok_or(Refusal::BadSignature)?;
        if blake3::Hash::from_bytes(given) != blake3::Hash::from_bytes(expected) {
            return Err(Refusal::BadSignature);
        }
        let advert_cluster = get("c")?;
        if advert_cluster != cluster {
            return Err(Refusal::ForeignCluster(advert_cluster.to_string()));
        }
        let worker_id = WorkerId::parse(get("id")?)
            .map_err(|reason| Refusal::Malformed(format!("id: {reason}")))?;
        let role = match get("r")? {
            "p" => Role::Prefill,
            "d" => Role::Decode,
            other => return Err(Refusal::Malformed(format!("role {other:?}"))),
        };
        let fingerprint = baton_core::hex::decode32(get("fp")?)
            .map(Fingerprint)
            .ok_or_else(|| Refusal::Malformed("fp: not 64 hex digits".into()))?;
        let host_id = get("h")?.to_string();
        if host_id.len() > MAX_HOST_ID_LEN {
            return Err(Refusal::Malformed("h: too long".into()));
        }
        let port = |k: &str| {
            get(k)?
                .parse::<u16>()
                .map_err(|e| Refusal::Malformed(format!("{k}: {e}")))
        };
        let grpc_port = port("g")?;
        if grpc_port == 0 {
            return Err(Refusal::Malformed("g: port 0".into()));
        }
        let issued_ms = get("t")?
            .parse::<u64>()
            .map_err(|e| Refusal::Malformed(format!("t: {e}")))?;
        Ok(Self {
            cluster: advert_cluster.to_string(),
            worker_id,
            role,
            fingerprint,
            host_id,
            grpc_port,
            event_port: port("e")?,
            host: pairs.get("a").cloned(),
            issued_ms,
        })
    }

    /// Whether it was issued too far in the future of `now_ms` to be believed.
    pub fn from_the_future(&self, now_ms: u64) -> bool {
        self.issued_ms > now_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64)
    }
}

/// Checks a cluster name: 1 to 63 bytes of ASCII letters, digits and `-`, as a DNS label.
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CLUSTER_LEN {
        return Err(format!("must be 1 to {MAX_CLUSTER_LEN} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "holds {c:?}; only ASCII letters, digits and - are allowed"
        ));
    }
    Ok(())
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Signs `pairs` under `key`: the signature `s` over every other pair, replacing any `s`
/// they held. Public only for the fuzz targets in `fuzz/` (which sign what they mutate, to
/// reach the checks behind the signature); an advert is signed by [`Advert::to_pairs`].
#[doc(hidden)]
pub fn sign_pairs(pairs: &mut BTreeMap<String, String>, key: &ClusterKey) {
    pairs.remove("s");
    let signature = key.sign_advert(&canonical(pairs));
    pairs.insert("s".into(), baton_core::hex::encode(&signature));
}

fn canonical(pairs: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::new(s.as_bytes()).expect("key")
    }

    fn advert() -> Advert {
        Advert {
            cluster: "lab".into(),
            worker_id: WorkerId::parse("decode-a-1").expect("id"),
            role: Role::Decode,
            fingerprint: Fingerprint([7; 32]),
            host_id: "host-a".into(),
            grpc_port: 50071,
            event_port: 50072,
            host: None,
            issued_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_signed_advert_reads_back() {
        let k = key("0123456789abcdef-secret");
        let pairs = advert().to_pairs(&k);
        assert_eq!(Advert::from_pairs(&pairs, &k, "lab"), Ok(advert()));
        let with_host = Advert {
            host: Some("10.0.0.2".into()),
            ..advert()
        };
        assert_eq!(
            Advert::from_pairs(&with_host.to_pairs(&k), &k, "lab"),
            Ok(with_host)
        );
    }

    #[test]
    fn an_advert_under_another_key_is_refused() {
        let pairs = advert().to_pairs(&key("0123456789abcdef-secret"));
        assert_eq!(
            Advert::from_pairs(&pairs, &key("0123456789abcdef-other"), "lab"),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let k = key("0123456789abcdef-secret");
        let mut pairs = advert().to_pairs(&k);
        pairs.insert("g".into(), "50099".into());
        assert_eq!(
            Advert::from_pairs(&pairs, &k, "lab"),
            Err(Refusal::BadSignature)
        );
        let mut pairs = advert().to_pairs(&k);
        pairs.remove("s");
        assert_eq!(
            Advert::from_pairs(&pairs, &k, "lab"),
            Err(Refusal::Unsigned)
        );
    }

    #[test]
    fn an_advert_of_another_cluster_is_refused() {
        let k = key("0123456789abcdef-secret");
        let pairs = advert().to_pairs(&k);
        assert_eq!(
            Advert::from_pairs(&pairs, &k, "prod"),
            Err(Refusal::ForeignCluster("lab".into()))
        );
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_print() {
        assert!(ClusterKey::new(b"short\n").is_err());
        let k = key("0123456789abcdef-secret");
        assert!(!format!("{k:?}").contains("secret"));
        // A trailing newline (a key file written by echo) is the same key.
        let pairs = advert().to_pairs(&k);
        assert!(Advert::from_pairs(&pairs, &key("0123456789abcdef-secret\n"), "lab").is_ok());
    }

    #[test]
    fn adverts_from_the_future_are_flagged() {
        let a = advert();
        assert!(!a.from_the_future(a.issued_ms));
        assert!(!a.from_the_future(a.issued_ms - 1000));
        assert!(a.from_the_future(a.issued_ms - MAX_CLOCK_SKEW.as_millis() as u64 - 1));
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        assert!(check_cluster_name("lab-1").is_ok());
        assert!(check_cluster_name("").is_err());
        assert!(check_cluster_name("a b").is_err());
        assert!(check_cluster_name(&"a".repeat(64)).is_err());
    }

    proptest! {
        /// Whatever pairs a peer sends, reading them returns (never panics), and only the
        /// signer's pairs are accepted.
        #[test]
        fn any_pairs_read_without_panic(
            pairs in proptest::collection::btree_map("[a-z]{1,3}", ".{0,80}", 0..20),
            mutate in proptest::option::of(("[a-z]{1,2}", ".{0,70}")),
        ) {
            let k = key("0123456789abcdef-secret");
            let _ = Advert::from_pairs(&pairs, &k, "lab");
            let mut signed = advert().to_pairs(&k);
            if let Some((field, value)) = mutate {
                let changed = signed.get(&field) != Some(&value);
                signed.insert(field, value);
                if changed {
                    prop_assert!(Advert::from_pairs(&signed, &k, "lab").is_err());
                }
            }
        }
    }
}

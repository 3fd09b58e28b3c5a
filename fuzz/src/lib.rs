//! baton's fuzz targets: one function per decoder of bytes a peer or a client sends. Each feeds
//! the input to the production decode path (never a copy of it) and checks what the decoder
//! promises: no panic on any input, and where a message decodes, that encoding it again gives
//! the bytes (or the message) back.
//!
//! ```text
//! peer / client bytes --> [target] --> kv-transfer wire, hellos, notices  (kv_frame, kv_payload)
//!                                  --> discovery adverts and events      (discovery_advert, discovery_event)
//!                                  --> proto messages to domain types     (proto_worker)
//!                                  --> OpenAI request bodies              (openai_request)
//!                                  --> the layered TOML config            (config_toml)
//!                                  --> a worker group's rank link          (group_frame)
//! ```
//!
//! The binaries in `fuzz_targets/` hand libFuzzer's input to these functions (`cargo fuzz run
//! <target>`, nightly); `tests/corpus.rs` replays the committed corpus (`corpus/<target>/`)
//! through them on stable. `scripts/fuzz.sh` picks one or the other.
//!
//! The targets of the `heavy` feature link crates that pull candle and the whole cluster
//! (proto through baton-text, the coordinator, the CLI); the others build in a minute.

#[cfg(feature = "heavy")]
mod config;
mod discovery;
#[cfg(feature = "heavy")]
mod group;
mod kv;
#[cfg(feature = "heavy")]
mod openai;
#[cfg(feature = "heavy")]
mod proto;

#[cfg(feature = "heavy")]
pub use config::config_toml;
pub use discovery::{CLUSTER, cluster_key, discovery_advert, discovery_event};
#[cfg(feature = "heavy")]
pub use group::group_frame;
pub use kv::{kv_frame, kv_payload, local_layout};
#[cfg(feature = "heavy")]
pub use openai::openai_request;
#[cfg(feature = "heavy")]
pub use proto::proto_worker;

/// A fuzz target: its name (its binary's and its corpus folder's) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target this build has, by name.
pub fn targets() -> Vec<Target> {
    let light: [Target; 4] = [
        ("kv_frame", kv_frame),
        ("kv_payload", kv_payload),
        ("discovery_advert", discovery_advert),
        ("discovery_event", discovery_event),
    ];
    #[cfg(feature = "heavy")]
    let heavy: [Target; 4] = [
        ("proto_worker", proto_worker),
        ("openai_request", openai_request),
        ("config_toml", config_toml),
        ("group_frame", group_frame),
    ];
    #[cfg(not(feature = "heavy"))]
    let heavy: [Target; 0] = [];
    light.into_iter().chain(heavy).collect()
}

/// Every target, in any build: the ones behind `heavy` too.
pub const ALL_TARGETS: &[&str] = &[
    "kv_frame",
    "kv_payload",
    "discovery_advert",
    "discovery_event",
    "proto_worker",
    "openai_request",
    "config_toml",
    "group_frame",
];

/// Splits an input into fields: a fuzzer's bytes read front to back, a field cut short where
/// the input ends.
pub(crate) struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    pub(crate) fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// At most `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// A field of a length the next byte gives.
    pub(crate) fn field(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        self.take(n)
    }

    /// A field of a length the next two bytes give (little-endian).
    pub(crate) fn long_field(&mut self) -> &'a [u8] {
        let n = u16::from_le_bytes([self.byte(), self.byte()]) as usize;
        self.take(n)
    }

    #[cfg(feature = "heavy")]
    pub(crate) fn rest(self) -> &'a [u8] {
        self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

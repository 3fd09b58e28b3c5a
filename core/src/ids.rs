//! Newtype ids. None is an address or a bare integer used as a key: a worker keeps its
//! [`WorkerId`] wherever it listens, and a handoff id cannot be passed where a request id is due.

use std::fmt;

/// One client request, across every process it touches (logs, spans, worker calls).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl RequestId {
    /// Longest id accepted from a client or a peer, in bytes.
    pub const MAX_LEN: usize = 128;

    /// A fresh id, `req-` and 16 hex digits of `random`.
    pub fn generate(random: u64) -> Self {
        RequestId(format!("req-{random:016x}"))
    }

    /// A client's or a peer's id: printable ASCII without spaces, 1 to [`Self::MAX_LEN`]
    /// bytes, so it is safe in logs and headers.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!("must be 1 to {} bytes", Self::MAX_LEN));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "holds {c:?}; only printable ASCII without spaces is allowed"
            ));
        }
        Ok(RequestId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A worker's name in the cluster: configured (`worker_id`), or made once at start-up from its
/// role, host and a random suffix. Never its address: a worker that moves ports is the same
/// worker, and two workers behind one address are not.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    /// Longest id accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// A configured or reported id: 1 to [`Self::MAX_LEN`] bytes of ASCII letters, digits and
    /// `-_.@:`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!("must be 1 to {} bytes", Self::MAX_LEN));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_.@:".contains(*c)))
        {
            return Err(format!(
                "holds {c:?}; only ASCII letters, digits and -_.@: are allowed"
            ));
        }
        Ok(WorkerId(s.to_string()))
    }

    /// An id for a worker that was given none: `<role>-<host>-<8 hex digits>`.
    pub fn generate(role: &str, host: &str, random: u32) -> Self {
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        let host = if host.is_empty() { "host".into() } else { host };
        WorkerId(format!("{role}-{host}-{random:08x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One transfer of one sequence's KV from a prefill worker to a decode worker. Chosen by the
/// coordinator, unique among its live handoffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandoffId(pub u64);

impl fmt::Display for HandoffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handoff-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_refuse_what_logs_and_headers_cannot_carry() {
        assert_eq!(
            RequestId::parse("req-1").map(|r| r.to_string()),
            Ok("req-1".into())
        );
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse("a b").is_err());
        assert!(RequestId::parse("line\nbreak").is_err());
        assert!(RequestId::parse(&"x".repeat(129)).is_err());
        assert_eq!(RequestId::generate(255).as_str(), "req-00000000000000ff");
    }

    #[test]
    fn worker_ids_are_names_not_addresses_of_any_shape() {
        assert!(WorkerId::parse("decode-0").is_ok());
        assert!(WorkerId::parse("prefill@10.0.0.2:50061").is_ok());
        assert!(WorkerId::parse("").is_err());
        assert!(WorkerId::parse("a/b").is_err());
        let made = WorkerId::generate("decode", "gpu box.lan", 0xab);
        assert_eq!(made.as_str(), "decode-gpuboxlan-000000ab");
        assert!(WorkerId::parse(made.as_str()).is_ok());
        assert_eq!(
            WorkerId::generate("prefill", "", 1).as_str(),
            "prefill-host-00000001"
        );
    }
}

//! Authenticating a KV link at connect, before anything else crosses it: the first frames each
//! way, ahead of the hello (which carries the pool's layout and, over shared memory, the pool's
//! memfd). A peer that cannot prove it holds the cluster's link key never learns this pool's
//! layout, never maps its memory and never reads or writes a block.
//!
//! ```text
//! both sides at once:  Auth offer  [version 1][has key 0|1][challenge: 32 random bytes]
//! neither has a key:   done (an open link: only while every listener is on loopback)
//! one has a key:       refused, both ways (Close: unauthenticated)
//! both have keys:      Auth proof  keyed_blake3(key, label || my side || peer's challenge || mine)
//!                      each checks the other's proof in constant time; a mismatch is refused
//! ```
//!
//! Fresh challenges from both sides make an old proof useless; the side in the proof keeps an
//! attacker from reflecting an acceptor's proof back to it as a dialer's. What it does not do
//! is protect the bytes after the handshake from someone on the path who can rewrite TCP
//! segments: the link is authenticated, not encrypted (payloads carry crc32c against
//! accidents); the KV port belongs on a network only cluster members reach (the Helm chart's
//! NetworkPolicy). The decisions are pure functions here; the IO is in `framed.rs`.

use std::fmt;

use crate::error::{Error, Result};

/// Version of the auth messages.
const AUTH_VERSION: u8 = 1;
/// Bytes of an offer: version, key flag, challenge.
pub const OFFER_LEN: usize = 2 + 32;
/// Bytes of a proof.
pub const PROOF_LEN: usize = 32;
/// Domain separation of the proofs.
const LABEL: &[u8] = b"baton kv link proof v1";

/// The key every worker of a cluster proves it holds when it opens or accepts a KV link; derived
/// from the cluster key (discovery's `ClusterKey::kv_link_key`). Its bytes are never printed.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl LinkKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkKey(<redacted>)")
    }
}

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Dialer,
    Acceptor,
}

impl Side {
    fn code(self) -> u8 {
        match self {
            Side::Dialer => 1,
            Side::Acceptor => 2,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Dialer => Side::Acceptor,
            Side::Acceptor => Side::Dialer,
        }
    }
}

/// One side's part of the exchange: its key (if any) and its fresh challenge.
pub(crate) struct Handshake<'k> {
    key: Option<&'k LinkKey>,
    side: Side,
    challenge: [u8; 32],
}

/// What follows the offers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Neither side has a key: the link is open.
    Open,
    /// Send `proof`; the peer's must equal `expect`.
    Prove {
        proof: [u8; PROOF_LEN],
        expect: [u8; PROOF_LEN],
    },
}

impl<'k> Handshake<'k> {
    /// A handshake with a fresh challenge (the thread's CSPRNG, seeded from the OS).
    pub(crate) fn new(key: Option<&'k LinkKey>, side: Side) -> Self {
        Self::with_challenge(key, side, rand::random())
    }

    pub(crate) fn with_challenge(
        key: Option<&'k LinkKey>,
        side: Side,
        challenge: [u8; 32],
    ) -> Self {
        Self {
            key,
            side,
            challenge,
        }
    }

    /// This side's offer.
    pub(crate) fn offer(&self) -> [u8; OFFER_LEN] {
        let mut b = [0u8; OFFER_LEN];
        b[0] = AUTH_VERSION;
        b[1] = u8::from(self.key.is_some());
        b[2..].copy_from_slice(&self.challenge);
        b
    }

    /// Decides on the peer's offer: refused when exactly one side has a key.
    pub(crate) fn on_offer(&self, peer: &[u8]) -> Result<Next> {
        let (peer_has_key, peer_challenge) = decode_offer(peer)?;
        match (self.key, peer_has_key) {
            (None, false) => Ok(Next::Open),
            (Some(_), false) => Err(Error::Unauthenticated {
                reason: "the peer has no cluster key (set discovery.cluster_key_file on every \
                         worker of the cluster)"
                    .into(),
            }),
            (None, true) => Err(Error::Unauthenticated {
                reason: "the peer requires a cluster key and this worker has none (set \
                         discovery.cluster_key_file)"
                    .into(),
            }),
            (Some(key), true) => Ok(Next::Prove {
                proof: proof(key, self.side, &peer_challenge, &self.challenge),
                expect: proof(key, self.side.other(), &self.challenge, &peer_challenge),
            }),
        }
    }
}

/// `side`'s proof, answering `challenge` with its own `nonce`.
fn proof(key: &LinkKey, side: Side, challenge: &[u8; 32], nonce: &[u8; 32]) -> [u8; PROOF_LEN] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(LABEL);
    h.update(&[side.code()]);
    h.update(challenge);
    h.update(nonce);
    *h.finalize().as_bytes()
}

/// Reads an offer: whether the sender has a key, and its challenge. Never panics.
pub fn decode_offer(b: &[u8]) -> Result<(bool, [u8; 32])> {
    let malformed = |reason: String| Error::MalformedFrame {
        kind: crate::wire::Kind::Auth,
        reason,
    };
    if b.len() != OFFER_LEN {
        return Err(malformed(format!(
            "an offer of {} bytes, expected {OFFER_LEN}",
            b.len()
        )));
    }
    if b[0] != AUTH_VERSION {
        return Err(malformed(format!(
            "auth version {} (this build speaks {AUTH_VERSION})",
            b[0]
        )));
    }
    let has_key = match b[1] {
        0 => false,
        1 => true,
        f => return Err(malformed(format!("key flag {f}"))),
    };
    let mut challenge = [0u8; 32];
    challenge.copy_from_slice(&b[2..]);
    Ok((has_key, challenge))
}

/// Checks the peer's proof against the expected one, in constant time.
pub(crate) fn check_proof(expect: &[u8; PROOF_LEN], got: &[u8]) -> Result<()> {
    let got: [u8; PROOF_LEN] = got.try_into().map_err(|_| Error::MalformedFrame {
        kind: crate::wire::Kind::Auth,
        reason: format!("a proof of {} bytes, expected {PROOF_LEN}", got.len()),
    })?;
    // blake3's Hash compares in constant time.
    if blake3::Hash::from_bytes(got) != blake3::Hash::from_bytes(*expect) {
        return Err(Error::Unauthenticated {
            reason: "the peer's proof does not match this worker's cluster key (different \
                     cluster_key_file contents?)"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> LinkKey {
        LinkKey::new([b; 32])
    }

    /// Runs both sides' decisions; `Ok` when both accept.
    fn exchange(a: Option<&LinkKey>, b: Option<&LinkKey>) -> (Result<()>, Result<()>) {
        let d = Handshake::with_challenge(a, Side::Dialer, [1; 32]);
        let c = Handshake::with_challenge(b, Side::Acceptor, [2; 32]);
        let (dn, cn) = (d.on_offer(&c.offer()), c.on_offer(&d.offer()));
        match (dn, cn) {
            (
                Ok(Next::Prove {
                    proof: dp,
                    expect: de,
                }),
                Ok(Next::Prove {
                    proof: cp,
                    expect: ce,
                }),
            ) => (check_proof(&de, &cp), check_proof(&ce, &dp)),
            (Ok(Next::Open), Ok(Next::Open)) => (Ok(()), Ok(())),
            (dn, cn) => (dn.map(|_| ()), cn.map(|_| ())),
        }
    }

    #[test]
    fn same_key_passes_and_no_key_on_both_sides_is_open() {
        let k = key(7);
        let (a, b) = exchange(Some(&k), Some(&k));
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        let (a, b) = exchange(None, None);
        assert!(a.is_ok() && b.is_ok());
    }

    #[test]
    fn a_different_key_or_a_missing_one_is_refused_by_both_sides() {
        let (k, other) = (key(7), key(8));
        for (a, b) in [
            exchange(Some(&k), Some(&other)),
            exchange(Some(&k), None),
            exchange(None, Some(&k)),
        ] {
            for r in [a, b] {
                let e = r.expect_err("refused");
                assert_eq!(
                    e.reason(),
                    crate::error::FailureReason::Unauthenticated,
                    "{e}"
                );
                assert!(e.to_string().contains("cluster"), "{e}");
            }
        }
    }

    #[test]
    fn a_proof_is_bound_to_the_side_and_both_challenges() {
        let k = key(7);
        let d = Handshake::with_challenge(Some(&k), Side::Dialer, [1; 32]);
        let c = Handshake::with_challenge(Some(&k), Side::Acceptor, [2; 32]);
        let Ok(Next::Prove { proof: cp, .. }) = c.on_offer(&d.offer()) else {
            panic!("both keyed")
        };
        let Ok(Next::Prove { expect: de, .. }) = d.on_offer(&c.offer()) else {
            panic!("both keyed")
        };
        assert!(check_proof(&de, &cp).is_ok());
        // Reflected: the acceptor's own proof offered back to it as a dialer's.
        let Ok(Next::Prove { expect: ce, .. }) = c.on_offer(&d.offer()) else {
            panic!("both keyed")
        };
        assert!(check_proof(&ce, &cp).is_err(), "a reflected proof passes");
        // Replayed against a fresh challenge.
        let d2 = Handshake::with_challenge(Some(&k), Side::Dialer, [3; 32]);
        let Ok(Next::Prove { expect: de2, .. }) = d2.on_offer(&c.offer()) else {
            panic!("both keyed")
        };
        assert!(check_proof(&de2, &cp).is_err(), "a replayed proof passes");
    }

    #[test]
    fn offers_decode_strictly() {
        let h = Handshake::with_challenge(None, Side::Dialer, [9; 32]);
        let good = h.offer();
        assert_eq!(decode_offer(&good).expect("good"), (false, [9; 32]));
        assert!(decode_offer(&good[..OFFER_LEN - 1]).is_err());
        let mut bad = good;
        bad[0] = 2;
        assert!(decode_offer(&bad).is_err());
        bad = good;
        bad[1] = 2;
        assert!(decode_offer(&bad).is_err());
        assert!(check_proof(&[0; 32], &[0; 31]).is_err());
    }

    #[test]
    fn challenges_differ() {
        let a = Handshake::new(None, Side::Dialer);
        let b = Handshake::new(None, Side::Dialer);
        assert_ne!(a.challenge, b.challenge);
    }

    #[test]
    fn the_key_is_never_printed() {
        assert_eq!(format!("{:?}", key(0x41)), "LinkKey(<redacted>)");
    }
}

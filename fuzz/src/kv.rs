//! The KV wire (kv-transfer): frames as an agent's link reads them, and each payload's decoder
//! on its own.

use baton_core::{Fingerprint, KvDType, LayoutDescriptor};
use baton_kv_transfer::agent::KvConfig;
use baton_kv_transfer::agent::fuzzing::{decode_offer, split_hello, split_shm_hello};
use baton_kv_transfer::wire::{
    HEADER_LEN, Header, Hello, Kind, Limits, Notice, ReadRequest, decode_close, decode_descriptor,
    encode_close, encode_descriptor,
};

/// The receiving agent's layout, which a peer's hello is checked against (the seeds' model: 30
/// layers, 3 kv heads of 64, blocks of 16, f16).
pub fn local_layout() -> LayoutDescriptor {
    LayoutDescriptor {
        fingerprint: Fingerprint([9; 32]),
        dtype: KvDType::F16,
        block_size: 16,
        num_layers: 30,
        layers: 0..30,
        num_kv_heads: 3,
        kv_heads: 0..3,
        head_dim: 64,
    }
}

/// A byte stream of frames as an agent's link reads it: each header decoded and checked (magic,
/// version, checksum, kind, flags, bound), its payload's crc32c verified, then the payload
/// decoded by its kind. Stops where a link would: a bad header, a short or corrupt payload, a
/// close. The first byte is a mode: odd, every frame's checksums are made right first (as an
/// honest sender computes them), so that the fuzzer reaches past them with any header and
/// payload; even, the stream is read as it is.
pub fn kv_frame(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let fixed;
    let stream = if mode & 1 == 1 {
        fixed = with_checksums(stream);
        &fixed[..]
    } else {
        stream
    };
    let limits = Limits {
        max_payload: KvConfig::default().max_payload,
    };
    let mut rest = stream;
    while let Some((head, after)) = rest.split_first_chunk::<HEADER_LEN>() {
        let Ok(header) = Header::decode(head, &limits) else {
            return;
        };
        assert_eq!(
            &header.encode(),
            head,
            "a decoded header encodes to its bytes"
        );
        let len = header.payload_len as usize;
        let Some(payload) = after.get(..len) else {
            return;
        };
        rest = &after[len..];
        if header.verify(len, crc32c::crc32c(payload)).is_err() {
            return;
        }
        match header.kind {
            // An offer or a proof; a proof is only compared, so only the offer decodes.
            Kind::Auth => {
                let _ = decode_offer(payload);
            }
            Kind::Hello => {
                hello_tcp(payload);
                hello_shm(payload);
            }
            // Bytes for the pool: the header is all the receiver decodes.
            Kind::Write => {}
            Kind::Notice => notice(payload),
            Kind::Read => read_request(payload),
            Kind::Close => {
                close(payload);
                return;
            }
        }
    }
}

/// `stream` with each frame's payload crc32c (header bytes 36..40) and header crc32c (40..44)
/// computed over what is there, frames cut where their length fields (32..36) say.
fn with_checksums(stream: &[u8]) -> Vec<u8> {
    let mut out = stream.to_vec();
    let mut at = 0;
    while at + HEADER_LEN <= out.len() {
        let len = u32::from_le_bytes([out[at + 32], out[at + 33], out[at + 34], out[at + 35]]);
        let end = (at + HEADER_LEN)
            .saturating_add(len as usize)
            .min(out.len());
        let payload_crc = crc32c::crc32c(&out[at + HEADER_LEN..end]);
        out[at + 36..at + 40].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&out[at..at + 40]);
        out[at + 40..at + 44].copy_from_slice(&header_crc.to_le_bytes());
        at = end;
    }
    out
}

/// One payload decoder, chosen by the first byte, over the rest: a hello (bare, as TCP's
/// handshake carries it, as shm's does), a notice (keepalive, landed ranges, completion,
/// abort, ...), a read request, a close, a layout descriptor.
pub fn kv_payload(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => hello(body),
        1 => hello_tcp(body),
        2 => hello_shm(body),
        3 => notice(body),
        4 => read_request(body),
        5 => close(body),
        _ => descriptor(body),
    }
}

/// A hello as the agent takes it: decoded, checked against the local layout, and, where it
/// fits, the peer's region sized (what the shm backend maps).
fn admit(hello: &Hello) {
    if local_layout().check_compatible(&hello.pool.layout).is_ok() {
        let _ = hello.pool.region_bytes();
    }
}

fn hello(body: &[u8]) {
    if let Ok(h) = Hello::decode(body) {
        assert_eq!(h.encode(), body, "a decoded hello encodes to its bytes");
        admit(&h);
    }
}

fn hello_tcp(body: &[u8]) {
    if let Ok((h, extra)) = split_hello(body) {
        let mut again = h.encode();
        again.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        again.extend_from_slice(&extra);
        assert_eq!(again, body, "a decoded tcp hello encodes to its bytes");
        admit(&h);
    }
}

fn hello_shm(body: &[u8]) {
    if let Ok((h, _memfd)) = split_shm_hello(body) {
        assert_eq!(
            h.encode(),
            body[..body.len() - 5],
            "a decoded shm hello encodes to its bytes"
        );
        admit(&h);
    }
}

fn notice(body: &[u8]) {
    if let Ok(n) = Notice::decode(body) {
        assert_eq!(
            n.encode(),
            body,
            "a decoded notice encodes to its bytes: {n:?}"
        );
    }
}

fn read_request(body: &[u8]) {
    if let Ok(r) = ReadRequest::decode(body) {
        assert_eq!(
            r.encode(),
            body,
            "a decoded read request encodes to its bytes"
        );
    }
}

fn close(body: &[u8]) {
    if let Ok((code, message)) = decode_close(body) {
        // An unknown code reads as `Internal`, so only the decoded pair survives a round trip.
        let again = encode_close(code, &message);
        assert_eq!(decode_close(&again).ok(), Some((code, message)));
    }
}

fn descriptor(body: &[u8]) {
    if let Ok(d) = decode_descriptor(body) {
        assert_eq!(
            encode_descriptor(&d),
            body,
            "a decoded descriptor encodes to its bytes"
        );
    }
}

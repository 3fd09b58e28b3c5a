//! Reading frames from one byte stream (a TCP stream, a Unix socket) and acting on them, the
//! same way whatever carries them; and the hello exchange that opens every stream.
//!
//! A write frame's payload goes straight from the socket into the pool, at the offset its
//! header names, once [`Core::admit_write`] has checked that the range belongs to a live
//! handoff's reserved blocks and was not written before; its crc32c is then checked in place.
//! A frame that fits no live handoff is read into scratch memory and dropped.

use std::sync::Arc;

use baton_core::HandoffId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Link;
use super::auth::{self, Handshake, Next, Side};
use super::core::Core;
use crate::error::{Error, Result};
use crate::wire::{self, CloseCode, HEADER_LEN, Header, Hello, Kind, Notice, ReadRequest};

/// Longest control payload (hello, notice, read, close) accepted; write frames have their own
/// bound (`max_payload_bytes`).
const MAX_CONTROL: u32 = 16 << 20;

/// Scratch reads of a dropped frame's payload, at most this much at a time.
const DISCARD_CHUNK: usize = 64 << 10;

/// The link's authentication, before its hello (`auth`): offers both ways, then proofs where
/// both sides hold a key. A refusal tells the peer why in a close frame. Bounded by the
/// handshake timeout.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    core: &Core,
    stream: &mut S,
    side: Side,
) -> Result<()> {
    let limit = core.config.handshake_timeout;
    let exchange = async {
        let handshake = Handshake::new(core.key.as_ref(), side);
        send(stream, Kind::Auth, &handshake.offer()).await?;
        let peer = read_expected(stream, core, Kind::Auth).await?;
        let next = match handshake.on_offer(&peer) {
            Ok(next) => next,
            Err(e) => return Err(refuse(stream, e).await),
        };
        if let Next::Prove { proof, expect } = next {
            send(stream, Kind::Auth, &proof).await?;
            let peer = read_expected(stream, core, Kind::Auth).await?;
            if let Err(e) = auth::check_proof(&expect, &peer) {
                return Err(refuse(stream, e).await);
            }
        }
        Ok(())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| Error::Timeout {
            during: "the kv link's authentication",
            limit,
        })?
}

/// Sends one handshake frame (auth or hello).
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, kind: Kind, payload: &[u8]) -> Result<()> {
    let frame = wire::frame(kind, HandoffId(0), payload)?;
    stream
        .write_all(&frame)
        .await
        .map_err(io("write a handshake frame"))
}

/// The payload of the peer's next frame, which must be of `kind`; its close frame is its
/// refusal.
async fn read_expected<S: AsyncRead + Unpin>(
    stream: &mut S,
    core: &Core,
    kind: Kind,
) -> Result<Vec<u8>> {
    let (header, body) = read_control(stream, core).await?;
    match header.kind {
        k if k == kind => Ok(body),
        Kind::Close => {
            let (code, message) = wire::decode_close(&body)?;
            Err(Error::PeerRefused { code, message })
        }
        got => Err(Error::UnexpectedFrame {
            expected: kind,
            got,
        }),
    }
}

/// Tells the peer why it is refused (best effort) and returns the error.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, e: Error) -> Error {
    let close = wire::encode_close(CloseCode::for_error(&e), &e.to_string());
    if let Ok(f) = wire::frame(Kind::Close, HandoffId(0), &close) {
        let _ = stream.write_all(&f).await;
    }
    e
}

/// Sends this agent's hello and reads the peer's; refuses a peer whose pool cannot be mapped
/// onto ours (telling it why in a close frame). Bounded by the handshake timeout.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    core: &Core,
    stream: &mut S,
    extra: &[u8],
) -> Result<(Hello, Vec<u8>)> {
    let limit = core.config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let mut payload = core.hello().encode();
        payload.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        payload.extend_from_slice(extra);
        send(stream, Kind::Hello, &payload).await?;
        let body = read_expected(stream, core, Kind::Hello).await?;
        let (hello, extra) = split_hello(&body)?;
        if let Err(e) = core.check_peer(&hello) {
            return Err(refuse(stream, e).await);
        }
        Ok((hello, extra))
    })
    .await
    .map_err(|_| Error::Timeout {
        during: "the kv handshake",
        limit,
    })?
}

/// A hello payload: the [`Hello`] and a backend's extra bytes after it (length-prefixed).
pub fn split_hello(body: &[u8]) -> Result<(Hello, Vec<u8>)> {
    let malformed = || Error::MalformedFrame {
        kind: Kind::Hello,
        reason: "hello without its extra bytes".into(),
    };
    // The Hello's own encoding ends with its length-prefixed worker id; the extra bytes follow.
    let fixed = crate::wire::DESCRIPTOR_LEN + 4;
    let id_len = body
        .get(fixed..fixed + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(malformed)?;
    let hello_len = fixed + 4 + id_len;
    let hello = Hello::decode(body.get(..hello_len).ok_or_else(malformed)?)?;
    let rest = &body[hello_len..];
    let n = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(malformed)?;
    let extra = rest.get(4..4 + n).ok_or_else(malformed)?;
    if rest.len() != 4 + n {
        return Err(malformed());
    }
    Ok((hello, extra.to_vec()))
}

fn io(during: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ) {
            Error::PeerClosed {
                during,
                handoff: None,
            }
        } else {
            Error::Io { during, source }
        }
    }
}

/// Reads one whole control frame, verified.
async fn read_control<R: AsyncRead + Unpin>(rd: &mut R, core: &Core) -> Result<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    rd.read_exact(&mut head)
        .await
        .map_err(io("read a frame header"))?;
    let header = Header::decode(&head, &core.config.limits())?;
    read_body(rd, header).await
}

async fn read_body<R: AsyncRead + Unpin>(rd: &mut R, header: Header) -> Result<(Header, Vec<u8>)> {
    if header.payload_len > MAX_CONTROL {
        return Err(Error::PayloadTooLarge {
            len: u64::from(header.payload_len),
            max: MAX_CONTROL,
        });
    }
    let mut body = vec![0u8; header.payload_len as usize];
    rd.read_exact(&mut body)
        .await
        .map_err(io("read a frame payload"))?;
    header.verify(body.len(), crc32c::crc32c(&body))?;
    Ok((header, body))
}

/// Reads frames from `rd` until it ends or breaks, acting on each; then tells the core the link
/// closed (once per link: the backend calls it when its last stream ends).
pub(crate) async fn serve<R: AsyncRead + Unpin>(
    core: Arc<Core>,
    link: Arc<dyn Link>,
    mut rd: R,
) -> Result<()> {
    let limits = core.config.limits();
    loop {
        let mut head = [0u8; HEADER_LEN];
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io("read a frame header")(e)),
        }
        let header = match Header::decode(&head, &limits) {
            Ok(h) => h,
            Err(e) => {
                // Past a bad header the stream cannot be trusted: nothing after it is framed.
                core.rejected(None, &e);
                return Err(e);
            }
        };
        match header.kind {
            Kind::Write => write(&core, &link, &mut rd, header).await?,
            Kind::Notice => {
                let (header, body) = read_body(&mut rd, header).await?;
                match Notice::decode(&body) {
                    Ok(n) => core.on_notice(&link, header.handoff, n).await,
                    Err(e) => core.rejected(Some(header.handoff), &e),
                }
            }
            Kind::Read => {
                let (header, body) = read_body(&mut rd, header).await?;
                match ReadRequest::decode(&body) {
                    Ok(req) => core.on_read(&link, header.handoff, req).await,
                    Err(e) => core.rejected(Some(header.handoff), &e),
                }
            }
            Kind::Close => {
                let (_, body) = read_body(&mut rd, header).await?;
                let (code, message) = wire::decode_close(&body)?;
                tracing::info!(peer = %link.remote().worker, ?code, %message, "kv link closed by the peer");
                return Ok(());
            }
            Kind::Hello | Kind::Auth => {
                let e = Error::MalformedFrame {
                    kind: header.kind,
                    reason: "a handshake frame after the handshake".into(),
                };
                core.rejected(None, &e);
                return Err(e);
            }
        }
    }
}

/// A write frame: its payload goes into the pool if admitted, into scratch memory otherwise.
async fn write<R: AsyncRead + Unpin>(
    core: &Core,
    link: &Arc<dyn Link>,
    rd: &mut R,
    h: Header,
) -> Result<()> {
    let len = h.payload_len as usize;
    core.stats.frame_received();
    match core.admit_write(link.id(), h.handoff, h.layer, h.offset, len as u64) {
        Ok(guard) => {
            let verified = match core.memory.host() {
                Some(region) => {
                    // SAFETY: the range was admitted: inside this handoff's reserved blocks,
                    // written by no one else (coverage refuses overlaps) while `guard` keeps
                    // the blocks reserved.
                    let dst = unsafe { region.bytes_mut(h.offset, len) }.ok_or(Error::Io {
                        during: "writing into the pool",
                        source: std::io::Error::other("an admitted range lies outside the pool"),
                    })?;
                    rd.read_exact(dst)
                        .await
                        .map_err(io("read a write payload"))?;
                    h.verify(len, crc32c::crc32c(dst))
                }
                None => {
                    let mut buf = vec![0u8; len];
                    rd.read_exact(&mut buf)
                        .await
                        .map_err(io("read a write payload"))?;
                    h.verify(len, crc32c::crc32c(&buf))
                        .and_then(|()| core.memory.write(h.offset, &buf))
                }
            };
            drop(guard);
            core.write_landed(h.handoff, h.layer, len as u64, verified)
                .await;
        }
        Err(e) => {
            discard(rd, len).await?;
            core.rejected(Some(h.handoff), &e);
            if matches!(e, Error::UnknownHandoff(_)) {
                core.cancel_unknown(link, h.handoff).await;
            }
        }
    }
    Ok(())
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut len: usize) -> Result<()> {
    let mut scratch = vec![0u8; len.min(DISCARD_CHUNK)];
    while len > 0 {
        let n = len.min(scratch.len());
        rd.read_exact(&mut scratch[..n])
            .await
            .map_err(io("skip a rejected payload"))?;
        len -= n;
    }
    Ok(())
}

/// The write frames for `pieces`, each split into frames of at most `max` bytes: headers to
/// write before each payload slice.
pub(crate) fn write_headers<'a>(
    handoff: HandoffId,
    layer: u32,
    pieces: &'a [(u64, &'a [u8])],
    max: usize,
) -> Result<Vec<([u8; HEADER_LEN], &'a [u8])>> {
    let mut frames = Vec::new();
    for (offset, bytes) in pieces {
        for (i, chunk) in bytes.chunks(max.max(1)).enumerate() {
            let mut h = Header::new(Kind::Write, handoff, chunk.len(), crc32c::crc32c(chunk))?;
            h.layer = layer;
            h.offset = offset + (i * max) as u64;
            frames.push((h.encode(), chunk));
        }
    }
    Ok(frames)
}

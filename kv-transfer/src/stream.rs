//! Whole frames on a byte stream: the TCP transport's streams and the shared-memory transport's
//! control socket read hellos and closes, and write closes, the same way.

use std::io;

use baton_core::LayoutDescriptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::frame::{
    CloseCode, FrameHeader, FrameKind, FrameLimits, HEADER_LEN, decode_close, decode_descriptor,
    encode_close, encode_frame,
};

/// Reads until `buf` is full or the peer closes; returns the bytes read.
pub(crate) async fn read_full<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match rd.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a frame's payload, whose length the verified header bounds.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    header: &FrameHeader,
) -> Result<Vec<u8>> {
    let mut payload = vec![0u8; header.payload_len as usize];
    let n = read_full(rd, &mut payload)
        .await
        .map_err(io_err("read frame payload"))?;
    if n < payload.len() {
        return Err(Error::PeerClosed {
            during: "inside a frame payload",
            handoff: Some(header.handoff),
        });
    }
    Ok(payload)
}

/// Reads one whole control frame (hello or close) and verifies it.
pub(crate) async fn read_control<R: AsyncRead + Unpin>(
    rd: &mut R,
    limits: &FrameLimits,
) -> Result<(FrameHeader, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(rd, &mut head)
        .await
        .map_err(io_err("read handshake"))?;
    if n < HEADER_LEN {
        return Err(Error::PeerClosed {
            during: "during the handshake",
            handoff: None,
        });
    }
    let header = FrameHeader::decode(&head, limits)?;
    if header.kind == FrameKind::KvData {
        return Err(Error::UnexpectedFrame {
            expected: FrameKind::Hello,
            got: header.kind,
        });
    }
    let payload = read_payload(rd, &header).await?;
    header.verify_payload(&payload)?;
    Ok((header, payload))
}

/// Reads the receiver's answer to a hello: its own hello, whose layout must map onto `local`, or
/// a close saying why it refused.
pub(crate) async fn read_hello_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    local: &LayoutDescriptor,
    limits: &FrameLimits,
) -> Result<LayoutDescriptor> {
    let (reply, payload) = read_control(rd, limits).await?;
    let remote = match reply.kind {
        FrameKind::Hello => decode_descriptor(&payload)?,
        FrameKind::Close => {
            let (code, message) = decode_close(&payload)?;
            return Err(Error::PeerRefused { code, message });
        }
        got => {
            return Err(Error::UnexpectedFrame {
                expected: FrameKind::Hello,
                got,
            });
        }
    };
    remote.check_compatible(local)?;
    Ok(remote)
}

/// Tells the peer why the link ends, in a close frame, and shuts the writing side.
pub(crate) async fn send_close<W: AsyncWrite + Unpin>(wr: &mut W, error: &Error) -> io::Result<()> {
    let payload = encode_close(CloseCode::for_error(error), &error.to_string());
    if let Ok(header) = FrameHeader::new(FrameKind::Close, &payload) {
        wr.write_all(&encode_frame(&header, &payload)).await?;
    }
    wr.shutdown().await
}

pub(crate) fn io_err(during: &'static str) -> impl Fn(io::Error) -> Error {
    move |source| Error::Io { during, source }
}

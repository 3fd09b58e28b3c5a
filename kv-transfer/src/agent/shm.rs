//! The shared-memory backend, for two workers on one host: one copy per byte. A link is a Unix
//! stream socket for control frames; at the hello each side passes the memfd of its pool (when
//! its pool is shareable) with `SCM_RIGHTS`, and the other maps it. A writer then copies
//! straight from its pool into the peer's and sends one `Landed` notice per layer naming the
//! ranges; nothing is copied on the receiving side. With `shm_checksums` the writer computes
//! each range's crc32c in the same pass as the copy and the receiver checks it in place before
//! counting the range. Off by default: the bytes cross no wire, and the check costs a sixth to
//! a fifth of the copy's speed and a pass over the bytes on the receiver's CPU (BENCHMARKS.md).
//!
//! Before the hello each side authenticates (`auth`) on the same socket, so the memfd goes
//! only to a peer that proved the cluster key.
//!
//! A writer claims a handoff (`Begin` / `Go`) before its first direct write, so the receiver
//! knows whom to wait for if it gives the handoff up (`Cancel` / `Stopped`): another process's
//! writes cannot be fenced off, only agreed to stop. Where the peer's pool is not mapped (its
//! pool is private memory), writes travel as write frames over the socket instead, and the log
//! says so.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use baton_core::HandoffId;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;

use super::auth::Side;
use super::core::Core;
use super::{BoxFuture, Link, Transport, framed};
use crate::copy::checksummed_copy;
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::memory::{ByteCopy, HostRegion};
use crate::wire::{self, HEADER_LEN, Header, Hello, Kind, LandedRange};

/// Largest hello frame accepted (a hello is about a hundred bytes).
const MAX_HELLO: usize = 4096;

struct ShmLink {
    id: u64,
    remote: Hello,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// The peer's pool, mapped here, when it passed its memfd.
    peer_memory: Option<HostRegion>,
    /// Whether this side passed its pool's memfd to the peer.
    exposed: bool,
    closed: AtomicBool,
    max_write: usize,
    /// Checksum direct copies (`shm_checksums`).
    checksums: bool,
}

impl Link for ShmLink {
    fn remote(&self) -> &Hello {
        &self.remote
    }

    fn transport(&self) -> Transport {
        Transport::Shm
    }

    fn direct(&self) -> bool {
        self.peer_memory.is_some()
    }

    fn peer_writes_direct(&self) -> bool {
        self.exposed
    }

    fn send_frame(&self, frame: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut w = self.writer.lock().await;
            w.write_all(&frame).await.map_err(|e| {
                self.closed.store(true, Ordering::Release);
                Error::Io {
                    during: "writing to a kv shm link",
                    source: e,
                }
            })
        })
    }

    fn write_frames<'a>(
        &'a self,
        handoff: HandoffId,
        layer: u32,
        pieces: &'a [(u64, &'a [u8])],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut w = self.writer.lock().await;
            for (header, payload) in framed::write_headers(handoff, layer, pieces, self.max_write)?
            {
                let wrote = async {
                    w.write_all(&header).await?;
                    w.write_all(payload).await
                };
                wrote.await.map_err(|e| {
                    self.closed.store(true, Ordering::Release);
                    Error::Io {
                        during: "writing to a kv shm link",
                        source: e,
                    }
                })?;
            }
            Ok(())
        })
    }

    fn copy_direct(&self, src: &HostRegion, copies: &[ByteCopy]) -> Result<Vec<LandedRange>> {
        let peer = self.peer_memory.as_ref().ok_or(Error::InvalidConfig {
            field: "transport",
            reason: "the peer's pool is not mapped here".into(),
        })?;
        let outside = |what: &str, c: &ByteCopy| Error::SegmentRejected {
            handoff: HandoffId(0),
            reason: format!("a copy {c:?} lies outside the {what} pool"),
        };
        let mut ranges = Vec::with_capacity(copies.len());
        for c in copies {
            let len = c.len as usize;
            // SAFETY: the source rows belong to blocks the caller holds (a sequence the engine
            // thread finished this layer of, or a pinned pull source); nobody writes them now.
            let from = unsafe { src.bytes(c.src, len) }.ok_or_else(|| outside("local", c))?;
            // SAFETY: the destination rows belong to blocks the peer reserved for this
            // handoff and granted to this writer (`Begin` / `Go`, or its read request).
            let to = unsafe { peer.bytes_mut(c.dst, len) }.ok_or_else(|| outside("peer's", c))?;
            let crc = if self.checksums {
                Some(checksummed_copy(from, to))
            } else {
                to.copy_from_slice(from);
                None
            };
            ranges.push(LandedRange {
                offset: c.dst,
                len: c.len,
                crc,
            });
        }
        Ok(ranges)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close<'a>(&'a self, why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.closed.store(true, Ordering::Release);
            let close = wire::encode_close(wire::CloseCode::Normal, why);
            let mut w = self.writer.lock().await;
            if let Ok(f) = wire::frame(Kind::Close, HandoffId(0), &close) {
                let _ = w.write_all(&f).await;
            }
            let _ = w.shutdown().await;
        })
    }

    fn id(&self) -> u64 {
        self.id
    }
}

/// Sends `data` with `fd` attached (`SCM_RIGHTS`) when given.
fn send_with_fd(sock: &StdUnixStream, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsg of one fd (sized by CMSG_SPACE above).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: sendmsg with a header whose buffers outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &data[n as usize..];
    let mut s = sock;
    while !rest.is_empty() {
        let k = s.write(rest)?;
        rest = &rest[k..];
    }
    Ok(())
}

/// Receives into `buf`, returning the bytes read and a descriptor passed with them.
fn recv_with_fd(sock: &StdUnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![MaybeUninit::<u8>::zeroed(); space];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: recvmsg into buffers that outlive the call; MSG_CMSG_CLOEXEC keeps a received
    // descriptor from leaking into children.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                // Only the first descriptor is kept; a second (which no baton peer sends) is
                // closed rather than leaked.
                let owned = OwnedFd::from_raw_fd(raw);
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fd))
}

fn malformed(reason: &str) -> Error {
    Error::MalformedFrame {
        kind: Kind::Hello,
        reason: reason.into(),
    }
}

/// A shm hello payload: the [`Hello`], then the extra bytes (`1u32` and a flag byte: whether
/// the sender's memfd rides with the frame). Returns the hello and the flag.
pub fn split_shm_hello(body: &[u8]) -> Result<(Hello, bool)> {
    let Some((hello_bytes, extra)) = body.split_last_chunk::<5>() else {
        return Err(malformed("expected a hello"));
    };
    if extra[..4] != 1u32.to_le_bytes() {
        return Err(malformed("shm hello extra"));
    }
    let hello = Hello::decode(hello_bytes)?;
    Ok((hello, extra[4] == 1))
}

/// The hello exchange, blocking, on a socket with timeouts set: each side sends its hello (and
/// its pool's memfd, when shareable), then reads the peer's.
fn handshake_blocking(
    core: &Core,
    sock: &StdUnixStream,
) -> Result<(Hello, Option<HostRegion>, bool)> {
    let limit = core.config.handshake_timeout;
    let io = |during| move |source| Error::Io { during, source };
    sock.set_read_timeout(Some(limit))
        .map_err(io("set a timeout"))?;
    sock.set_write_timeout(Some(limit))
        .map_err(io("set a timeout"))?;
    let my_fd = core.memory.host().and_then(|r| r.fd());
    let mut payload = core.hello().encode();
    // The extra: whether a memfd rides with this frame.
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.push(u8::from(my_fd.is_some()));
    let frame = wire::frame(Kind::Hello, HandoffId(0), &payload)?;
    send_with_fd(sock, &frame, my_fd).map_err(io("send the shm hello"))?;

    // Exactly the hello, never past it: frames the peer sends right after belong to the
    // framed reader. The descriptor rides with the first byte, so the first read gets it.
    let mut buf = vec![0u8; MAX_HELLO];
    let (mut got, fd) =
        recv_with_fd(sock, &mut buf[..HEADER_LEN]).map_err(io("receive the shm hello"))?;
    let mut s = sock;
    let mut fill = |buf: &mut [u8], got: &mut usize, upto: usize| -> Result<()> {
        while *got < upto {
            let n = s
                .read(&mut buf[*got..upto])
                .map_err(io("receive the shm hello"))?;
            if n == 0 {
                return Err(Error::PeerClosed {
                    during: "the shm handshake",
                    handoff: None,
                });
            }
            *got += n;
        }
        Ok(())
    };
    fill(&mut buf, &mut got, HEADER_LEN)?;
    let head: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().map_err(|_| Error::Io {
        during: "the shm handshake",
        source: io::Error::other("short header"),
    })?;
    let header = Header::decode(head, &core.config.limits())?;
    let total = HEADER_LEN + header.payload_len as usize;
    if total > MAX_HELLO {
        return Err(Error::PayloadTooLarge {
            len: total as u64,
            max: MAX_HELLO as u32,
        });
    }
    fill(&mut buf, &mut got, total)?;
    let body = &buf[HEADER_LEN..total];
    header.verify(body.len(), crc32c::crc32c(body))?;
    if header.kind == Kind::Close {
        let (code, message) = wire::decode_close(body)?;
        return Err(Error::PeerRefused { code, message });
    }
    if header.kind != Kind::Hello {
        return Err(malformed("expected a hello"));
    }
    let (hello, announced) = split_shm_hello(body)?;
    if let Err(e) = core.check_peer(&hello) {
        let close = wire::encode_close(crate::wire::CloseCode::Incompatible, &e.to_string());
        if let Ok(f) = wire::frame(Kind::Close, HandoffId(0), &close) {
            let _ = (&*sock).write_all(&f);
        }
        return Err(e);
    }
    let mapped = match (announced, fd) {
        (true, Some(fd)) => {
            let len = usize::try_from(hello.pool.region_bytes())
                .map_err(|_| malformed("peer pool larger than this address space"))?;
            Some(HostRegion::map(fd, len).map_err(io("map the peer's pool"))?)
        }
        (true, None) => return Err(malformed("the peer announced a memfd and sent none")),
        (false, _) => None,
    };
    sock.set_read_timeout(None).map_err(io("clear a timeout"))?;
    sock.set_write_timeout(None)
        .map_err(io("clear a timeout"))?;
    Ok((hello, mapped, my_fd.is_some()))
}

async fn open(core: Arc<Core>, sock: StdUnixStream) -> Result<Arc<ShmLink>> {
    let handshaken = {
        let core = core.clone();
        tokio::task::spawn_blocking(move || {
            handshake_blocking(&core, &sock)
                .map(|(hello, mapped, exposed)| (sock, hello, mapped, exposed))
        })
        .await
        .map_err(|e| Error::Io {
            during: "the shm handshake",
            source: io::Error::other(e.to_string()),
        })??
    };
    let (sock, remote, peer_memory, exposed) = handshaken;
    sock.set_nonblocking(true).map_err(|source| Error::Io {
        during: "make the shm socket non-blocking",
        source,
    })?;
    let stream = tokio::net::UnixStream::from_std(sock).map_err(|source| Error::Io {
        during: "register the shm socket",
        source,
    })?;
    if peer_memory.is_none() {
        tracing::warn!(
            peer = %remote.worker,
            "shm link without the peer's pool mapped (its pool is private memory): writes to it go through the socket"
        );
    }
    let (rd, wr) = stream.into_split();
    let link = Arc::new(ShmLink {
        id: core.link_id(),
        remote,
        writer: tokio::sync::Mutex::new(wr),
        peer_memory,
        exposed,
        closed: AtomicBool::new(false),
        max_write: core.config.max_write as usize,
        checksums: core.config.shm_checksums,
    });
    core.register(link.clone());
    let (c, l) = (core.clone(), link.clone());
    tokio::spawn(async move {
        let dyn_link: Arc<dyn Link> = l.clone();
        if let Err(e) = framed::serve(c.clone(), dyn_link, BufReader::new(rd)).await {
            tracing::warn!(peer = %l.remote.worker, error = %e, "kv shm link ended");
        }
        l.closed.store(true, Ordering::Release);
        c.link_closed(l.id).await;
    });
    Ok(link)
}

/// Binds the Unix socket at `path` (replacing a stale socket file) and accepts peers.
pub(crate) async fn listen(core: Arc<Core>, path: &Path) -> Result<Endpoint> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(Error::InvalidConfig {
                field: "shm_socket",
                reason: format!("{} exists and is not a socket", path.display()),
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Io {
        during: "bind the kv shm socket",
        source,
    })?;
    let path_buf: PathBuf = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "kv shm accept failed");
                    continue;
                }
            };
            let core = core.clone();
            tokio::spawn(async move {
                let opened = async {
                    let std = authenticated(&core, stream, Side::Acceptor).await?;
                    open(core.clone(), std).await
                };
                if let Err(e) = opened.await {
                    core.link_failed(&"a local shm peer", &e);
                }
            });
        }
    });
    Ok(Endpoint::Shm(path_buf))
}

/// Dials the shm socket at `path`.
pub(crate) async fn connect(core: Arc<Core>, path: &Path) -> Result<Arc<dyn Link>> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| Error::Io {
            during: "connect to a kv shm peer",
            source,
        })?;
    let sock = authenticated(&core, stream, Side::Dialer).await?;
    Ok(open(core, sock).await?)
}

/// Runs the link's authentication (`auth`) on `stream`, then hands it back as a blocking
/// socket for the hello, which passes the pool's memfd: a peer sees this pool's memory only
/// after it proved the cluster key.
async fn authenticated(
    core: &Core,
    mut stream: tokio::net::UnixStream,
    side: Side,
) -> Result<StdUnixStream> {
    framed::authenticate(core, &mut stream, side).await?;
    let io = |during| move |source| Error::Io { during, source };
    let std = stream.into_std().map_err(io("take the shm socket back"))?;
    std.set_nonblocking(false)
        .map_err(io("make the shm socket blocking"))?;
    Ok(std)
}

//! The TCP backend: a link is several streams to one peer (`tcp_streams`), frames spread over
//! them round robin. A receiving stream reads each admitted write straight into the pool; the
//! sending side writes header and payload as one vectored write, from owned buffers (a push
//! from the engine thread) or straight from the pinned pool (a pull served by the agent).
//!
//! Each stream authenticates on its own (`auth`) before its hello: a stream is a connection.
//! The hello of each stream carries the link's nonce, the stream's index and the stream count,
//! so the accepting side groups a dialer's streams into one link.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use baton_core::{HandoffId, WorkerId};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::auth::Side;
use super::core::Core;
use super::{BoxFuture, Link, Transport, framed};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::memory::{ByteCopy, HostRegion};
use crate::wire::{Hello, LandedRange};

/// Read buffering per stream: headers and small payloads come through it; a large payload is
/// read straight into the pool.
const READ_BUFFER: usize = 64 << 10;

struct TcpLink {
    id: u64,
    remote: Hello,
    /// One writer per stream; an accepting side fills them as the dialer's streams arrive.
    writers: Vec<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
    next: AtomicUsize,
    closed: AtomicBool,
    max_write: usize,
}

impl TcpLink {
    /// The next stream's writer that is present, round robin.
    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, Option<OwnedWriteHalf>>> {
        let n = self.writers.len();
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let w = self.writers[i].lock().await;
            if w.is_some() {
                return Ok(w);
            }
        }
        Err(Error::PeerClosed {
            during: "writing to a kv link",
            handoff: None,
        })
    }

    fn broken(&self, e: std::io::Error) -> Error {
        self.closed.store(true, Ordering::Release);
        Error::Io {
            during: "writing to a kv link",
            source: e,
        }
    }
}

/// Writes every byte of `header` then `payload` with vectored writes.
async fn write_pair<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<()> {
    let (mut h, mut p) = (header, payload);
    while !h.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(h), IoSlice::new(p)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < h.len() {
            h = &h[n..];
        } else {
            p = &p[n - h.len()..];
            h = &[];
        }
    }
    w.write_all(p).await
}

impl Link for TcpLink {
    fn remote(&self) -> &Hello {
        &self.remote
    }

    fn transport(&self) -> Transport {
        Transport::Tcp
    }

    fn direct(&self) -> bool {
        false
    }

    fn peer_writes_direct(&self) -> bool {
        false
    }

    fn send_frame(&self, frame: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let Some(w) = w.as_mut() else {
                return Err(Error::PeerClosed {
                    during: "writing to a kv link",
                    handoff: None,
                });
            };
            w.write_all(&frame).await.map_err(|e| self.broken(e))
        })
    }

    fn write_frames<'a>(
        &'a self,
        handoff: HandoffId,
        layer: u32,
        pieces: &'a [(u64, &'a [u8])],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for (header, payload) in framed::write_headers(handoff, layer, pieces, self.max_write)?
            {
                let mut w = self.writer().await?;
                let Some(w) = w.as_mut() else {
                    return Err(Error::PeerClosed {
                        during: "writing to a kv link",
                        handoff: Some(handoff),
                    });
                };
                write_pair(w, &header, payload)
                    .await
                    .map_err(|e| self.broken(e))?;
            }
            Ok(())
        })
    }

    fn copy_direct(&self, _: &HostRegion, _: &[ByteCopy]) -> Result<Vec<LandedRange>> {
        Err(Error::InvalidConfig {
            field: "transport",
            reason: "tcp cannot write into a peer's memory".into(),
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close<'a>(&'a self, why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.closed.store(true, Ordering::Release);
            let close = crate::wire::encode_close(crate::wire::CloseCode::Normal, why);
            let frame = crate::wire::frame(crate::wire::Kind::Close, HandoffId(0), &close).ok();
            for (i, w) in self.writers.iter().enumerate() {
                if let Some(mut w) = w.lock().await.take() {
                    if let (0, Some(f)) = (i, &frame) {
                        let _ = w.write_all(f).await;
                    }
                    let _ = w.shutdown().await;
                }
            }
        })
    }

    fn id(&self) -> u64 {
        self.id
    }
}

/// The TCP extra of a hello: link nonce, stream index, stream count.
fn extra(nonce: u64, index: u16, count: u16) -> Vec<u8> {
    let mut b = nonce.to_le_bytes().to_vec();
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b
}

fn parse_extra(b: &[u8]) -> Result<(u64, u16, u16)> {
    if b.len() != 12 {
        return Err(Error::MalformedFrame {
            kind: crate::wire::Kind::Hello,
            reason: format!("tcp hello extra of {} bytes, expected 12", b.len()),
        });
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[..8]);
    let index = u16::from_le_bytes([b[8], b[9]]);
    let count = u16::from_le_bytes([b[10], b[11]]);
    if count == 0 || count > 64 || index >= count {
        return Err(Error::MalformedFrame {
            kind: crate::wire::Kind::Hello,
            reason: format!("stream {index} of {count}"),
        });
    }
    Ok((u64::from_le_bytes(n), index, count))
}

fn socket(core: &Core, addr: SocketAddr) -> Result<TcpSocket> {
    let io = |during| move |source| Error::Io { during, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io("open a tcp socket"))?;
    if let Some(size) = core.config.socket_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(io("set the receive buffer"))?;
        socket
            .set_send_buffer_size(size)
            .map_err(io("set the send buffer"))?;
    }
    Ok(socket)
}

/// Binds the TCP listener and accepts peers until the agent is dropped... or forever: links
/// are owned by the core, the accept loop by the runtime.
pub(crate) async fn listen(core: Arc<Core>) -> Result<Endpoint> {
    let at = core.config.tcp_listen;
    let socket = socket(&core, at)?;
    socket.set_reuseaddr(true).map_err(|source| Error::Io {
        during: "set SO_REUSEADDR",
        source,
    })?;
    socket.bind(at).map_err(|source| Error::Io {
        during: "bind the kv tcp listener",
        source,
    })?;
    let listener = socket.listen(1024).map_err(|source| Error::Io {
        during: "listen for kv tcp peers",
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        during: "the kv tcp listener's address",
        source,
    })?;
    tokio::spawn(accept_loop(core, listener));
    Ok(Endpoint::Tcp(addr))
}

type Pending = Arc<Mutex<HashMap<(WorkerId, u64), Arc<TcpLink>>>>;

async fn accept_loop(core: Arc<Core>, listener: TcpListener) {
    let pending: Pending = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "kv tcp accept failed");
                continue;
            }
        };
        let (core, pending) = (core.clone(), pending.clone());
        tokio::spawn(async move {
            if let Err(e) = accept(core.clone(), stream, pending).await {
                core.link_failed(&peer, &e);
            }
        });
    }
}

async fn accept(core: Arc<Core>, mut stream: TcpStream, pending: Pending) -> Result<()> {
    let _ = stream.set_nodelay(true);
    framed::authenticate(&core, &mut stream, Side::Acceptor).await?;
    let (hello, extra_bytes) = framed::handshake(&core, &mut stream, &extra(0, 0, 1)).await?;
    let (nonce, index, count) = parse_extra(&extra_bytes)?;
    let key = (hello.worker.clone(), nonce);
    let link = {
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        let link = p
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(TcpLink {
                    id: core.link_id(),
                    remote: hello.clone(),
                    writers: (0..count).map(|_| tokio::sync::Mutex::new(None)).collect(),
                    next: AtomicUsize::new(0),
                    closed: AtomicBool::new(false),
                    max_write: core.config.max_write as usize,
                })
            })
            .clone();
        if link.writers.len() != count as usize || link.remote != hello {
            return Err(Error::MalformedFrame {
                kind: crate::wire::Kind::Hello,
                reason: "streams of one link disagree".into(),
            });
        }
        if index + 1 == count {
            // The last stream: the link is whole; later streams with this nonce start anew.
            p.remove(&key);
        }
        link
    };
    let (rd, wr) = stream.into_split();
    *link.writers[index as usize].lock().await = Some(wr);
    if index == 0 {
        core.register(link.clone());
    }
    run_stream(core, link, rd).await;
    Ok(())
}

/// Serves one stream's frames; the first stream of a link to end closes the link.
async fn run_stream(core: Arc<Core>, link: Arc<TcpLink>, rd: tokio::net::tcp::OwnedReadHalf) {
    let dyn_link: Arc<dyn Link> = link.clone();
    let result = framed::serve(
        core.clone(),
        dyn_link,
        BufReader::with_capacity(READ_BUFFER, rd),
    )
    .await;
    if let Err(e) = &result {
        tracing::warn!(peer = %link.remote.worker, error = %e, "kv tcp stream ended");
    }
    if !link.closed.swap(true, Ordering::AcqRel) {
        for w in &link.writers {
            if let Some(mut w) = w.lock().await.take() {
                let _ = w.shutdown().await;
            }
        }
        core.link_closed(link.id).await;
    }
}

/// Dials `addr` with the configured number of streams and handshakes each.
pub(crate) async fn connect(core: Arc<Core>, addr: SocketAddr) -> Result<Arc<dyn Link>> {
    let count = core.config.tcp_streams as u16;
    let nonce: u64 = rand_nonce();
    let mut halves = Vec::with_capacity(count as usize);
    let mut remote: Option<Hello> = None;
    for index in 0..count {
        let mut stream = socket(&core, addr)?
            .connect(addr)
            .await
            .map_err(|source| Error::Io {
                during: "connect to a kv peer",
                source,
            })?;
        let _ = stream.set_nodelay(true);
        framed::authenticate(&core, &mut stream, Side::Dialer).await?;
        let (hello, _) = framed::handshake(&core, &mut stream, &extra(nonce, index, count)).await?;
        if remote.as_ref().is_some_and(|r| *r != hello) {
            return Err(Error::MalformedFrame {
                kind: crate::wire::Kind::Hello,
                reason: "the peer's streams answered with different hellos".into(),
            });
        }
        remote = Some(hello);
        halves.push(stream.into_split());
    }
    let remote = remote.ok_or(Error::InvalidConfig {
        field: "tcp_streams",
        reason: "no stream".into(),
    })?;
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (rd, wr) in halves {
        readers.push(rd);
        writers.push(tokio::sync::Mutex::new(Some(wr)));
    }
    let link = Arc::new(TcpLink {
        id: core.link_id(),
        remote,
        writers,
        next: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        max_write: core.config.max_write as usize,
    });
    core.register(link.clone());
    for rd in readers {
        tokio::spawn(run_stream(core.clone(), link.clone(), rd));
    }
    Ok(link)
}

/// A link nonce: unique enough among one peer's concurrent dials.
fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

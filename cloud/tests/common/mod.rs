//! `MisbehavingUpstream`: a real HTTP/1.1 server on 127.0.0.1 that plays an OpenAI-compatible
//! endpoint, well (`Mode::Scripted`) or in one of the ways real endpoints fail. Written on a
//! bare `TcpListener` rather than axum so a mode can cut a chunked body mid-way, stall, or
//! watch for the client closing its socket.
//!
//! Every connection's request is recorded; every connection the server holds open reports
//! when the client closed it, so tests wait on a channel, never a sleep.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How the server answers every request.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200, then each piece as its own HTTP chunk (so the client sees these boundaries), then
    /// the end of the body.
    Scripted(Vec<Vec<u8>>),
    /// A non-2xx status with an OpenAI error body and, optionally, `Retry-After` (seconds).
    Refuse {
        status: u16,
        retry_after: Option<u64>,
        message: &'static str,
    },
    /// 401, echoing the key it got in the message as OpenAI does (the client must scrub it).
    Unauthorized,
    /// Two content deltas, then the socket closes without ending the body.
    DropMidStream,
    /// An opening role-only chunk, then the socket closes: no content reached the client.
    DropBeforeContent,
    /// Reads the request and never answers.
    NeverAnswers,
    /// The opening chunk and one content delta, then nothing, the socket held open.
    StallsAfterFirstChunk,
    /// `data:` lines that are not JSON.
    GarbageStream,
    /// An OpenAI error object as an event, echoing the key it got, before any content.
    ErrorInStream,
}

/// What the server received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: serde_json::Value,
}

pub struct MisbehavingUpstream {
    pub addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<RecordedRequest>,
    closed: mpsc::UnboundedReceiver<()>,
    accept: JoinHandle<()>,
}

impl Drop for MisbehavingUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl MisbehavingUpstream {
    /// Binds 127.0.0.1:0 and serves `mode` on every connection; accepting starts before this
    /// returns (the listener is bound), so no readiness wait is needed.
    pub async fn start(mode: Mode) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let mode = mode.clone();
                let requests_tx = requests_tx.clone();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, mode, requests_tx, closed_tx).await;
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            closed,
            accept,
        })
    }

    /// The base URL a client configures: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The next request received.
    pub async fn request(&mut self) -> anyhow::Result<RecordedRequest> {
        within(self.requests.recv())
            .await?
            .context("the server stopped")
    }

    /// Waits until the client closed a connection the server was holding open.
    pub async fn client_closed(&mut self) -> anyhow::Result<()> {
        within(self.closed.recv())
            .await?
            .context("the server stopped")
    }
}

/// A guard against a hung test, far above anything a passing test waits.
async fn within<T>(f: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .context("waited 20 s")
}

async fn serve(
    mut socket: TcpStream,
    mode: Mode,
    requests: mpsc::UnboundedSender<RecordedRequest>,
    closed: mpsc::UnboundedSender<()>,
) -> anyhow::Result<()> {
    let request = read_request(&mut socket).await?;
    let key = request
        .headers
        .get("authorization")
        .map(|v| v.trim_start_matches("Bearer ").to_string())
        .or_else(|| request.headers.get("api-key").cloned())
        .unwrap_or_default();
    let _ = requests.send(request);

    let role = chat_chunk(r#"{"role":"assistant","content":""}"#, None);
    match mode {
        Mode::Scripted(pieces) => {
            start_stream(&mut socket).await?;
            for piece in pieces {
                write_chunk(&mut socket, &piece).await?;
            }
            socket.write_all(b"0\r\n\r\n").await?;
        }
        Mode::Refuse {
            status,
            retry_after,
            message,
        } => {
            let body = serde_json::json!({"error": {"message": message, "type": "error"}});
            let extra = retry_after
                .map(|s| format!("retry-after: {s}\r\n"))
                .unwrap_or_default();
            respond(&mut socket, status, &extra, &body.to_string()).await?;
        }
        Mode::Unauthorized => {
            let message = format!("Incorrect API key provided: {key}.");
            let body =
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}});
            respond(&mut socket, 401, "", &body.to_string()).await?;
        }
        Mode::DropMidStream => {
            start_stream(&mut socket).await?;
            write_chunk(&mut socket, &role).await?;
            write_chunk(&mut socket, &chat_chunk(r#"{"content":"Hel"}"#, None)).await?;
            write_chunk(&mut socket, &chat_chunk(r#"{"content":"lo"}"#, None)).await?;
            return Ok(());
        }
        Mode::DropBeforeContent => {
            start_stream(&mut socket).await?;
            write_chunk(&mut socket, &role).await?;
            return Ok(());
        }
        Mode::NeverAnswers => {}
        Mode::StallsAfterFirstChunk => {
            start_stream(&mut socket).await?;
            write_chunk(&mut socket, &role).await?;
            write_chunk(&mut socket, &chat_chunk(r#"{"content":"Hel"}"#, None)).await?;
        }
        Mode::GarbageStream => {
            start_stream(&mut socket).await?;
            write_chunk(&mut socket, b"data: this is not json\n\n").await?;
            write_chunk(&mut socket, b"data: [DONE]\n\n").await?;
            socket.write_all(b"0\r\n\r\n").await?;
        }
        Mode::ErrorInStream => {
            start_stream(&mut socket).await?;
            write_chunk(&mut socket, &role).await?;
            let error = serde_json::json!({"error": {
                "message": format!("internal failure handling key {key}"),
                "type": "server_error",
            }});
            write_chunk(&mut socket, format!("data: {error}\n\n").as_bytes()).await?;
            write_chunk(&mut socket, b"data: [DONE]\n\n").await?;
            socket.write_all(b"0\r\n\r\n").await?;
        }
    }
    // Hold the connection until the client closes it (or sends more, which is ignored).
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = closed.send(());
    Ok(())
}

async fn read_request(socket: &mut TcpStream) -> anyhow::Result<RecordedRequest> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            bail!("the client closed before sending a request");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().context("no request line")?;
    let mut parts = request_line.split(' ');
    let method = parts.next().context("no method")?.to_string();
    let path = parts.next().context("no path")?.to_string();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .context("no content-length")?
        .parse()?;
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            bail!("the client closed mid-body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(RecordedRequest {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body)?,
    })
}

async fn respond(
    socket: &mut TcpStream,
    status: u16,
    extra: &str,
    body: &str,
) -> anyhow::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} Refused\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra}\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    Ok(())
}

async fn start_stream(socket: &mut TcpStream) -> anyhow::Result<()> {
    socket
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        )
        .await?;
    Ok(())
}

async fn write_chunk(socket: &mut TcpStream, data: &[u8]) -> anyhow::Result<()> {
    socket
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    socket.write_all(data).await?;
    socket.write_all(b"\r\n").await?;
    socket.flush().await?;
    Ok(())
}

/// One SSE event of a chat stream: `delta` (a JSON object) and a finish reason.
pub fn chat_chunk(delta: &str, finish_reason: Option<&str>) -> Vec<u8> {
    let finish = finish_reason
        .map(|r| format!("\"{r}\""))
        .unwrap_or_else(|| "null".into());
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"remote\",\"choices\":[{{\"index\":0,\"delta\":{delta},\
         \"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
    )
    .into_bytes()
}

/// A well-formed chat stream as OpenAI writes it: an opening role chunk, deltas (one with a
/// multi-byte character), a finish, a usage chunk and `[DONE]`, with a keep-alive comment and
/// CRLF line ends in places.
pub fn chat_stream_bytes() -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend(chat_chunk(r#"{"role":"assistant","content":""}"#, None));
    bytes.extend(b": keep-alive\n\n");
    bytes.extend(chat_chunk(r#"{"content":"Hel"}"#, None));
    bytes.extend(chat_chunk(r#"{"content":"lo, "}"#, None));
    let crlf =
        String::from_utf8_lossy(&chat_chunk(r#"{"content":"wörld"}"#, None)).replace('\n', "\r\n");
    bytes.extend(crlf.into_bytes());
    bytes.extend(chat_chunk("{}", Some("stop")));
    bytes.extend(
        b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\
          \"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\
          \"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    );
    bytes.extend(b"data: [DONE]\n\n");
    bytes
}

/// A completions stream (`choices[0].text`), ended by a usage chunk and `[DONE]`.
pub fn completions_stream_bytes() -> Vec<u8> {
    let mut bytes = Vec::new();
    for (text, finish) in [("Once", "null"), (" upon", "null"), ("", "\"length\"")] {
        bytes.extend(
            format!(
                "data: {{\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\
                 \"text\":\"{text}\",\"finish_reason\":{finish}}}]}}\n\n"
            )
            .into_bytes(),
        );
    }
    bytes.extend(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
    );
    bytes.extend(b"data: [DONE]\n\n");
    bytes
}

/// `bytes` cut at awkward places: sizes cycling through 1, 7, 3, 13, 2, 31, and a cut inside
/// every multi-byte character.
pub fn split_awkwardly(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = Vec::new();
    let mut at = 0;
    for size in [1, 7, 3, 13, 2, 31].into_iter().cycle() {
        at += size;
        if at >= bytes.len() {
            break;
        }
        cuts.push(at);
    }
    cuts.extend((1..bytes.len()).filter(|&i| bytes[i] & 0xC0 == 0x80 && bytes[i - 1] >= 0xC0));
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts {
        pieces.push(bytes[start..cut].to_vec());
        start = cut;
    }
    pieces.push(bytes[start..].to_vec());
    pieces
}

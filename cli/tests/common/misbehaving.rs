//! `MisbehavingUpstream`: a real HTTP server on 127.0.0.1 that fails the way cloud endpoints
//! fail, on purpose, for the coordinator's cloud path to meet: it refuses (an HTTP status),
//! drops the stream mid-way, or never answers. It is not an OpenAI implementation: every
//! request that gets text gets it from a real baton.

#![allow(dead_code)] // Only the cloud tests use it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How it fails.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answers every request with this status and an OpenAI error body (429 with Retry-After).
    Status(u16),
    /// Answers 200 with an SSE stream of one chat delta, then closes the connection.
    DropMidStream,
    /// Reads the request and never answers (the connection stays open until the server drops).
    NeverAnswers,
    /// Answers 200 and streams chat deltas without end, as fast as the client takes them,
    /// until the client closes the connection; then says so on `closed`.
    Endless,
}

pub struct MisbehavingUpstream {
    pub addr: SocketAddr,
    /// Requests it received.
    pub requests: Arc<AtomicUsize>,
    /// One message per connection the client closed mid-stream (`Fault::Endless`).
    pub closed: std::sync::mpsc::Receiver<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl MisbehavingUpstream {
    pub fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, stopping) = (requests.clone(), stop.clone());
        let (closed_tx, closed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                if read_request(&mut stream).is_none() {
                    continue;
                }
                count.fetch_add(1, Ordering::Relaxed);
                match fault {
                    Fault::Status(code) => {
                        let body = format!(
                            r#"{{"error":{{"message":"misbehaving upstream refuses with {code}","type":"test","code":null}}}}"#
                        );
                        let retry = if code == 429 {
                            "Retry-After: 1\r\n"
                        } else {
                            ""
                        };
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {code} Refused\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Fault::DropMidStream => {
                        let chunk = r#"{"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Half"},"finish_reason":null}]}"#;
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: {chunk}\n\n"
                        );
                        let _ = stream.flush();
                        // Closed here: no finish, no usage, no [DONE].
                    }
                    Fault::NeverAnswers => held.push(stream),
                    Fault::Endless => {
                        let closed_tx = closed_tx.clone();
                        std::thread::spawn(move || {
                            let chunk = r#"{"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"more "},"finish_reason":null}]}"#;
                            let mut out = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                            );
                            // TCP backpressure paces the loop; a write fails once the client
                            // has closed the connection.
                            while out.is_ok() {
                                out = write!(stream, "data: {chunk}\n\n")
                                    .and_then(|()| stream.flush());
                            }
                            let _ = closed_tx.send(());
                        });
                    }
                }
            }
        });
        MisbehavingUpstream {
            addr,
            requests,
            closed,
            stop,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for MisbehavingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads one HTTP request (headers and a Content-Length body).
fn read_request(stream: &mut TcpStream) -> Option<()> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some(())
}

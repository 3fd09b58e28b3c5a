//! The coordinator's OpenAI HTTP frontend against slow and numerous clients, over real sockets
//! on 127.0.0.1 (RELIABILITY.md, finding 5): a client that sends its request headers a byte at
//! a time, or nothing, is cut off at `http_header_read_timeout`; at `http_max_connections` a
//! further connection is not served until one of the open ones closes.
//!
//! The coordinator runs without workers (its one decode worker's address answers nothing):
//! `/health` needs none, and its model is only a tokenizer, the engine tests' byte-level one, so
//! nothing is loaded or fetched.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::Proc;

/// `http_header_read_timeout` of the slow-client test.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a slow client waits for the server between two of its bytes.
const PACE: Duration = Duration::from_millis(200);
/// Longest a cut-off may take: the time-out plus a margin for a machine busy building.
const CUT_OFF_LIMIT: Duration = Duration::from_secs(10);
/// How long a connection past the cap is watched for a response that must not come.
const UNSERVED_FOR: Duration = Duration::from_secs(1);
/// Longest a response may take once it may come.
const SERVED_LIMIT: Duration = Duration::from_secs(10);

/// A model directory holding only a tokenizer, removed when dropped.
struct TokenizerDir(PathBuf);

impl TokenizerDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("baton-http-limits-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create model dir");
        std::fs::write(
            dir.join("tokenizer.json"),
            include_str!("../../engine/tests/data/tiny-byte-tokenizer.json"),
        )
        .expect("write tokenizer.json");
        Self(dir)
    }
}

impl Drop for TokenizerDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A coordinator with no live worker and `sets` (`--set` arguments); its HTTP address.
fn coordinator(model: &TokenizerDir, sets: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec![
        "coordinator",
        "--model",
        model.0.to_str().expect("utf-8 temp path"),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        // Nothing listens on the discard port.
        "--decode-worker",
        "127.0.0.1:9",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let proc = Proc::start(&args, 2);
    let http = proc.addrs[1];
    (proc, http)
}

/// Connects and sends `bytes` one at a time, each after the server said nothing for [`PACE`],
/// until the server closes the connection (EOF or reset, on a read or a write); how long after
/// connecting it did. Fails if the connection is still open after [`CUT_OFF_LIMIT`].
fn dribble(addr: SocketAddr, bytes: &[u8]) -> Duration {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(PACE)).expect("read timeout");
    let mut unsent = bytes.iter();
    let mut buf = [0u8; 1024];
    while start.elapsed() < CUT_OFF_LIMIT {
        if let Some(byte) = unsent.next()
            && stream.write_all(&[*byte]).is_err()
        {
            return start.elapsed();
        }
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            // Whatever the server says before it closes (an error status) does not matter.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return start.elapsed(),
        }
    }
    panic!(
        "a client sending {:?} slowly was still connected after {CUT_OFF_LIMIT:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// Sends `GET /health` on a kept-alive connection.
fn send_health(stream: &mut TcpStream, addr: SocketAddr) {
    write!(stream, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
}

/// Reads one response to `GET /health` (status line, headers, the 2-byte body "ok"), giving up
/// after `limit`; the bytes read, or the error that ended the wait (a time-out when nothing
/// came).
fn read_health(stream: &mut TcpStream, limit: Duration) -> std::io::Result<String> {
    stream.set_read_timeout(Some(limit))?;
    let deadline = Instant::now() + limit;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&response).ends_with("\r\n\r\nok") {
        if Instant::now() >= deadline {
            return Err(ErrorKind::TimedOut.into());
        }
        match stream.read(&mut buf)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => response.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[test]
fn slow_and_silent_clients_are_cut_off_at_the_header_read_timeout() {
    let model = TokenizerDir::new("slow");
    let (_coordinator, http) = coordinator(
        &model,
        &[&format!(
            "coordinator.http_header_read_timeout={}ms",
            HEADER_TIMEOUT.as_millis()
        )],
    );
    assert_eq!(
        common::get(http, "/health").expect("GET /health"),
        (200, "ok".into())
    );

    let cases: [(&str, &[u8]); 3] = [
        // Slowloris: a request line and headers that never end (63 bytes, 12.6 s at the pace).
        (
            "HTTP/1.1 headers a byte at a time",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaa",
        ),
        // Connected, silent: the server cannot yet tell HTTP/1 from HTTP/2.
        ("nothing", b""),
        // The HTTP/2 preface a byte at a time (24 bytes, 4.8 s): still telling them apart.
        (
            "the HTTP/2 preface a byte at a time",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let after = dribble(http, bytes);
        assert!(
            after >= HEADER_TIMEOUT.saturating_sub(Duration::from_millis(100)),
            "a client sending {what} was cut off after {after:?}, before the {HEADER_TIMEOUT:?} \
             time-out"
        );
        eprintln!("a client sending {what} was cut off after {after:?}");
    }

    // Requests keep being served, the slow clients gone or not.
    assert_eq!(
        common::get(http, "/health").expect("GET /health after the slow clients"),
        (200, "ok".into())
    );
}

#[test]
fn past_max_connections_a_connection_waits_until_one_closes() {
    let model = TokenizerDir::new("cap");
    // A header time-out far past the test, so that idle kept-alive connections hold their slots.
    let (_coordinator, http) = coordinator(
        &model,
        &[
            "coordinator.http_max_connections=2",
            "coordinator.http_header_read_timeout=120s",
        ],
    );
    let connect = || {
        let stream = TcpStream::connect_timeout(&http, Duration::from_secs(5)).expect("connect");
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("write timeout");
        stream
    };

    // Two connections, each served once and kept open: the cap.
    let mut first = connect();
    let mut second = connect();
    for stream in [&mut first, &mut second] {
        send_health(stream, http);
        let response = read_health(stream, SERVED_LIMIT).expect("served under the cap");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    // A third: the kernel completes its handshake (the listen backlog), nobody serves it.
    let mut third = connect();
    send_health(&mut third, http);
    match read_health(&mut third, UNSERVED_FOR) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a third connection past a cap of 2 got {other:?}"),
    }

    // One of the two closes: the third is served.
    drop(first);
    let response = read_health(&mut third, SERVED_LIMIT).expect("served once a slot freed");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The second still is, on its open connection.
    send_health(&mut second, http);
    let response = read_health(&mut second, SERVED_LIMIT).expect("second connection served");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // Operators see it: the cap was reached at least once.
    drop((second, third));
    let (status, metrics) = common::get(http, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{metrics}");
    let reached: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("baton_http_connection_cap_reached_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cap counter in /metrics:\n{metrics}"));
    assert!(reached >= 1.0, "cap reached {reached} times");
}

//! What the process-level tests share: `baton` child processes that announce their listeners,
//! a whole `baton up` cluster and its printed endpoints, the development model's path, gRPC
//! channels and a one-shot HTTP GET.

#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod lan;
pub mod misbehaving;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// Loading the model in a fresh process, with the machine busy compiling or testing.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// A `baton` child process, killed when dropped. Its stderr still reaches the test's output,
/// and is also kept for assertions.
pub struct Proc {
    pub child: Child,
    /// The addresses of its `listening` lines, in order.
    pub addrs: Vec<SocketAddr>,
    /// Its stderr lines so far, and a signal for each new one.
    stderr: Arc<(Mutex<Vec<String>>, std::sync::Condvar)>,
}

impl Proc {
    /// Starts `baton <args>` and waits for `announced` listening lines.
    pub fn start(args: &[&str], announced: usize) -> Proc {
        Self::start_with(&[], args, announced)
    }

    /// Starts `<prefix> baton <args>` (`prefix` runs it elsewhere: `ip netns exec NS`, which
    /// execs, so the child is baton itself) and waits for `announced` listening lines.
    pub fn start_with(prefix: &[String], args: &[&str], announced: usize) -> Proc {
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_baton"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_baton")),
        };
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let kept = Arc::new((Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let sink = kept.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("{line}");
                sink.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                sink.1.notify_all();
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some((_, a)) = line
                    .strip_prefix("listening ")
                    .and_then(|r| r.split_once('='))
                {
                    let _ = tx.send(a.parse::<SocketAddr>().expect("announced address"));
                }
            }
        });
        let addrs = (0..announced)
            .map(|_| {
                rx.recv_timeout(START_LIMIT)
                    .expect("process announced its address")
            })
            .collect();
        Proc {
            child,
            addrs,
            stderr: kept,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on a pid this test spawned; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Waits for the process to exit; a watchdog kills it after `limit`, which fails the test.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("pid");
        let (done, exited) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let overdue = exited.recv_timeout(limit).is_err();
            if overdue {
                // SAFETY: kill(2) on a pid this test spawned; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            overdue
        });
        let status = self.child.wait().expect("wait");
        let _ = done.send(());
        let overdue = watchdog.join().expect("watchdog");
        assert!(!overdue, "process {pid} still running after {limit:?}");
        status
    }

    /// Its stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (blocking, at most `limit`) until a stderr line satisfies `matches`; whether one
    /// did. Woken by each new line, never polling.
    pub fn wait_stderr(&self, limit: Duration, matches: impl Fn(&str) -> bool) -> bool {
        let (lines, new_line) = &*self.stderr;
        let guard = lines.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = new_line
            .wait_timeout_while(guard, limit, |lines| !lines.iter().any(|l| matches(l)))
            .unwrap_or_else(|p| p.into_inner());
        guard.iter().any(|l| matches(l))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The development model (BATON_MODEL, else fetched by scripts/fetch-model.sh).
pub fn model() -> String {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return p.to_string_lossy().into_owned();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fetch-model.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("fetch model");
    assert!(out.status.success(), "fetch-model.sh failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `baton <role>` (prefill or decode) on a port the OS chooses, with a 128 MiB KV pool, no
/// metrics listener and `extra` flags; started once it announced its gRPC address.
pub fn worker(role: &str, model: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        role,
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--kv-cache-mib",
        "128",
        "--no-metrics",
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, 1)
}

/// A worker's `Info`, once its model is loaded (within [`START_LIMIT`]).
pub async fn worker_info(role: &str, addr: SocketAddr) -> baton_proto::v1::WorkerInfo {
    use baton_proto::v1::{
        InfoRequest, decode_worker_client::DecodeWorkerClient,
        prefill_worker_client::PrefillWorkerClient,
    };
    let info = async {
        match role {
            "prefill" => {
                PrefillWorkerClient::new(channel(addr))
                    .info(InfoRequest {})
                    .await
            }
            _ => {
                DecodeWorkerClient::new(channel(addr))
                    .info(InfoRequest {})
                    .await
            }
        }
    };
    tokio::time::timeout(START_LIMIT, info)
        .await
        .unwrap_or_else(|_| panic!("{role} worker up within {START_LIMIT:?}"))
        .expect("info")
        .into_inner()
}

/// A coordinator over static worker lists (or none, with discovery flags in `extra`), listening
/// on 127.0.0.1 at ports the OS chooses (`addrs`: gRPC, HTTP), with `extra` flags.
pub fn coordinator(
    model: &str,
    prefill: &[SocketAddr],
    decode: &[SocketAddr],
    extra: &[&str],
) -> Proc {
    let workers: Vec<(&str, String)> = prefill
        .iter()
        .map(|a| ("--prefill-worker", a.to_string()))
        .chain(decode.iter().map(|a| ("--decode-worker", a.to_string())))
        .collect();
    let mut args = vec![
        "coordinator",
        "--model",
        model,
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ];
    for (flag, addr) in &workers {
        args.extend([*flag, addr.as_str()]);
    }
    args.extend_from_slice(extra);
    Proc::start(&args, 2)
}

/// A greedy request for the token ids `ids`, forced disaggregated.
pub fn forced(ids: Vec<u32>, max_tokens: u32) -> baton_proto::v1::GenerateRequest {
    use baton_proto::v1;
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds { ids })),
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        pd_mode: v1::PdMode::Force as i32,
        ..Default::default()
    }
}

/// Reads a Generate stream to its end: the tokens it carried and its finish.
pub async fn to_finish(
    stream: &mut tonic::Streaming<baton_proto::v1::GenerateResponse>,
) -> (Vec<u32>, baton_proto::v1::GenerateFinish) {
    let (mut tokens, mut finish) = (Vec::new(), None);
    while let Some(m) = stream.message().await.expect("stream") {
        tokens.extend(&m.token_ids);
        finish = m.finish.or(finish);
    }
    (tokens, finish.expect("the stream ended with a finish"))
}

pub fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

/// One HTTP/1.1 GET; the status code and body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A POST's status, headers (lower-case names) and body.
pub type Posted = (u16, Vec<(String, String)>, String);

/// One HTTP/1.1 POST of a JSON body; the status code, the headers (lower-case names) and the
/// body (de-chunked: an SSE stream comes back whole, once the server closes it).
pub fn post(addr: SocketAddr, path: &str, body: &str, limit: Duration) -> std::io::Result<Posted> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest.as_bytes())
    } else {
        rest.to_string()
    };
    Ok((status, headers, body))
}

fn dechunk(mut rest: &[u8]) -> String {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]).trim().to_string();
        let Ok(n) = usize::from_str_radix(&size, 16) else {
            break;
        };
        let tail = &rest[eol + 2..];
        if n == 0 || tail.len() < n {
            break;
        }
        out.extend_from_slice(&tail[..n]);
        rest = tail[n..].strip_prefix(b"\r\n").unwrap_or(&tail[n..]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starting three processes that each load the model (`baton up` allows 120 s per process).
pub const START_BOUND: Duration = Duration::from_secs(400);
/// SIGTERM to exit: `baton up` gives its children 10 s before it kills them.
pub const STOP_BOUND: Duration = Duration::from_secs(30);

/// `baton up` and everything it printed (its children's logs included), line by line.
pub struct Cluster {
    up: Option<Child>,
    pid: i32,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Cluster {
    /// `baton up --http 127.0.0.1:0 --grpc 127.0.0.1:0 --kv-cache-mib 128 <extra>`.
    pub fn start(extra: &[&str]) -> Self {
        let mut up = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args([
                "up",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
                "--kv-cache-mib",
                "128",
            ])
            .args(extra)
            // Plain logs for the failure messages that quote them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton up");
        let pid = i32::try_from(up.id()).expect("pid fits i32");
        let (tx, lines) = mpsc::channel();
        let stdout = up.stdout.take().expect("piped stdout");
        let stderr = up.stderr.take().expect("piped stderr");
        forward_lines(stdout, tx.clone());
        forward_lines(stderr, tx);
        Cluster {
            up: Some(up),
            pid,
            lines,
            log: Vec::new(),
        }
    }

    /// The next line within `timeout`; `None` on timeout, panics when `baton up` closed its
    /// output (it exited).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.log.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                panic!("baton up exited early; its output:\n{}", self.log_text())
            }
        }
    }

    /// Reads until `baton up` has printed both endpoints: (HTTP, gRPC).
    pub fn endpoints(&mut self) -> (SocketAddr, SocketAddr) {
        let deadline = Instant::now() + START_BOUND;
        let (mut http, mut grpc) = (None, None);
        while http.is_none() || grpc.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next_line(left) else {
                panic!(
                    "baton up printed no endpoints within {START_BOUND:?}; its output:\n{}",
                    self.log_text()
                );
            };
            let line = line.trim_start();
            // "OpenAI HTTP  http://127.0.0.1:PORT/v1   (health ...)"
            if let Some(rest) = line.strip_prefix("OpenAI HTTP") {
                let url = rest.split_whitespace().next().unwrap_or_default();
                let addr = url
                    .strip_prefix("http://")
                    .and_then(|a| a.strip_suffix("/v1"))
                    .unwrap_or_default();
                http = Some(parse_addr(addr, line));
            }
            // "gRPC         127.0.0.1:PORT   (baton.v1.Inference, reflection on)"
            if let Some(rest) = line.strip_prefix("gRPC") {
                grpc = Some(parse_addr(
                    rest.split_whitespace().next().unwrap_or_default(),
                    line,
                ));
            }
        }
        (http.expect("set"), grpc.expect("set"))
    }

    /// Asserts that `GET /ready` answers 200: `baton up` prints its endpoints only once the
    /// coordinator reports ready, so there is nothing to wait for.
    pub fn wait_ready(&mut self, http: SocketAddr) {
        match get(http, "/ready") {
            Ok((200, _)) => {}
            other => panic!(
                "baton up printed its endpoints before GET /ready answered 200 ({other:?}); \
                 output:\n{}",
                self.log_text()
            ),
        }
    }

    /// Pids of the processes `baton up` started.
    pub fn children(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid)).expect("read /proc");
        for task in tasks {
            let path = task.expect("task entry").path().join("children");
            let children = std::fs::read_to_string(&path).expect("read children");
            pids.extend(
                children
                    .split_whitespace()
                    .map(|p| p.parse::<i32>().expect("pid")),
            );
        }
        pids
    }

    /// SIGTERM, then `baton up`'s exit status if it exits within `bound`.
    pub fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        let mut up = self.up.take()?;
        signal_pid(self.pid, libc::SIGTERM);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(up.wait());
        });
        match rx.recv_timeout(bound) {
            Ok(status) => Some(status.expect("wait for baton up")),
            Err(_) => {
                signal_pid(self.pid, libc::SIGKILL);
                let _ = rx.recv_timeout(bound);
                None
            }
        }
    }

    pub fn log_text(&mut self) -> String {
        self.log.extend(self.lines.try_iter());
        self.log.join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed assertion still stops the cluster; the workers die with `baton up`.
        self.terminate(STOP_BOUND);
    }
}

fn forward_lines(pipe: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

fn parse_addr(addr: &str, line: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("no address in {line:?}: {addr:?}: {e}"))
}

pub fn signal_pid(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test spawned; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `bound`: for a state another
/// process reaches on its own schedule (a raft commit, a closed reservation).
#[allow(dead_code)]
pub fn wait_for<T>(bound: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `baton certs --out OUT`: a development CA, a certificate per role, a cluster key and
/// `OUT/tls.toml` naming them.
#[allow(dead_code)]
pub fn certs(out: &std::path::Path) {
    let made = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["certs", "--out", out.to_str().expect("utf-8")])
        .output()
        .expect("baton certs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `baton <args> --json`, run to its end, its output parsed.
#[allow(dead_code)]
pub fn baton_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run baton");
    assert!(
        out.status.success(),
        "baton {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("baton --json")
}

/// Waits (on the grpc.health.v1 Watch stream, no polling) until `service` at `addr` reports
/// `wanted`, for at most [`START_LIMIT`].
#[allow(dead_code)]
pub async fn await_health(
    addr: SocketAddr,
    service: &str,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut watch = HealthClient::new(channel(addr))
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(START_LIMIT, async {
        while let Some(status) = watch.message().await.expect("health stream") {
            if status.status == wanted as i32 {
                return;
            }
        }
        panic!("health stream ended before {wanted:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("{service} at {addr} never reported {wanted:?}"));
}

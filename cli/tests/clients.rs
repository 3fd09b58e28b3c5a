//! Clients nobody at baton wrote, against a cluster `baton up` started: the official `openai`
//! Python package against the OpenAI HTTP frontend (tests/python/openai_client.py), and a
//! generic gRPC client that knows the API only through server reflection
//! (tests/python/grpc_reflection_client.py). Then SIGTERM must stop `baton up` and every process
//! it started.
//!
//! Needs python3 with tests/python/requirements.txt installed (`.ci/run` installs them); without
//! them the test fails and says so rather than skipping.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;

use common::get;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Starting three processes that each load the model (`baton up` allows 120 s per process).
const START_BOUND: Duration = Duration::from_secs(400);
/// From the endpoints being printed to `/ready` answering 200.
const READY_BOUND: Duration = Duration::from_secs(60);
/// SIGTERM to exit: `baton up` gives its children 10 s before it kills them.
const STOP_BOUND: Duration = Duration::from_secs(30);
/// Longest wait for the cluster's next log line between two `/ready` calls.
const READY_PACE: Duration = Duration::from_millis(200);

const PIP_HINT: &str = "run `python3 -m pip install -r tests/python/requirements.txt` \
                        (CI's .ci/run installs them)";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// `baton up` and everything it printed (its children's logs included), line by line.
struct Cluster {
    up: Option<Child>,
    pid: i32,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Cluster {
    fn start() -> Self {
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
    fn next_line(&mut self, timeout: Duration) -> Option<String> {
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
    fn endpoints(&mut self) -> (SocketAddr, SocketAddr) {
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

    /// Calls `GET /ready` until it answers 200. Between calls it waits for the cluster's next
    /// log line (readiness follows a worker poll), at most [`READY_PACE`].
    fn wait_ready(&mut self, http: SocketAddr) {
        let deadline = Instant::now() + READY_BOUND;
        let mut last = String::new();
        while Instant::now() < deadline {
            match get(http, "/ready") {
                Ok((200, _)) => return,
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = e.to_string(),
            }
            self.next_line(READY_PACE);
        }
        panic!(
            "GET /ready did not answer 200 within {READY_BOUND:?} (last: {last}); output:\n{}",
            self.log_text()
        );
    }

    /// Pids of the processes `baton up` started.
    fn children(&self) -> Vec<i32> {
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
    fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        let mut up = self.up.take()?;
        signal(self.pid, libc::SIGTERM);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(up.wait());
        });
        match rx.recv_timeout(bound) {
            Ok(status) => Some(status.expect("wait for baton up")),
            Err(_) => {
                signal(self.pid, libc::SIGKILL);
                let _ = rx.recv_timeout(bound);
                None
            }
        }
    }

    fn log_text(&mut self) -> String {
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

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test spawned; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn python(args: &[&str]) -> std::io::Result<Output> {
    Command::new("python3")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails, naming the fix, when python3 or the client packages are missing.
fn require_python_clients() {
    let output = python(&[
        "-c",
        "import openai, grpc, grpc_reflection, google.protobuf",
    ])
    .unwrap_or_else(|e| {
        panic!("python3 is needed to run the client tests ({e}): install Python 3, then {PIP_HINT}")
    });
    assert!(
        output.status.success(),
        "the Python client packages are missing; {PIP_HINT}\n{}",
        describe(&output)
    );
}

fn run_script(cluster: &mut Cluster, script: &str, arg: &str) {
    let path = repo_root().join("tests/python").join(script);
    let output = python(&[path.to_str().expect("utf-8 path"), arg])
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} {arg} failed: {}\n--- cluster output\n{}",
        describe(&output),
        cluster.log_text()
    );
    println!("{script}:\n{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn openai_sdk_and_reflection_grpc_client_drive_a_local_cluster() {
    require_python_clients();

    let mut cluster = Cluster::start();
    let (http, grpc) = cluster.endpoints();
    cluster.wait_ready(http);

    run_script(
        &mut cluster,
        "openai_client.py",
        &format!("http://{http}/v1"),
    );
    run_script(&mut cluster, "grpc_reflection_client.py", &grpc.to_string());

    let children = cluster.children();
    assert_eq!(
        children.len(),
        3,
        "baton up should run a prefill worker, a decode worker and the coordinator: {children:?}"
    );
    let status = cluster.terminate(STOP_BOUND);
    let log = cluster.log_text();
    let status = status.unwrap_or_else(|| {
        panic!("baton up did not exit within {STOP_BOUND:?} of SIGTERM; output:\n{log}")
    });
    assert!(
        status.success(),
        "baton up exited with {status} on SIGTERM; output:\n{log}"
    );
    let survivors: Vec<i32> = children
        .into_iter()
        .filter(|pid| still_baton(*pid))
        .collect();
    for pid in &survivors {
        signal(*pid, libc::SIGKILL);
    }
    assert!(
        survivors.is_empty(),
        "processes baton up started outlived it: {survivors:?}; output:\n{log}"
    );
}

/// Whether `pid` is still a live (not zombie) baton process; a reused pid running something
/// else does not count.
fn still_baton(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("baton")
}

//! What the process-level tests share: `baton` child processes that announce their listeners,
//! the development model's path, gRPC channels and a one-shot HTTP GET.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tonic::transport::Channel;

/// Loading the model in a fresh process, with the machine busy compiling or testing.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// A `baton` child process, killed when dropped. Its stderr still reaches the test's output,
/// and is also kept for assertions.
pub struct Proc {
    pub child: Child,
    /// The addresses of its `listening` lines, in order.
    pub addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `baton <args>` and waits for `announced` listening lines.
    pub fn start(args: &[&str], announced: usize) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let kept = Arc::new(Mutex::new(Vec::new()));
        let sink = kept.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("{line}");
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
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
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

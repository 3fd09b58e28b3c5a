//! A real etcd for tests: one single-member cluster per [`EtcdServer`], on loopback ports the
//! OS picked, with a data directory of its own that outlives a [`EtcdServer::kill`] (so a
//! [`EtcdServer::restart`] comes back with the same keys, leases and revisions) and goes with
//! the server's drop. [`EtcdServer::restart_out_of_reach`] serves that data on another port,
//! so a test can change it while the clients of [`EtcdServer::endpoint`] find etcd down.
//!
//! Readiness is etcd's own word (its "serving client traffic" log line), then a status call;
//! never a sleep. Without an `etcd` binary on PATH the tests fail and say how to get one.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

/// How long etcd may take to serve after its start (it elects itself within a second or two;
/// a loaded CI machine is slower).
const START_WAIT: Duration = Duration::from_secs(30);

/// Log lines kept for a failure's message.
const LOG_TAIL: usize = 40;

/// Fresh ports are picked this many times when etcd finds one taken between our pick and its
/// bind.
const PORT_TRIES: usize = 3;

pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// What etcd's stderr said.
enum Started {
    Serving,
    Exited,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers a status call.
    pub async fn start() -> Self {
        let mut last = None;
        for _ in 0..PORT_TRIES {
            let (client_port, peer_port) = free_ports();
            let mut server = Self {
                child: None,
                client_port,
                peer_port,
                data_dir: fresh_data_dir(),
                log: Arc::default(),
            };
            match server.launch(client_port).await {
                Ok(()) => return server,
                Err(e) if server.log_says("address already in use") => last = Some(e),
                Err(e) => panic!("{e:#}"),
            }
        }
        panic!("etcd found its ports taken {PORT_TRIES} times: {last:?}");
    }

    /// The client URL, for [`baton_discovery::EtcdConfig::endpoints`].
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A plain client, to write keys the way a foreign writer would.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("etcd client")
    }

    /// SIGKILL, as a crash: no goodbye to clients, the data directory left as it was.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch(self.client_port).await {
            panic!("restarting etcd: {e:#}");
        }
    }

    /// Starts etcd again on its data directory but another client port, and returns that
    /// port's URL: the clients of [`Self::endpoint`] see an etcd that is down, while the test
    /// changes what they will find when it is back ([`Self::restart`]).
    pub async fn restart_out_of_reach(&mut self) -> String {
        self.kill();
        let (port, _) = free_ports();
        if let Err(e) = self.launch(port).await {
            panic!("restarting etcd out of reach: {e:#}");
        }
        format!("http://127.0.0.1:{port}")
    }

    async fn launch(&mut self, client_port: u16) -> Result<()> {
        self.log.lock().expect("log").clear();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .arg("--name=baton-test")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=baton-test={peer_url}"))
            .arg("--logger=zap")
            // The readiness line is logged at info.
            .arg("--log-level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // ETCD_* variables of the caller's environment would configure this etcd too.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the etcd tests need an `etcd` binary on PATH: run scripts/test.sh, which \
                 installs Debian's etcd-server, or `apt-get install etcd-server`"
            ),
            Err(e) => return Err(e).context("spawning etcd"),
        };
        let stderr = child.stderr.take().context("etcd's stderr")?;
        self.child = Some(child);

        let (tx, mut rx) = mpsc::channel(2);
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let serving = line.contains("serving client traffic")
                    || line.contains("ready to serve client requests");
                {
                    let mut log = log.lock().expect("log");
                    if log.len() == LOG_TAIL {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
                if serving && !told {
                    told = true;
                    let _ = tx.blocking_send(Started::Serving);
                }
            }
            let _ = tx.blocking_send(Started::Exited);
        });

        match tokio::time::timeout(START_WAIT, rx.recv()).await {
            Ok(Some(Started::Serving)) => {}
            Ok(Some(Started::Exited) | None) => {
                self.kill();
                bail!("etcd exited before serving:\n{}", self.log_tail());
            }
            Err(_) => {
                self.kill();
                bail!(
                    "etcd did not serve within {START_WAIT:?}:\n{}",
                    self.log_tail()
                );
            }
        }
        let mut client = etcd_client::Client::connect([client_url], None).await?;
        match tokio::time::timeout(START_WAIT, client.status()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => bail!("etcd's status call failed: {e}\n{}", self.log_tail()),
            Err(_) => bail!("etcd's status call did not answer:\n{}", self.log_tail()),
        }
    }

    fn log_says(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|line| line.contains(needle))
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Two distinct free loopback ports, released for etcd to bind (a collision in between is
/// retried by [`EtcdServer::start`]).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local address").port();
    (port(&a), port(&b))
}

fn fresh_data_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "baton-etcd-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

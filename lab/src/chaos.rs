//! `baton-lab chaos`: faults injected into a cluster of real `baton` processes, each scenario
//! checked against what the cluster promises (README "Operating it"; docs/architecture.md
//! "Streams that outlive their decode worker", "Supervision in `baton up`").
//!
//! ```text
//! kill-decode-{push,pull}   prefill-0 + decode-0 + decode-1; N streams (half gRPC, half HTTP),
//!                           first undisturbed, then again with the busier decode worker
//!                           SIGKILLed once every stream has tokens
//!                           --> completed / migrated / failed, outputs = undisturbed, 0 blocks leaked
//! kill-prefill-{push,pull}  prefill-0 + prefill-1 + decode-0; 480-token prompts; SIGKILL the
//!                           prefill worker that is computing (push) or holds a pull lease (pull)
//!                           --> placed again (baton_requests_replaced_total) or UNAVAILABLE, 0 leaked
//! stop-prefill-{push,pull}  the same, SIGSTOP instead, held past the lease, then SIGCONT
//!                           --> every request ends within lease + margin while it is stopped
//! restart-coordinator       SIGKILL the coordinator under load, start it on the same ports
//!                           --> workers stay up, retrying clients reconnect, no lease left
//! flood                     1,000 streaming clients at once against max_inflight
//!                           --> only 429 / RESOURCE_EXHAUSTED past admission, TTFT p99, RSS;
//!                           slow readers (RSS), slowloris (is a header read cut off?)
//! partition                 decode-1 on a host of its own (a network namespace, veth to this
//!                           one; needs root); its link goes down mid-stream, then up again
//!                           --> its streams move on (migrate) or fail within leave_after +
//!                           margin instead of stalling for the whole partition
//! ```
//!
//! Every wait has a deadline, so a hang shows as a failed check, never as a stuck run. Every
//! process is its own process group, killed when its [`Proc`] drops (and by the kernel when
//! this process dies: PR_SET_PDEATHSIG). Each scenario prints one line and writes
//! `<out>/<scenario>.json`; the children's logs go to `<out>/logs/<scenario>/`. The exit status
//! is 1 when any check failed. Judgements are pure functions, tested below.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_proto::v1::{
    self, LoadRequest, decode_worker_client::DecodeWorkerClient, inference_client::InferenceClient,
    prefill_worker_client::PrefillWorkerClient,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::cluster::Tail;

/// Longest a process may take from its start to its last `listening` line (loading the model
/// with the machine busy).
const START_LIMIT: Duration = Duration::from_secs(120);
/// Longest a coordinator may take to see its workers healthy.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// Longest one stream may take, start to finish; past it the client gives up and the stream
/// counts as hung.
const STREAM_LIMIT: Duration = Duration::from_secs(240);
/// Added to the lease when waiting for workers to free everything after a fault.
const SETTLE_MARGIN: Duration = Duration::from_secs(15);
/// A request must end this long after its prefill worker stopped, beyond the lease.
const STOP_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    KillDecodePush,
    KillDecodePull,
    KillPrefillPush,
    KillPrefillPull,
    StopPrefillPush,
    StopPrefillPull,
    RestartCoordinator,
    Flood,
    Partition,
}

impl Scenario {
    const ALL: [Scenario; 9] = [
        Scenario::KillDecodePush,
        Scenario::KillDecodePull,
        Scenario::KillPrefillPush,
        Scenario::KillPrefillPull,
        Scenario::StopPrefillPush,
        Scenario::StopPrefillPull,
        Scenario::RestartCoordinator,
        Scenario::Flood,
        Scenario::Partition,
    ];
    /// What `--short` runs: the CI subset.
    const SHORT: [Scenario; 2] = [Scenario::KillDecodePush, Scenario::KillPrefillPush];

    fn name(self) -> &'static str {
        match self {
            Scenario::KillDecodePush => "kill-decode-push",
            Scenario::KillDecodePull => "kill-decode-pull",
            Scenario::KillPrefillPush => "kill-prefill-push",
            Scenario::KillPrefillPull => "kill-prefill-pull",
            Scenario::StopPrefillPush => "stop-prefill-push",
            Scenario::StopPrefillPull => "stop-prefill-pull",
            Scenario::RestartCoordinator => "restart-coordinator",
            Scenario::Flood => "flood",
            Scenario::Partition => "partition",
        }
    }
}

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// The CI subset: kill-decode-push with 8 streams and kill-prefill-push, smaller prompts.
    #[arg(long)]
    short: bool,
    /// Scenarios to run, comma-separated (default: all, or the --short subset).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Folder for the results (`<scenario>.json`, `summary.txt`) and the children's logs.
    #[arg(long)]
    out: PathBuf,
    /// A .gguf file or a Hugging Face model directory (default: $BATON_MODEL, else the
    /// development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Streams of kill-decode (default 32; 8 with --short).
    #[arg(long)]
    streams: Option<usize>,
    /// Prompt length of every kill-decode stream (default: 48 to 83 tokens, differing by
    /// stream).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Tokens each kill-decode stream generates (greedy, EOS ignored).
    #[arg(long, default_value_t = 150)]
    tokens: u32,
    /// Concurrent clients of the flood.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// The flood coordinator's admission limit (coordinator.max_inflight).
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
    /// Handoff lease (coordinator.lease_ttl), milliseconds: the stop scenarios hold a prefill
    /// worker past it.
    #[arg(long, default_value_t = 2000)]
    lease_ttl_ms: u64,
    /// How long the partition scenario keeps decode-1's link down, seconds.
    #[arg(long, default_value_t = 20)]
    partition_s: u64,
    /// How long the slowloris connections keep trickling bytes, seconds.
    #[arg(long, default_value_t = 40)]
    slowloris_s: u64,
}

/// What a scenario found.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub scenario: &'static str,
    pub passed: bool,
    /// Not run here (what it needs is missing); `summary` says why.
    pub skipped: bool,
    pub seconds: f64,
    /// The result line's figures.
    pub summary: String,
    pub checks: Vec<Check>,
    pub figures: Value,
}

impl Outcome {
    /// A result of `scenario` before the runner judges it (`passed`, from its checks) and
    /// times it (`seconds`); the scenario fills in the rest.
    fn of(scenario: &'static str) -> Self {
        Self {
            scenario,
            passed: false,
            skipped: false,
            seconds: 0.0,
            summary: String::new(),
            checks: Vec::new(),
            figures: Value::Null,
        }
    }
}

/// One promise and whether the run kept it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn expect(&mut self, ok: bool, what: &str, detail: impl Into<String>) {
        self.0.push(Check {
            what: what.into(),
            ok,
            detail: detail.into(),
        });
    }
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let model = baton::model_path::resolve(args.model.clone())?;
    let exe = baton::up::baton_exe()?;
    raise_fd_limit();
    let scenarios: Vec<Scenario> = match (args.scenarios.is_empty(), args.short) {
        (false, _) => args.scenarios.clone(),
        (true, true) => Scenario::SHORT.to_vec(),
        (true, false) => Scenario::ALL.to_vec(),
    };
    std::fs::create_dir_all(args.out.join("logs"))
        .with_context(|| format!("create {}", args.out.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut summary = File::create(args.out.join("summary.txt"))?;
    let header = format!(
        "baton-lab chaos — {} ({} cores), {}\ncommand: {command}",
        model.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        today(),
    );
    println!("{header}");
    writeln!(summary, "{header}")?;
    let mut failed = Vec::new();
    for scenario in scenarios {
        let env = Env {
            exe: exe.clone(),
            model: model.clone(),
            logs: args.out.join("logs").join(scenario.name()),
            lease: Duration::from_millis(args.lease_ttl_ms),
        };
        std::fs::create_dir_all(&env.logs)?;
        let started = Instant::now();
        let result = rt.block_on(run_scenario(scenario, &env, &args));
        let mut outcome = result.unwrap_or_else(|e| Outcome {
            summary: format!("did not run to the end: {e:#}"),
            checks: vec![Check {
                what: "the scenario runs to the end".into(),
                ok: false,
                detail: format!("{e:#}"),
            }],
            ..Outcome::of(scenario.name())
        });
        outcome.seconds = started.elapsed().as_secs_f64();
        let panics = panics_in(&env.logs);
        outcome.checks.push(Check {
            what: "no process panicked".into(),
            ok: panics.is_empty(),
            detail: panics.join("; "),
        });
        outcome.passed = outcome.checks.iter().all(|c| c.ok);
        let line = result_line(&outcome);
        println!("{line}");
        writeln!(summary, "{line}")?;
        for c in outcome.checks.iter().filter(|c| !c.ok) {
            let why = format!("    FAILED {}: {}", c.what, c.detail);
            println!("{why}");
            writeln!(summary, "{why}")?;
        }
        std::fs::write(
            args.out.join(format!("{}.json", scenario.name())),
            serde_json::to_string_pretty(&outcome)?,
        )?;
        if !outcome.passed {
            failed.push(scenario.name());
        }
    }
    if !failed.is_empty() {
        // One line, not an error report with a backtrace: the lines above say what failed.
        eprintln!(
            "baton-lab chaos: failed: {} (results and logs in {})",
            failed.join(", "),
            args.out.display()
        );
        std::process::exit(1);
    }
    Ok(())
}

async fn run_scenario(s: Scenario, env: &Env, args: &ChaosArgs) -> anyhow::Result<Outcome> {
    let short = args.short;
    match s {
        Scenario::KillDecodePush | Scenario::KillDecodePull => {
            let streams = args.streams.unwrap_or(if short { 8 } else { 32 });
            let len = args.prompt_tokens;
            let ask = move |i: usize| len.unwrap_or(48 + (i % 8) * 5);
            kill_decode(env, s, shape_of(s), streams, &ask, args.tokens).await
        }
        Scenario::KillPrefillPush | Scenario::KillPrefillPull => {
            // Prompts of one chunk (prefill_chunk_tokens, 512) or less: a longer prompt's cached
            // prefix does not reproduce a fresh prefill's KV (see RELIABILITY.md), and the
            // outputs are compared with a run that starts from the cache.
            let (requests, len) = if short { (4, 480) } else { (6, 480) };
            kill_prefill(env, s, shape_of(s), requests, len).await
        }
        Scenario::StopPrefillPush | Scenario::StopPrefillPull => {
            stop_prefill(env, s, shape_of(s)).await
        }
        Scenario::RestartCoordinator => restart_coordinator(env).await,
        Scenario::Flood => flood(env, args).await,
        Scenario::Partition => partition(env, args).await,
    }
}

fn shape_of(s: Scenario) -> &'static str {
    match s {
        Scenario::KillDecodePull | Scenario::KillPrefillPull | Scenario::StopPrefillPull => "pull",
        _ => "push",
    }
}

fn today() -> String {
    Command::new("date")
        .arg("+%F")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// 1,000 clients and a coordinator holding as many sockets need more than a default soft limit
/// of 1024 descriptors; children inherit the raised one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Where a scenario's processes come from and write to.
struct Env {
    exe: PathBuf,
    model: PathBuf,
    logs: PathBuf,
    lease: Duration,
}

/// A `baton` child in a process group of its own, SIGKILLed (the group) when dropped. Its
/// stdout and stderr go to `<logs>/<name>.log`.
struct Proc {
    name: String,
    child: Child,
    /// Its `listening` addresses, in order (a coordinator: gRPC, then HTTP).
    addrs: Vec<SocketAddr>,
    args: Vec<String>,
    killed: bool,
}

impl Proc {
    fn start(env: &Env, name: &str, args: &[String], announced: usize) -> anyhow::Result<Proc> {
        Self::start_with(env, &[], name, args, announced)
    }

    /// [`Proc::start`] under `prefix` (`ip netns exec NS`, which execs, so the child is baton
    /// itself and keeps its process group).
    fn start_with(
        env: &Env,
        prefix: &[String],
        name: &str,
        args: &[String],
        announced: usize,
    ) -> anyhow::Result<Proc> {
        let log_path = env.logs.join(format!("{name}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&env.exe);
                c
            }
            None => Command::new(&env.exe),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        // SAFETY: setpgid and prctl between fork and exec are system calls on the child alone.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = std_mpsc::channel();
        let mut log = log;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line
                    .strip_prefix("listening ")
                    .and_then(|r| r.split_once('='))
                    .and_then(|(_, a)| a.parse::<SocketAddr>().ok())
                {
                    Some(addr) => {
                        let _ = tx.send(addr);
                    }
                    None => {
                        let _ = writeln!(log, "{line}");
                    }
                }
            }
        });
        let mut proc = Proc {
            name: name.into(),
            child,
            addrs: Vec::new(),
            args: args.to_vec(),
            killed: false,
        };
        let deadline = Instant::now() + START_LIMIT;
        while proc.addrs.len() < announced {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(a) => proc.addrs.push(a),
                Err(_) => bail!(
                    "{name} did not announce {announced} listeners within {START_LIMIT:?}; see {}",
                    log_path.display()
                ),
            }
        }
        Ok(proc)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the process group of a child this process started.
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        self.killed = true;
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Still running (not exited, not reaped).
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die of anything but SIGKILL; SIGKILL is enough.
        self.kill();
    }
}

fn worker(env: &Env, role: &str, name: &str, kv_cache_mib: u32) -> anyhow::Result<Proc> {
    worker_on(env, &[], "127.0.0.1", role, name, kv_cache_mib)
}

/// A worker whose gRPC and KV listeners bind `host`, started under `prefix`.
fn worker_on(
    env: &Env,
    prefix: &[String],
    host: &str,
    role: &str,
    name: &str,
    kv_cache_mib: u32,
) -> anyhow::Result<Proc> {
    let mut args: Vec<String> = [
        role,
        "--model",
        &env.model.display().to_string(),
        "--listen",
        &format!("{host}:0"),
        "--kv-listen",
        &format!("{host}:0"),
        "--worker-id",
        name,
        "--kv-cache-mib",
        &kv_cache_mib.to_string(),
        "--no-metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !host.starts_with("127.") {
        // A test namespace's address on this machine: the scenario measures failure handling,
        // not security, so the worker serves it without certificates (and warns).
        args.extend(["--set".into(), format!("{role}.insecure_remote=true")]);
    }
    Proc::start_with(env, prefix, name, &args, 1)
}

/// A coordinator over the workers on port 0 (or `ports`: gRPC, HTTP, to start one again).
fn coordinator(
    env: &Env,
    name: &str,
    prefill: &[&Proc],
    decode: &[&Proc],
    shape: &str,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let mut args: Vec<String> = [
        "coordinator",
        "--model",
        &env.model.display().to_string(),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--handoff",
        shape,
        "--lease-ttl-ms",
        &env.lease.as_millis().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in prefill {
        args.extend(["--prefill-worker".into(), p.addrs[0].to_string()]);
    }
    for d in decode {
        args.extend(["--decode-worker".into(), d.addrs[0].to_string()]);
    }
    args.extend(extra.iter().cloned());
    Proc::start(env, name, &args, 2)
}

/// `args` with the coordinator's listeners set to `grpc` and `http`: the same process again.
fn same_ports(args: &[String], grpc: SocketAddr, http: SocketAddr) -> Vec<String> {
    let mut out = args.to_vec();
    for i in 0..out.len().saturating_sub(1) {
        match out[i].as_str() {
            "--grpc" => out[i + 1] = grpc.to_string(),
            "--http" => out[i + 1] = http.to_string(),
            _ => {}
        }
    }
    out
}

/// `panicked at` lines in the scenario's logs, with the file they are in.
fn panics_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked at")) {
            found.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                line.trim()
            ));
        }
    }
    found
}

fn grpc_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Until the coordinator reports `workers` workers, all healthy.
async fn wait_ready(grpc: SocketAddr, workers: usize) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(grpc_channel(grpc)?);
    let started = Instant::now();
    loop {
        let status = tokio::time::timeout(
            Duration::from_secs(2),
            client.cluster_status(v1::ClusterStatusRequest {}),
        )
        .await;
        if let Ok(Ok(status)) = status {
            let s = status.into_inner();
            if s.workers.len() == workers && s.workers.iter().all(|w| w.healthy) {
                return Ok(());
            }
        }
        if started.elapsed() > READY_LIMIT {
            bail!(
                "the coordinator did not see its {workers} workers healthy within {READY_LIMIT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Workers' load, and what they still hold

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Prefill,
    Decode,
}

/// A worker's load report, or none when it did not answer within 2 s.
async fn load(role: Role, addr: SocketAddr) -> Option<v1::LoadReport> {
    let channel = grpc_channel(addr).ok()?;
    let call = async {
        match role {
            Role::Prefill => PrefillWorkerClient::new(channel)
                .load(LoadRequest::default())
                .await
                .map(|r| r.into_inner()),
            Role::Decode => DecodeWorkerClient::new(channel)
                .load(LoadRequest::default())
                .await
                .map(|r| r.into_inner()),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .ok()?
        .ok()
}

/// What a worker still held when the wait for it to settle ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Held {
    pub worker: String,
    pub running: u32,
    pub waiting: u32,
    pub leases: u32,
    /// Blocks not free: pinned by a stream, reservation or lease (cached blocks are free).
    pub blocks: u32,
    pub total_blocks: u32,
    /// It did not answer its load call.
    pub silent: bool,
}

impl Held {
    fn of(worker: &str, l: Option<&v1::LoadReport>) -> Held {
        match l {
            Some(l) => Held {
                worker: worker.into(),
                running: l.running,
                waiting: l.waiting,
                leases: l.leases,
                blocks: l.total_blocks.saturating_sub(l.free_blocks),
                total_blocks: l.total_blocks,
                silent: false,
            },
            None => Held {
                worker: worker.into(),
                running: 0,
                waiting: 0,
                leases: 0,
                blocks: 0,
                total_blocks: 0,
                silent: true,
            },
        }
    }

    /// Holds nothing for any request: no stream, no lease, every block free.
    pub fn settled(&self) -> bool {
        !self.silent
            && self.running == 0
            && self.waiting == 0
            && self.leases == 0
            && self.blocks == 0
    }
}

/// Waits up to `limit` for every worker to hold nothing; what each held at the end.
async fn settle(workers: &[(&str, Role, SocketAddr)], limit: Duration) -> Vec<Held> {
    let started = Instant::now();
    loop {
        let mut held = Vec::new();
        for &(name, role, addr) in workers {
            held.push(Held::of(name, load(role, addr).await.as_ref()));
        }
        if held.iter().all(Held::settled) || started.elapsed() > limit {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One line for what the workers held: `0 leaked` or what each held.
fn held_line(held: &[Held]) -> String {
    let bad: Vec<String> = held
        .iter()
        .filter(|h| !h.settled())
        .map(|h| {
            if h.silent {
                format!("{}: no load answer", h.worker)
            } else {
                format!(
                    "{}: {} blocks, {} leases, {} running, {} waiting",
                    h.worker, h.blocks, h.leases, h.running, h.waiting
                )
            }
        })
        .collect();
    if bad.is_empty() {
        format!(
            "0 blocks leaked on {}",
            held.iter()
                .map(|h| h.worker.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!("held after the wait: {}", bad.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// How a request ended, seen by its client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stream {
    pub frontend: &'static str,
    /// Token ids (gRPC only).
    pub tokens: Vec<u32>,
    pub text: String,
    /// Messages (gRPC) or SSE chunks (HTTP) that carried tokens.
    pub chunks: usize,
    pub completion_tokens: u32,
    /// Seconds from the request to its first token.
    pub ttft_s: Option<f64>,
    /// Seconds from the request to its end.
    pub e2e_s: f64,
    pub finish: Option<Finish>,
    pub error: Option<Failure>,
    #[serde(skip)]
    pub started: Option<Instant>,
    #[serde(skip)]
    pub ended: Option<Instant>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Finish {
    pub mode: String,
    pub prefill_worker: String,
    pub decode_worker: String,
    pub migrated_from: Vec<String>,
}

/// Error classes as the two frontends show them (coordinator/src/error.rs maps them once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// HTTP 429, RESOURCE_EXHAUSTED.
    Overloaded,
    /// HTTP 503, UNAVAILABLE.
    Unavailable,
    /// HTTP 504, DEADLINE_EXCEEDED.
    Deadline,
    /// The client's own limit ran out: the request hung.
    Hung,
    /// The connection broke or was refused (a coordinator gone).
    Transport,
    Other,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub class: Class,
    /// `HTTP 429` or the gRPC code's name.
    pub code: String,
    pub message: String,
}

impl Stream {
    fn ok(&self) -> bool {
        self.error.is_none() && self.finish.is_some()
    }

    fn failed(&mut self, class: Class, code: impl Into<String>, message: impl Into<String>) {
        self.error.get_or_insert(Failure {
            class,
            code: code.into(),
            message: message.into(),
        });
    }

    /// A message or chunk with tokens arrived.
    fn chunk(&mut self) {
        self.chunks += 1;
        if self.ttft_s.is_none() {
            self.ttft_s = self.started.map(|s| s.elapsed().as_secs_f64());
        }
    }

    fn end(mut self) -> Self {
        let now = Instant::now();
        self.e2e_s = self.started.map_or(0.0, |s| (now - s).as_secs_f64());
        self.ended = Some(now);
        self
    }
}

/// Reports `(stream index, tokens so far)` to whoever waits for streams to get going.
type Progress = Option<(usize, mpsc::UnboundedSender<(usize, usize)>)>;

fn class_of_code(code: tonic::Code) -> Class {
    match code {
        tonic::Code::ResourceExhausted => Class::Overloaded,
        tonic::Code::Unavailable => Class::Unavailable,
        tonic::Code::DeadlineExceeded => Class::Deadline,
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => Class::Transport,
        _ => Class::Other,
    }
}

/// What a request asks for, for either frontend.
#[derive(Debug, Clone)]
struct Ask {
    prompt: Vec<u32>,
    max_tokens: u32,
    pd_mode: v1::PdMode,
    /// HTTP only: per-token log-probabilities (bigger events, for the slow readers).
    logprobs: bool,
}

impl Ask {
    fn grpc(&self) -> v1::GenerateRequest {
        v1::GenerateRequest {
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: self.prompt.clone(),
            })),
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(self.max_tokens),
                ignore_eos: true,
                ..Default::default()
            }),
            pd_mode: self.pd_mode as i32,
            ..Default::default()
        }
    }

    fn http_body(&self) -> String {
        let mut body = json!({
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
            "pd_mode": match self.pd_mode {
                v1::PdMode::Force => "force",
                v1::PdMode::Off => "off",
                _ => "auto",
            },
        });
        if self.logprobs {
            body["logprobs"] = json!(5);
        }
        body.to_string()
    }
}

/// One Generate stream through the coordinator's gRPC frontend, on a connection of its own.
async fn grpc_stream(addr: SocketAddr, ask: &Ask, progress: Progress, limit: Duration) -> Stream {
    let mut s = Stream {
        frontend: "grpc",
        started: Some(Instant::now()),
        ..Default::default()
    };
    let run = async {
        let mut client = InferenceClient::new(grpc_channel(addr)?);
        let mut stream = client.generate(ask.grpc()).await?.into_inner();
        while let Some(m) = stream.message().await? {
            s.tokens.extend(&m.token_ids);
            s.text.push_str(&m.text);
            if !m.token_ids.is_empty() {
                s.chunk();
            }
            if let Some((i, p)) = &progress {
                let _ = p.send((*i, s.chunks));
            }
            if let Some(f) = m.finish {
                let p = f.placement.unwrap_or_default();
                s.completion_tokens = f.usage.map_or(0, |u| u.completion_tokens);
                s.finish = Some(Finish {
                    mode: p.mode,
                    prefill_worker: p.prefill_worker,
                    decode_worker: p.decode_worker,
                    migrated_from: p.migrated_from,
                });
                return Ok(());
            }
        }
        Err(anyhow::Error::new(tonic::Status::internal(
            "the stream ended without a finish",
        )))
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => match e.downcast_ref::<tonic::Status>() {
            Some(status) => s.failed(
                class_of_code(status.code()),
                format!("{:?}", status.code()),
                status.message(),
            ),
            None => s.failed(Class::Transport, "transport", format!("{e:#}")),
        },
        Err(_) => s.failed(
            Class::Hung,
            "client limit",
            format!("no end within {limit:?}"),
        ),
    }
    s.end()
}

fn class_of_http(status: u16, kind: &str) -> Class {
    match (status, kind) {
        (429, _) | (_, "rate_limit_exceeded") => Class::Overloaded,
        (503, _) | (_, "service_unavailable") => Class::Unavailable,
        (504, _) | (_, "timeout") => Class::Deadline,
        _ => Class::Other,
    }
}

/// Undoes HTTP/1.1 chunked transfer coding, bytes in as they arrive.
#[derive(Debug, Default)]
pub struct Dechunk {
    buf: Vec<u8>,
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    Crlf,
    Done,
}

impl Dechunk {
    /// Appends the payload bytes `data` completes to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(eol) = self.buf[at..].windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = String::from_utf8_lossy(&self.buf[at..at + eol]).to_string();
                    let hex = line.split(';').next().unwrap_or("").trim();
                    at += eol + 2;
                    self.state = match usize::from_str_radix(hex, 16) {
                        Ok(0) | Err(_) => ChunkState::Done,
                        Ok(n) => ChunkState::Data(n),
                    };
                }
                ChunkState::Data(n) => {
                    let take = n.min(self.buf.len() - at);
                    out.extend_from_slice(&self.buf[at..at + take]);
                    at += take;
                    if take < n {
                        self.state = ChunkState::Data(n - take);
                        break;
                    }
                    self.state = ChunkState::Crlf;
                }
                ChunkState::Crlf => {
                    if self.buf.len() - at < 2 {
                        break;
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => {
                    at = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..at);
    }
}

/// Splits server-sent events out of a byte stream: each complete event's `data` payload.
#[derive(Debug, Default)]
pub struct SseEvents {
    buf: String,
}

impl SseEvents {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut events = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let event: String = self.buf.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// The status line's code and the head's headers (lower-case names).
fn parse_head(head: &str) -> Option<(u16, Vec<(String, String)>)> {
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers))
}

/// Applies one SSE `data` payload of a completions stream to `s`; true at `[DONE]`.
fn apply_event(s: &mut Stream, data: &str) -> bool {
    if data == "[DONE]" {
        return true;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        s.failed(
            Class::Other,
            "bad event",
            data.chars().take(200).collect::<String>(),
        );
        return true;
    };
    if let Some(e) = v.get("error") {
        let kind = e["type"].as_str().unwrap_or("");
        s.failed(
            class_of_http(200, kind),
            format!("HTTP 200, {kind}"),
            e["message"].as_str().unwrap_or(""),
        );
        return false;
    }
    if let Some(text) = v["choices"][0]["text"].as_str() {
        s.text.push_str(text);
        s.chunk();
    }
    if let Some(b) = v.get("baton").filter(|b| b.is_object()) {
        let str_of = |k: &str| b[k].as_str().unwrap_or("").to_string();
        s.finish = Some(Finish {
            mode: str_of("mode"),
            prefill_worker: str_of("prefill_worker"),
            decode_worker: str_of("decode_worker"),
            migrated_from: b["migrated_from"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|w| w.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
        s.completion_tokens = n as u32;
    }
    false
}

/// How an HTTP client treats its connection.
#[derive(Debug, Clone, Copy, Default)]
struct HttpClient {
    /// SO_RCVBUF before connecting (a small window: a slow reader's bytes stay on the server).
    rcvbuf: Option<u32>,
    /// Read nothing for this long once the request is sent.
    stall: Option<Duration>,
}

/// One streaming `/v1/completions` request on a connection of its own (HTTP carries text, not
/// token ids).
async fn http_stream(
    addr: SocketAddr,
    ask: &Ask,
    progress: Progress,
    limit: Duration,
    how: HttpClient,
) -> Stream {
    let mut s = Stream {
        frontend: "http",
        started: Some(Instant::now()),
        ..Default::default()
    };
    let run = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if let Some(n) = how.rcvbuf {
            socket.set_recv_buffer_size(n)?;
        }
        let mut conn = socket.connect(addr).await?;
        conn.set_nodelay(true)?;
        let body = ask.http_body();
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await?;
        if let Some(stall) = how.stall {
            tokio::time::sleep(stall).await;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut head = Vec::new();
        let rest = loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("the connection closed before a response");
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break head.split_off(end + 4);
            }
        };
        let head = String::from_utf8_lossy(&head).to_string();
        let (status, headers) = parse_head(&head).context("not an HTTP response")?;
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let mut dechunk = Dechunk::default();
        let mut payload = Vec::new();
        let mut feed = |bytes: &[u8], payload: &mut Vec<u8>| {
            if chunked {
                dechunk.push(bytes, payload);
            } else {
                payload.extend_from_slice(bytes);
            }
        };
        feed(&rest, &mut payload);
        if status != 200 {
            loop {
                let n = conn.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                feed(&buf[..n], &mut payload);
            }
            let body: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            let kind = body["error"]["type"].as_str().unwrap_or("");
            s.failed(
                class_of_http(status, kind),
                format!("HTTP {status}"),
                body["error"]["message"].as_str().unwrap_or(""),
            );
            return Ok(());
        }
        let mut sse = SseEvents::default();
        loop {
            for data in sse.push(&payload) {
                if apply_event(&mut s, &data) {
                    return Ok(());
                }
                if let Some((i, p)) = &progress {
                    let _ = p.send((*i, s.chunks));
                }
            }
            payload.clear();
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("the connection closed before [DONE]");
            }
            feed(&buf[..n], &mut payload);
        }
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => s.failed(Class::Transport, "transport", format!("{e:#}")),
        Err(_) => s.failed(
            Class::Hung,
            "client limit",
            format!("no end within {limit:?}"),
        ),
    }
    if s.error.is_none() && s.finish.is_none() {
        s.failed(Class::Other, "no finish", "[DONE] without a finish chunk");
    }
    s.end()
}

/// One HTTP/1.1 GET's body (`/metrics`).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let run = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").context("not HTTP")?;
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut out = Vec::new();
            Dechunk::default().push(body.as_bytes(), &mut out);
            return Ok(String::from_utf8_lossy(&out).to_string());
        }
        Ok::<_, anyhow::Error>(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .context("GET timed out")?
}

/// The sum of a metric's samples whose line contains `labels`.
fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `n` distinct prompts of token ids (a fixed pseudo-random walk over ordinary vocabulary),
/// `len(i)` tokens each.
fn prompts(n: usize, seed: u64, len: impl Fn(usize) -> usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let mut x = seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64 + 1);
            (0..len(i))
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    // Ids 300..10300: past the special and byte tokens of a 49k vocabulary.
                    300 + ((x >> 33) % 10_000) as u32
                })
                .collect()
        })
        .collect()
}

/// Runs every ask at once, even ones on gRPC and odd ones on HTTP.
async fn run_all(
    coord: &Proc,
    asks: &[Ask],
    progress: Option<mpsc::UnboundedSender<(usize, usize)>>,
) -> Vec<tokio::task::JoinHandle<Stream>> {
    let (grpc, http) = (coord.addrs[0], coord.addrs[1]);
    asks.iter()
        .enumerate()
        .map(|(i, ask)| {
            let ask = ask.clone();
            let p = progress.clone().map(|p| (i, p));
            tokio::spawn(async move {
                if i.is_multiple_of(2) {
                    grpc_stream(grpc, &ask, p, STREAM_LIMIT).await
                } else {
                    http_stream(http, &ask, p, STREAM_LIMIT, HttpClient::default()).await
                }
            })
        })
        .collect()
}

async fn join_all(calls: Vec<tokio::task::JoinHandle<Stream>>) -> Vec<Stream> {
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap_or_else(|e| {
            let mut s = Stream::default();
            s.failed(Class::Other, "task", e.to_string());
            s
        }));
    }
    out
}

/// The same output: token ids over gRPC, text over HTTP.
fn same_output(a: &Stream, b: &Stream) -> bool {
    if a.frontend == "grpc" {
        a.tokens == b.tokens
    } else {
        a.text == b.text
    }
}

/// Failures counted by class and code, for the result line and the JSON.
fn failures(streams: &[Stream]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in streams {
        if let Some(f) = &s.error {
            *out.entry(format!("{:?} ({})", f.class, f.code))
                .or_default() += 1;
        }
    }
    out
}

fn failure_line(f: &BTreeMap<String, usize>) -> String {
    if f.is_empty() {
        return "none".into();
    }
    f.iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A few distinct failure messages, for the JSON.
fn failure_messages(streams: &[Stream]) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for f in streams.iter().filter_map(|s| s.error.as_ref()) {
        let m: String = f.message.chars().take(300).collect();
        *seen.entry(format!("{}: {m}", f.code)).or_default() += 1;
    }
    seen.into_iter()
        .take(12)
        .map(|(m, n)| format!("{n}x {m}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// kill-decode: a decode worker SIGKILLed mid-stream

/// What a stream run under a fault came to, against its undisturbed run.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub streams: usize,
    pub completed: usize,
    pub migrated: usize,
    pub failed: usize,
    pub equal: usize,
}

/// Completed (a finish with every token asked for), migrated (a finish naming `killed` in
/// `migrated_from`), failed, equal to the undisturbed stream of the same index.
pub fn tally(disturbed: &[Stream], undisturbed: &[Stream], tokens: u32, killed: &str) -> Tally {
    let mut t = Tally {
        streams: disturbed.len(),
        ..Tally::default()
    };
    for (i, s) in disturbed.iter().enumerate() {
        match &s.finish {
            Some(f) if s.error.is_none() => {
                if s.completion_tokens == tokens {
                    t.completed += 1;
                }
                if f.migrated_from.iter().any(|w| w == killed) {
                    t.migrated += 1;
                }
            }
            _ => t.failed += 1,
        }
        if s.ok()
            && undisturbed
                .get(i)
                .is_some_and(|u| u.ok() && same_output(s, u))
        {
            t.equal += 1;
        }
    }
    t
}

async fn kill_decode(
    env: &Env,
    scenario: Scenario,
    shape: &str,
    streams: usize,
    prompt_len: &dyn Fn(usize) -> usize,
    tokens: u32,
) -> anyhow::Result<Outcome> {
    let prefill = worker(env, "prefill", "prefill-0", 512)?;
    let d0 = worker(env, "decode", "decode-0", 512)?;
    let d1 = worker(env, "decode", "decode-1", 512)?;
    let coord = coordinator(env, "coordinator", &[&prefill], &[&d0, &d1], shape, &[])?;
    wait_ready(coord.addrs[0], 3).await?;
    let mut decoders = [d0, d1];
    let asks: Vec<Ask> = prompts(streams, 1, prompt_len)
        .into_iter()
        .map(|prompt| Ask {
            prompt,
            max_tokens: tokens,
            pd_mode: v1::PdMode::Force,
            logprobs: false,
        })
        .collect();

    let undisturbed = join_all(run_all(&coord, &asks, None).await).await;
    let reference_ok = undisturbed.iter().filter(|s| s.ok()).count();

    // Again; the busier decode worker dies once every stream has a few tokens.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let calls = run_all(&coord, &asks, Some(tx)).await;
    let mut seen = vec![0usize; streams];
    let wait_started = Instant::now();
    while seen.iter().any(|&n| n < 4) && wait_started.elapsed() < Duration::from_secs(120) {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some((i, n))) => seen[i] = n,
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let mut running = [0u32; 2];
    for (k, d) in decoders.iter().enumerate() {
        running[k] = load(Role::Decode, d.addrs[0])
            .await
            .map_or(0, |l| l.running);
    }
    let victim = usize::from(running[1] >= running[0]);
    let killed = decoders[victim].name.clone();
    let streams_on_victim = running[victim];
    let kill_at = Instant::now();
    decoders[victim].kill();
    drop(rx);
    let disturbed = join_all(calls).await;
    let last_end = disturbed
        .iter()
        .filter_map(|s| s.ended)
        .max()
        .map_or(0.0, |e| (e - kill_at).as_secs_f64());
    let survivor = &decoders[1 - victim];
    let held = settle(
        &[
            ("prefill-0", Role::Prefill, prefill.addrs[0]),
            (&survivor.name, Role::Decode, survivor.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;
    let page = http_get(coord.addrs[1], "/metrics")
        .await
        .unwrap_or_default();
    let resumed = metric(
        &page,
        "baton_stream_migrations_total",
        "outcome=\"resumed\"",
    );
    let t = tally(&disturbed, &undisturbed, tokens, &killed);

    let mut checks = Checks::default();
    checks.expect(
        reference_ok == streams,
        "the undisturbed run completes",
        format!(
            "{reference_ok} of {streams}: {}",
            failure_line(&failures(&undisturbed))
        ),
    );
    checks.expect(
        streams_on_victim > 0 && t.migrated > 0,
        "the kill hit running streams",
        format!(
            "{streams_on_victim} streams on {killed} at the kill, {} migrated",
            t.migrated
        ),
    );
    checks.expect(
        t.completed == streams && t.failed == 0,
        "every stream completes",
        format!(
            "{} completed, {} failed: {}",
            t.completed,
            t.failed,
            failure_line(&failures(&disturbed))
        ),
    );
    checks.expect(
        t.equal == streams,
        "outputs equal the undisturbed run's",
        format!("{} of {streams} equal", t.equal),
    );
    checks.expect(
        resumed as usize == t.migrated,
        "every migration is counted (baton_stream_migrations_total{outcome=resumed})",
        format!("metric {resumed}, streams {}", t.migrated),
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no block leaked",
        held_line(&held),
    );
    let mut others = vec![prefill];
    others.extend(decoders.into_iter().filter(|d| !d.killed));
    others.push(coord);
    check_alive(&mut checks, &mut others);

    Ok(Outcome {
        summary: format!(
            "{streams} streams x {tokens} tokens ({shape}), {killed} SIGKILLed with {streams_on_victim} on it: \
             {} completed, {} migrated, {} failed; {}/{streams} equal undisturbed; last stream ended {last_end:.1} s after the kill; {}",
            t.completed,
            t.migrated,
            t.failed,
            t.equal,
            held_line(&held)
        ),
        checks: checks.0,
        figures: json!({
            "shape": shape, "streams": streams, "tokens": tokens, "killed": killed,
            "streams_on_killed": streams_on_victim, "tally": t,
            "last_end_after_kill_s": last_end, "migrations_resumed_metric": resumed,
            "held": held, "failures": failure_messages(&disturbed),
            "undisturbed": undisturbed, "disturbed": disturbed,
        }),
        ..Outcome::of(scenario.name())
    })
}

/// Every process the scenario did not kill on purpose is still running.
fn check_alive(checks: &mut Checks, procs: &mut [Proc]) {
    let dead: Vec<String> = procs
        .iter_mut()
        .filter_map(|p| (!p.killed && !p.alive()).then(|| format!("{} (pid {})", p.name, p.pid())))
        .collect();
    checks.expect(
        dead.is_empty(),
        "every process not killed on purpose is still running",
        if dead.is_empty() {
            String::new()
        } else {
            format!("exited: {}", dead.join(", "))
        },
    );
}

// ---------------------------------------------------------------------------------------------
// kill-prefill and stop-prefill: a prefill worker dies, or hangs, mid-handoff

/// Which prefill worker to strike, and when: the first seen computing (push), or holding a
/// pull lease (pull). `loads[k]` is worker k's report.
pub fn pick_victim(shape: &str, loads: &[Option<v1::LoadReport>]) -> Option<usize> {
    loads.iter().position(|l| {
        l.as_ref().is_some_and(|l| match shape {
            "pull" => l.leases > 0,
            _ => l.running > 0,
        })
    })
}

/// Polls both prefill workers until one is in the state [`pick_victim`] wants, or `limit`.
async fn await_victim(shape: &str, prefill: &[Proc], limit: Duration) -> Option<(usize, String)> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let mut loads = Vec::new();
        for p in prefill {
            loads.push(load(Role::Prefill, p.addrs[0]).await);
        }
        if let Some(k) = pick_victim(shape, &loads) {
            let l = loads[k].clone().unwrap_or_default();
            return Some((
                k,
                format!(
                    "running {} waiting {} leases {}",
                    l.running, l.waiting, l.leases
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn long_asks(n: usize, seed: u64, len: usize, max_tokens: u32) -> Vec<Ask> {
    prompts(n, seed, |_| len)
        .into_iter()
        .map(|prompt| Ask {
            prompt,
            max_tokens,
            pd_mode: v1::PdMode::Force,
            logprobs: false,
        })
        .collect()
}

async fn kill_prefill(
    env: &Env,
    scenario: Scenario,
    shape: &str,
    requests: usize,
    len: usize,
) -> anyhow::Result<Outcome> {
    let mut prefill = vec![
        worker(env, "prefill", "prefill-0", 512)?,
        worker(env, "prefill", "prefill-1", 512)?,
    ];
    let decode = worker(env, "decode", "decode-0", 512)?;
    let coord = coordinator(
        env,
        "coordinator",
        &[&prefill[0], &prefill[1]],
        &[&decode],
        shape,
        &[],
    )?;
    wait_ready(coord.addrs[0], 3).await?;
    let asks = long_asks(requests, 2, len, 16);
    let calls = run_all(&coord, &asks, None).await;
    let victim = await_victim(shape, &prefill, Duration::from_secs(60)).await;
    let Some((k, state)) = victim else {
        bail!(
            "no prefill worker was seen {} within 60 s",
            if shape == "pull" {
                "holding a pull lease"
            } else {
                "computing"
            }
        );
    };
    let killed = prefill[k].name.clone();
    let kill_at = Instant::now();
    prefill[k].kill();
    let disturbed = join_all(calls).await;
    let last_end = disturbed
        .iter()
        .filter_map(|s| s.ended)
        .max()
        .map_or(0.0, |e| (e - kill_at).as_secs_f64());
    let survivor = &prefill[1 - k];
    // The reference: the same prompts again, now on the survivors (whose prefix cache holds them).
    let reference = join_all(run_all(&coord, &asks, None).await).await;
    let held = settle(
        &[
            (&survivor.name, Role::Prefill, survivor.addrs[0]),
            ("decode-0", Role::Decode, decode.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;
    let page = http_get(coord.addrs[1], "/metrics")
        .await
        .unwrap_or_default();
    let replaced = metric(&page, "baton_requests_replaced_total", "");
    let migrations = metric(
        &page,
        "baton_stream_migrations_total",
        "outcome=\"resumed\"",
    );
    let completed = disturbed.iter().filter(|s| s.ok()).count();
    let equal = disturbed
        .iter()
        .zip(&reference)
        .filter(|(d, r)| d.ok() && r.ok() && same_output(d, r))
        .count();
    let on_victim = disturbed
        .iter()
        .filter(|s| {
            s.finish
                .as_ref()
                .is_some_and(|f| f.prefill_worker == killed)
        })
        .count();
    let f = failures(&disturbed);
    let unclear: usize = disturbed
        .iter()
        .filter(|s| {
            s.error
                .as_ref()
                .is_some_and(|e| e.class != Class::Unavailable)
        })
        .count();

    let mut checks = Checks::default();
    checks.expect(
        unclear == 0,
        "every request completes or fails UNAVAILABLE, none hangs",
        format!("{completed} completed; failures: {}", failure_line(&f)),
    );
    // Push: the killed worker was computing, so its requests had no first token yet and are
    // placed again. Pull: the one whose read it was serving had its first token; that one
    // migrates or fails UNAVAILABLE (checked above), and only the others are placed again.
    let handled = replaced + migrations + (requests - completed) as f64;
    checks.expect(
        if shape == "pull" {
            handled >= 1.0
        } else {
            replaced >= 1.0
        },
        "the killed worker's requests are placed again",
        format!("baton_requests_replaced_total {replaced}, baton_stream_migrations_total{{resumed}} {migrations}"),
    );
    checks.expect(
        equal == completed,
        "completed outputs equal a run on the survivors",
        format!("{equal} of {completed} equal"),
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no block leaked",
        held_line(&held),
    );
    let mut others = prefill;
    others.push(decode);
    others.push(coord);
    check_alive(&mut checks, &mut others);
    Ok(Outcome {
        summary: format!(
            "{requests} requests of {len} tokens ({shape}), {killed} SIGKILLed while {state}: {completed} completed \
             ({on_victim} finished on it before), failed: {}; replaced {replaced}, migrated {migrations}; \
             last ended {last_end:.1} s after the kill; {equal}/{completed} equal a run on the survivors; {}",
            failure_line(&f),
            held_line(&held)
        ),
        checks: checks.0,
        figures: json!({
            "shape": shape, "requests": requests, "prompt_tokens": len, "killed": killed,
            "state_at_kill": state, "completed": completed, "failures": f,
            "failure_messages": failure_messages(&disturbed),
            "replaced_metric": replaced, "migrations_resumed_metric": migrations,
            "last_end_after_kill_s": last_end, "equal": equal, "held": held,
            "disturbed": disturbed, "reference": reference,
        }),
        ..Outcome::of(scenario.name())
    })
}

/// When each request ended, against the moment its prefill worker stopped.
#[derive(Debug, Clone, Serialize)]
pub struct Ending {
    /// Sent before the stop (in flight), or while the worker was stopped.
    pub sent_before_stop: bool,
    /// Seconds from the stop to the end (negative: ended before it).
    pub after_stop_s: f64,
    pub ok: bool,
    pub class: Option<Class>,
    pub prefill_worker: String,
}

/// Endings past `bound` after the stop: requests that waited on the stopped worker.
pub fn late(endings: &[Ending], bound: Duration) -> usize {
    endings
        .iter()
        .filter(|e| e.after_stop_s > bound.as_secs_f64())
        .count()
}

async fn stop_prefill(env: &Env, scenario: Scenario, shape: &str) -> anyhow::Result<Outcome> {
    let prefill = vec![
        worker(env, "prefill", "prefill-0", 512)?,
        worker(env, "prefill", "prefill-1", 512)?,
    ];
    let decode = worker(env, "decode", "decode-0", 512)?;
    let coord = coordinator(
        env,
        "coordinator",
        &[&prefill[0], &prefill[1]],
        &[&decode],
        shape,
        &[],
    )?;
    wait_ready(coord.addrs[0], 3).await?;
    let bound = env.lease + STOP_MARGIN;
    let hold = bound + Duration::from_secs(5);
    let before = long_asks(4, 3, 480, 8);
    let calls = run_all(&coord, &before, None).await;
    let Some((k, state)) = await_victim(shape, &prefill, Duration::from_secs(60)).await else {
        bail!(
            "no prefill worker was seen {} within 60 s",
            if shape == "pull" {
                "holding a pull lease"
            } else {
                "computing"
            }
        );
    };
    let stopped = prefill[k].name.clone();
    prefill[k].signal(libc::SIGSTOP);
    let stop_at = Instant::now();
    // New requests while it hangs: they should go to the other prefill worker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = long_asks(4, 4, 256, 8);
    let calls_during = run_all(&coord, &during, None).await;
    let all: Vec<_> = calls.into_iter().chain(calls_during).collect();
    let waiting = tokio::spawn(join_all(all));
    tokio::time::sleep(hold).await;
    prefill[k].signal(libc::SIGCONT);
    let cont_at = Instant::now();
    let streams = waiting.await.unwrap_or_default();
    let endings: Vec<Ending> = streams
        .iter()
        .enumerate()
        .map(|(i, s)| Ending {
            sent_before_stop: i < before.len(),
            after_stop_s: s.ended.map_or(f64::INFINITY, |e| {
                if e >= stop_at {
                    (e - stop_at).as_secs_f64()
                } else {
                    -(stop_at - e).as_secs_f64()
                }
            }),
            ok: s.ok(),
            class: s.error.as_ref().map(|e| e.class),
            prefill_worker: s
                .finish
                .as_ref()
                .map(|f| f.prefill_worker.clone())
                .unwrap_or_default(),
        })
        .collect();
    let late_n = late(&endings, bound);
    let after_cont = streams
        .iter()
        .filter(|s| s.ended.is_some_and(|e| e > cont_at))
        .count();
    let completed = streams.iter().filter(|s| s.ok()).count();
    let f = failures(&streams);
    let unclear = streams
        .iter()
        .filter(|s| {
            s.error
                .as_ref()
                .is_some_and(|e| e.class != Class::Unavailable)
        })
        .count();
    let held = settle(
        &[
            ("prefill-0", Role::Prefill, prefill[0].addrs[0]),
            ("prefill-1", Role::Prefill, prefill[1].addrs[0]),
            ("decode-0", Role::Decode, decode.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;
    let worst = endings
        .iter()
        .map(|e| e.after_stop_s)
        .fold(f64::NEG_INFINITY, f64::max);

    let mut checks = Checks::default();
    checks.expect(
        late_n == 0,
        "every request ends within lease + margin of the stop",
        format!(
            "{late_n} of {} ended past {:.0} s ({} only after SIGCONT at {:.0} s); latest {worst:.1} s after the stop",
            streams.len(),
            bound.as_secs_f64(),
            after_cont,
            hold.as_secs_f64()
        ),
    );
    checks.expect(
        unclear == 0,
        "failures are UNAVAILABLE",
        format!("failures: {}", failure_line(&f)),
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no block leaked (after SIGCONT)",
        held_line(&held),
    );
    let mut others = prefill;
    others.push(decode);
    others.push(coord);
    check_alive(&mut checks, &mut others);
    Ok(Outcome {
        summary: format!(
            "{} requests ({shape}; 4 in flight, 4 sent during the stop), {stopped} SIGSTOPped while {state} for {:.0} s \
             (lease {:.0} s): {completed} completed, failed: {}; {late_n} ended past lease + {:.0} s, {after_cont} only after SIGCONT; \
             latest {worst:.1} s after the stop; {}",
            streams.len(),
            hold.as_secs_f64(),
            env.lease.as_secs_f64(),
            failure_line(&f),
            STOP_MARGIN.as_secs_f64(),
            held_line(&held)
        ),
        checks: checks.0,
        figures: json!({
            "shape": shape, "stopped": stopped, "state_at_stop": state,
            "lease_s": env.lease.as_secs_f64(), "bound_s": bound.as_secs_f64(), "held_stopped_s": hold.as_secs_f64(),
            "endings": endings, "late": late_n, "ended_after_sigcont": after_cont,
            "failures": f, "failure_messages": failure_messages(&streams), "held": held,
            "streams": streams,
        }),
        ..Outcome::of(scenario.name())
    })
}

// ---------------------------------------------------------------------------------------------
// restart-coordinator

/// One client's requests, in order, with when each ended.
#[derive(Debug, Clone, Default, Serialize)]
struct ClientLog {
    frontend: &'static str,
    results: Vec<Stream>,
}

/// Requests back to back until `stop`; after a failure, waits 250 ms and tries again. Each
/// success is reported to `done` as (client, when it started).
async fn retrying_client(
    index: usize,
    coord: (SocketAddr, SocketAddr),
    ask: Ask,
    done: mpsc::UnboundedSender<(usize, Instant)>,
    mut stop: watch::Receiver<bool>,
) -> ClientLog {
    let mut log = ClientLog {
        frontend: if index.is_multiple_of(2) {
            "grpc"
        } else {
            "http"
        },
        results: Vec::new(),
    };
    while !*stop.borrow() {
        let s = if index.is_multiple_of(2) {
            grpc_stream(coord.0, &ask, None, Duration::from_secs(60)).await
        } else {
            http_stream(
                coord.1,
                &ask,
                None,
                Duration::from_secs(60),
                HttpClient::default(),
            )
            .await
        };
        let ok = s.ok();
        if let (true, Some(started)) = (ok, s.started) {
            let _ = done.send((index, started));
        }
        log.results.push(s);
        if !ok {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
        }
    }
    log
}

async fn restart_coordinator(env: &Env) -> anyhow::Result<Outcome> {
    const CLIENTS: usize = 6;
    let prefill = worker(env, "prefill", "prefill-0", 512)?;
    let decode = worker(env, "decode", "decode-0", 512)?;
    let mut coord = coordinator(env, "coordinator", &[&prefill], &[&decode], "pull", &[])?;
    let (grpc, http) = (coord.addrs[0], coord.addrs[1]);
    wait_ready(grpc, 2).await?;
    let pids = (prefill.pid(), decode.pid());
    let asks: Vec<Ask> = prompts(CLIENTS, 5, |_| 64)
        .into_iter()
        .map(|prompt| Ask {
            prompt,
            max_tokens: 32,
            pd_mode: v1::PdMode::Force,
            logprobs: false,
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let clients: Vec<_> = asks
        .iter()
        .enumerate()
        .map(|(i, a)| {
            tokio::spawn(retrying_client(
                i,
                (grpc, http),
                a.clone(),
                done_tx.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    drop(done_tx);
    // Load first: each client has finished a request (and so has another running).
    let mut warm = [false; CLIENTS];
    let warm_by = tokio::time::Instant::now() + Duration::from_secs(60);
    while warm.iter().any(|w| !w) {
        match tokio::time::timeout_at(warm_by, done.recv()).await {
            Ok(Some((i, _))) => warm[i] = true,
            Ok(None) | Err(_) => {
                anyhow::bail!("not every client finished a request within 60 s of the start")
            }
        }
    }
    let running_at_kill = tokio::time::timeout(
        Duration::from_secs(2),
        InferenceClient::new(grpc_channel(grpc)?).cluster_status(v1::ClusterStatusRequest {}),
    )
    .await
    .ok()
    .and_then(|r| r.ok())
    .map_or(0, |r| r.into_inner().running_requests);
    let kill_at = Instant::now();
    coord.kill();
    // `baton up` waits its backoff (0.5 s) before starting a child again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let args = same_ports(&coord.args[..], grpc, http);
    let again =
        tokio::task::block_in_place(|| Proc::start(env, "coordinator-restarted", &args, 2))?;
    let listening_s = kill_at.elapsed().as_secs_f64();
    wait_ready(grpc, 2).await?;
    let ready_at = Instant::now();
    // Until every client got two requests through after the restart, or 90 s.
    let mut after = [0usize; CLIENTS];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while after.iter().any(|&n| n < 2) {
        match tokio::time::timeout_at(deadline, done.recv()).await {
            Ok(Some((i, started))) if started >= ready_at => after[i] += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    stop_tx.send_replace(true);
    let mut logs = Vec::new();
    for c in clients {
        logs.push(c.await.unwrap_or_default());
    }
    let held = settle(
        &[
            ("prefill-0", Role::Prefill, prefill.addrs[0]),
            ("decode-0", Role::Decode, decode.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;

    let ok_before = logs
        .iter()
        .flat_map(|l| &l.results)
        .filter(|s| s.ok() && s.ended.is_some_and(|e| e < kill_at))
        .count();
    let all: Vec<&Stream> = logs.iter().flat_map(|l| &l.results).collect();
    let broken = all
        .iter()
        .filter(|s| {
            !s.ok()
                && s.started.is_some_and(|st| st < kill_at)
                && s.ended.is_some_and(|e| e >= kill_at)
        })
        .count();
    let outage_errors = all
        .iter()
        .filter(|s| {
            !s.ok()
                && s.started.is_some_and(|st| st >= kill_at)
                && s.ended.is_some_and(|e| e < ready_at)
        })
        .count();
    let after_ready: Vec<&&Stream> = all
        .iter()
        .filter(|s| s.started.is_some_and(|st| st >= ready_at))
        .collect();
    let errors_after_ready = after_ready.iter().filter(|s| !s.ok()).count();
    let reconnected = logs
        .iter()
        .filter(|l| {
            l.results
                .iter()
                .any(|s| s.ok() && s.started.is_some_and(|st| st >= kill_at))
        })
        .count();
    let first_ok_after = all
        .iter()
        .filter(|s| s.ok() && s.started.is_some_and(|st| st >= kill_at))
        .filter_map(|s| s.ended)
        .min()
        .map(|e| (e - kill_at).as_secs_f64());
    // Greedy: each client's successful outputs are all the same.
    let consistent = logs.iter().all(|l| {
        let oks: Vec<&Stream> = l.results.iter().filter(|s| s.ok()).collect();
        oks.windows(2).all(|w| same_output(w[0], w[1]))
    });
    let failed_after: Vec<Stream> = after_ready
        .iter()
        .filter(|s| !s.ok())
        .map(|s| (**s).clone())
        .collect();

    let mut workers = vec![prefill, decode];
    let mut checks = Checks::default();
    checks.expect(
        workers.iter_mut().all(Proc::alive) && (workers[0].pid(), workers[1].pid()) == pids,
        "the workers stay up (same processes)",
        format!("prefill pid {}, decode pid {}", pids.0, pids.1),
    );
    checks.expect(
        ok_before > 0 && running_at_kill > 0,
        "the kill came under load",
        format!("{ok_before} requests done before, {running_at_kill} running at the kill"),
    );
    checks.expect(
        reconnected == CLIENTS,
        "every retrying client gets through again",
        format!("{reconnected} of {CLIENTS}"),
    );
    checks.expect(
        errors_after_ready == 0,
        "no failure once the new coordinator is ready",
        format!(
            "{errors_after_ready} of {}: {}",
            after_ready.len(),
            failure_line(&failures(&failed_after))
        ),
    );
    checks.expect(
        consistent,
        "every client's outputs are the same each time",
        "",
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no lease or block left on the workers",
        held_line(&held),
    );
    let mut others = vec![again];
    check_alive(&mut checks, &mut others);
    workers.extend(others);
    drop(workers);
    let ok_after = after_ready.iter().filter(|s| s.ok()).count();
    Ok(Outcome {
        summary: format!(
            "{CLIENTS} retrying clients (pull), coordinator SIGKILLed with {running_at_kill} running, started again on the same ports: \
             listening {listening_s:.1} s and ready {:.1} s after the kill; {broken} streams broken by the kill, {outage_errors} \
             refused during the outage; first success {} after the kill; {reconnected}/{CLIENTS} clients back; {ok_after} ok and \
             {errors_after_ready} failed after ready; workers stayed up; {}",
            (ready_at - kill_at).as_secs_f64(),
            first_ok_after.map_or("never".into(), |s| format!("{s:.1} s")),
            held_line(&held)
        ),
        checks: checks.0,
        figures: json!({
            "clients": CLIENTS, "running_at_kill": running_at_kill, "ok_before": ok_before,
            "listening_after_kill_s": listening_s, "ready_after_kill_s": (ready_at - kill_at).as_secs_f64(),
            "broken_by_kill": broken, "outage_errors": outage_errors,
            "first_ok_after_kill_s": first_ok_after, "reconnected": reconnected,
            "ok_after_ready": ok_after, "failed_after_ready": errors_after_ready, "held": held,
            "clients_log": logs,
        }),
        ..Outcome::of(Scenario::RestartCoordinator.name())
    })
}

// ---------------------------------------------------------------------------------------------
// flood: 1,000 clients, slow readers, slowloris

/// VmRSS of a process in KiB, from /proc.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples a process's RSS every 100 ms until dropped; the peak so far.
struct RssSampler {
    peak: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: i32) -> Self {
        let (tx, rx) = watch::channel(rss_kib(pid).unwrap_or(0));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Some(kib) = rss_kib(pid) {
                    tx.send_if_modified(|peak| {
                        let higher = kib > *peak;
                        *peak = (*peak).max(kib);
                        higher
                    });
                }
            }
        });
        Self { peak: rx, task }
    }

    fn peak_mib(&self) -> f64 {
        *self.peak.borrow() as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rss_mib(pid: i32) -> f64 {
    rss_kib(pid).unwrap_or(0) as f64 / 1024.0
}

/// How the flood's requests ended.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FloodTally {
    pub clients: usize,
    pub completed: usize,
    /// Refused with 429 / RESOURCE_EXHAUSTED.
    pub overloaded: usize,
    /// Any other ending: an error of another class, a hang, a stream cut short.
    pub other: usize,
    pub ttft: Tail,
}

pub fn flood_tally(streams: &[Stream]) -> FloodTally {
    let ttfts: Vec<f64> = streams
        .iter()
        .filter(|s| s.ok())
        .filter_map(|s| s.ttft_s)
        .collect();
    FloodTally {
        clients: streams.len(),
        completed: streams.iter().filter(|s| s.ok()).count(),
        overloaded: streams
            .iter()
            .filter(|s| {
                s.error
                    .as_ref()
                    .is_some_and(|e| e.class == Class::Overloaded)
            })
            .count(),
        other: streams
            .iter()
            .filter(|s| {
                s.error
                    .as_ref()
                    .is_some_and(|e| e.class != Class::Overloaded)
            })
            .count(),
        ttft: Tail::of_secs(&ttfts),
    }
}

/// One slowloris connection: the start of a request's headers, one byte a second, never
/// finished. When the server cut it off (seconds), or `None` if it held on for `hold`.
async fn slowloris(addr: SocketAddr, hold: Duration) -> anyhow::Result<Option<f64>> {
    let conn = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = conn.into_split();
    let started = Instant::now();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
    let mut bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < hold {
        tick.tick().await;
        if closed.is_finished() {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        let b = bytes.next().unwrap_or(b'a');
        if wr.write_all(&[b]).await.is_err() {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
    }
    closed.abort();
    Ok(None)
}

async fn flood(env: &Env, args: &ChaosArgs) -> anyhow::Result<Outcome> {
    const SLOW: usize = 8;
    const SLOWLORIS: usize = 8;
    let prefill = worker(env, "prefill", "prefill-0", 512)?;
    let decode = worker(env, "decode", "decode-0", 1024)?;
    let coord = coordinator(
        env,
        "coordinator",
        &[&prefill],
        &[&decode],
        "push",
        &["--max-inflight".into(), args.max_inflight.to_string()],
    )?;
    wait_ready(coord.addrs[0], 2).await?;
    let pid = coord.pid();
    let rss_idle = rss_mib(pid);

    // 1. Every client at once.
    let asks: Vec<Ask> = prompts(args.clients, 6, |i| 40 + i % 16)
        .into_iter()
        .map(|prompt| Ask {
            prompt,
            max_tokens: 8,
            pd_mode: v1::PdMode::Auto,
            logprobs: false,
        })
        .collect();
    let sampler = RssSampler::start(pid);
    let flood_started = Instant::now();
    let streams = join_all(run_all(&coord, &asks, None).await).await;
    let flood_s = flood_started.elapsed().as_secs_f64();
    let rss_peak = sampler.peak_mib();
    drop(sampler);
    let t = flood_tally(&streams);
    let held_flood = settle(
        &[
            ("prefill-0", Role::Prefill, prefill.addrs[0]),
            ("decode-0", Role::Decode, decode.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;
    let rss_after = rss_mib(pid);
    let page = http_get(coord.addrs[1], "/metrics")
        .await
        .unwrap_or_default();

    // 2. Slow readers (a 4 KiB receive window, nothing read for 20 s) and slowloris
    //    connections, side by side.
    let slow_ask = Ask {
        prompt: prompts(1, 7, |_| 40).remove(0),
        max_tokens: 300,
        pd_mode: v1::PdMode::Auto,
        logprobs: true,
    };
    let stall = Duration::from_secs(20);
    let rss_before_slow = rss_mib(pid);
    let sampler = RssSampler::start(pid);
    let http = coord.addrs[1];
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let ask = slow_ask.clone();
            tokio::spawn(async move {
                http_stream(
                    http,
                    &ask,
                    None,
                    STREAM_LIMIT,
                    HttpClient {
                        rcvbuf: Some(4096),
                        stall: Some(stall),
                    },
                )
                .await
            })
        })
        .collect();
    let hold = Duration::from_secs(args.slowloris_s);
    let loris: Vec<_> = (0..SLOWLORIS)
        .map(|_| tokio::spawn(slowloris(http, hold)))
        .collect();
    // While the readers stall: what the decode worker and the coordinator hold.
    tokio::time::sleep(stall / 2).await;
    let rss_mid_stall = rss_mib(pid);
    let decode_mid_stall = load(Role::Decode, decode.addrs[0]).await;
    tokio::time::sleep(stall / 2 - Duration::from_millis(200)).await;
    let rss_end_stall = rss_mib(pid);
    let slow = join_all(slow).await;
    let rss_slow_peak = sampler.peak_mib();
    drop(sampler);
    let mut cut = Vec::new();
    for l in loris {
        cut.push(match l.await {
            Ok(Ok(c)) => c,
            _ => Some(0.0),
        });
    }
    let held = settle(
        &[
            ("prefill-0", Role::Prefill, prefill.addrs[0]),
            ("decode-0", Role::Decode, decode.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;
    let rss_end = rss_mib(pid);
    let slow_ok = slow
        .iter()
        .filter(|s| s.ok() && s.completion_tokens == slow_ask.max_tokens)
        .count();
    let cut_off: Vec<f64> = cut.iter().flatten().copied().collect();

    let mut checks = Checks::default();
    checks.expect(
        t.other == 0,
        "past admission, only 429 / RESOURCE_EXHAUSTED",
        format!(
            "{} other endings: {}",
            t.other,
            failure_line(&failures(&streams))
        ),
    );
    checks.expect(
        t.completed > 0 && t.completed + t.overloaded == t.clients,
        "every admitted request completes",
        format!(
            "{} completed, {} refused of {}",
            t.completed, t.overloaded, t.clients
        ),
    );
    checks.expect(
        rss_peak - rss_idle < 512.0,
        "coordinator RSS bounded under the flood (< idle + 512 MiB)",
        format!("idle {rss_idle:.0} MiB, peak {rss_peak:.0} MiB, after {rss_after:.0} MiB"),
    );
    checks.expect(
        held_flood.iter().all(Held::settled),
        "no block leaked after the flood",
        held_line(&held_flood),
    );
    checks.expect(
        slow_ok == SLOW,
        "slow readers get their whole stream once they read",
        format!("{slow_ok} of {SLOW}: {}", failure_line(&failures(&slow))),
    );
    checks.expect(
        rss_slow_peak - rss_before_slow < 64.0,
        "slow readers do not grow coordinator memory (< 64 MiB over 8 stalled streams)",
        format!(
            "before {rss_before_slow:.1} MiB, mid-stall {rss_mid_stall:.1}, end of stall {rss_end_stall:.1}, peak {rss_slow_peak:.1}, after {rss_end:.1}"
        ),
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no block leaked after the slow clients",
        held_line(&held),
    );
    checks.expect(
        cut_off.len() == SLOWLORIS,
        "slowloris connections are cut off by a header-read time-out",
        format!(
            "{} of {SLOWLORIS} cut off within {} s{}",
            cut_off.len(),
            hold.as_secs(),
            if cut_off.is_empty() {
                String::new()
            } else {
                format!(
                    " (after {:.0} s)",
                    cut_off.iter().copied().fold(0.0, f64::max)
                )
            }
        ),
    );
    let mut others = vec![prefill, decode, coord];
    check_alive(&mut checks, &mut others);
    Ok(Outcome {
        summary: format!(
            "{} clients at once (half HTTP, half gRPC), max_inflight {}: {} completed, {} refused 429/RESOURCE_EXHAUSTED, {} other \
             in {flood_s:.1} s; TTFT of admitted p50 {:.0} ms p99 {:.0} ms; coordinator RSS idle {rss_idle:.0} MiB, peak \
             {rss_peak:.0}, after {rss_after:.0}; {SLOW} slow readers stalled {} s: RSS {rss_before_slow:.1} -> peak \
             {rss_slow_peak:.1} MiB, {slow_ok}/{SLOW} whole streams after; slowloris: {}/{SLOWLORIS} cut off within {} s",
            t.clients,
            args.max_inflight,
            t.completed,
            t.overloaded,
            t.other,
            t.ttft.p50_ms,
            t.ttft.p99_ms,
            stall.as_secs(),
            cut_off.len(),
            hold.as_secs(),
        ),
        checks: checks.0,
        figures: json!({
            "clients": t.clients, "max_inflight": args.max_inflight, "tally": t, "flood_s": flood_s,
            "failures": failures(&streams), "failure_messages": failure_messages(&streams),
            "overloaded_metric": metric(&page, "baton_requests_total", "outcome=\"overloaded\""),
            "rss_mib": {"idle": rss_idle, "flood_peak": rss_peak, "after_flood": rss_after,
                        "before_slow": rss_before_slow, "mid_stall": rss_mid_stall, "end_stall": rss_end_stall,
                        "slow_peak": rss_slow_peak, "after_slow": rss_end},
            "decode_mid_stall": decode_mid_stall.map(|l| json!({"running": l.running, "free_blocks": l.free_blocks, "total_blocks": l.total_blocks})),
            "slow_readers": slow.iter().map(|s| json!({"ok": s.ok(), "completion_tokens": s.completion_tokens, "e2e_s": s.e2e_s, "error": s.error})).collect::<Vec<_>>(),
            "slowloris_cut_off_s": cut, "slowloris_hold_s": hold.as_secs(),
            "held_after_flood": held_flood, "held_after_slow": held,
        }),
        ..Outcome::of(Scenario::Flood.name())
    })
}

// ---------------------------------------------------------------------------------------------
// partition: a decode worker's host loses its network mid-stream

/// A host of its own: a network namespace joined to this one by a veth pair, 10.S.0.1 here
/// and 10.S.0.2 there. Removed when dropped.
struct Netns {
    ns: String,
    /// This namespace's end of the pair: down is the partition.
    link: String,
    subnet: u8,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn new() -> anyhow::Result<Netns> {
        let tag = format!("{:x}", std::process::id() % 0xffff);
        // cli/tests/common/lan.rs takes 10.100-10.199 by its own pid; stay apart from it.
        let subnet = 200 + (std::process::id() % 50) as u8;
        let net = Netns {
            ns: format!("bchaos{tag}"),
            link: format!("bcr{tag}"),
            subnet,
        };
        let there = format!("bcn{tag}");
        ip(&["netns", "add", &net.ns])?;
        ip(&[
            "link", "add", &net.link, "type", "veth", "peer", "name", &there,
        ])?;
        ip(&["link", "set", &there, "netns", &net.ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.addr(1)),
            "dev",
            &net.link,
        ])?;
        ip(&["link", "set", &net.link, "up"])?;
        ip(&[
            "-n",
            &net.ns,
            "addr",
            "add",
            &format!("{}/24", net.addr(2)),
            "dev",
            &there,
        ])?;
        ip(&["-n", &net.ns, "link", "set", &there, "up"])?;
        ip(&["-n", &net.ns, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// 1: this namespace's address on the pair; 2: the other host's.
    fn addr(&self, i: u8) -> String {
        format!("10.{}.0.{i}", self.subnet)
    }

    fn exec(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn set_link(&self, up: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &self.link, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Per stream: its longest wait between two messages, seconds.
async fn gaps(mut rx: mpsc::UnboundedReceiver<(usize, usize)>, n: usize) -> Vec<f64> {
    let mut last: Vec<Option<Instant>> = vec![None; n];
    let mut gap = vec![0.0f64; n];
    while let Some((i, _)) = rx.recv().await {
        let now = Instant::now();
        if let Some(prev) = last[i] {
            gap[i] = gap[i].max((now - prev).as_secs_f64());
        }
        last[i] = Some(now);
    }
    gap
}

async fn partition(env: &Env, args: &ChaosArgs) -> anyhow::Result<Outcome> {
    const STREAMS: usize = 8;
    const TOKENS: u32 = 120;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || Command::new("ip").arg("-V").output().is_err() {
        return Ok(Outcome {
            passed: true,
            skipped: true,
            summary: "skipped: needs root and iproute2 (`ip`) to make a network namespace".into(),
            ..Outcome::of(Scenario::Partition.name())
        });
    }
    let net = Netns::new()?;
    let here = net.addr(1);
    let prefill = worker_on(env, &[], &here, "prefill", "prefill-0", 512)?;
    let d0 = worker_on(env, &[], &here, "decode", "decode-0", 512)?;
    let d1 = worker_on(env, &net.exec(), &net.addr(2), "decode", "decode-1", 512)?;
    let coord = coordinator(env, "coordinator", &[&prefill], &[&d0, &d1], "push", &[])?;
    wait_ready(coord.addrs[0], 3).await?;
    let asks: Vec<Ask> = prompts(STREAMS, 8, |i| 48 + (i % 8) * 5)
        .into_iter()
        .map(|prompt| Ask {
            prompt,
            max_tokens: TOKENS,
            pd_mode: v1::PdMode::Force,
            logprobs: false,
        })
        .collect();
    let undisturbed = join_all(run_all(&coord, &asks, None).await).await;

    let (tx, rx) = mpsc::unbounded_channel();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    // One copy of the progress for the gaps, one for the trigger.
    let (fan_tx, mut fan_rx) = mpsc::unbounded_channel::<(usize, usize)>();
    tokio::spawn(async move {
        while let Some(m) = fan_rx.recv().await {
            let _ = tx.send(m);
            let _ = seen_tx.send(m);
        }
    });
    let gaps_task = tokio::spawn(gaps(rx, STREAMS));
    let calls = run_all(&coord, &asks, Some(fan_tx)).await;
    let mut seen = [0usize; STREAMS];
    let wait_started = Instant::now();
    while seen.iter().any(|&n| n < 4) && wait_started.elapsed() < Duration::from_secs(120) {
        match tokio::time::timeout(Duration::from_secs(1), seen_rx.recv()).await {
            Ok(Some((i, n))) => seen[i] = n,
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let on_d1 = load(Role::Decode, d1.addrs[0])
        .await
        .map_or(0, |l| l.running);
    let hold = Duration::from_secs(args.partition_s);
    net.set_link(false)?;
    let down_at = Instant::now();
    let waiting = tokio::spawn(join_all(calls));
    // Drain the trigger's copy meanwhile, so the fan-out never holds messages back.
    let drain = tokio::spawn(async move { while seen_rx.recv().await.is_some() {} });
    tokio::time::sleep(hold).await;
    let ended_during = waiting.is_finished();
    net.set_link(true)?;
    let up_at = Instant::now();
    let disturbed = waiting.await.unwrap_or_default();
    drain.abort();
    let gap = gaps_task.await.unwrap_or_default();
    let t = tally(&disturbed, &undisturbed, TOKENS, "decode-1");
    let ended_before_up = disturbed
        .iter()
        .filter(|s| s.ended.is_some_and(|e| e < up_at))
        .count();
    let worst_gap = gap.iter().copied().fold(0.0, f64::max);
    let bound = Duration::from_secs(5) + STOP_MARGIN; // leave_after (5 s) + margin
    let last_end = disturbed
        .iter()
        .filter_map(|s| s.ended)
        .max()
        .map_or(0.0, |e| (e - down_at).as_secs_f64());
    let held = settle(
        &[
            ("prefill-0", Role::Prefill, prefill.addrs[0]),
            ("decode-0", Role::Decode, d0.addrs[0]),
            ("decode-1", Role::Decode, d1.addrs[0]),
        ],
        env.lease + SETTLE_MARGIN,
    )
    .await;

    let mut checks = Checks::default();
    checks.expect(
        on_d1 > 0,
        "the partition cut running streams",
        format!("{on_d1} streams on decode-1"),
    );
    checks.expect(
        worst_gap < bound.as_secs_f64(),
        "no stream stalls past leave_after + margin",
        format!(
            "longest wait between two messages {worst_gap:.1} s (link down {:.0} s); {ended_before_up} of {STREAMS} streams ended while it was down",
            hold.as_secs_f64()
        ),
    );
    checks.expect(
        t.failed == 0
            || disturbed.iter().all(|s| {
                s.ok()
                    || s.error
                        .as_ref()
                        .is_some_and(|e| e.class == Class::Unavailable)
            }),
        "streams complete or fail UNAVAILABLE",
        failure_line(&failures(&disturbed)),
    );
    checks.expect(
        t.equal == t.completed,
        "completed outputs equal the undisturbed run's",
        format!("{} of {} equal", t.equal, t.completed),
    );
    checks.expect(
        held.iter().all(Held::settled),
        "no block leaked (link up again)",
        held_line(&held),
    );
    let mut others = vec![prefill, d0, d1, coord];
    check_alive(&mut checks, &mut others);
    drop(others);
    drop(net);
    Ok(Outcome {
        summary: format!(
            "{STREAMS} streams x {TOKENS} tokens (push), decode-1's link down {:.0} s with {on_d1} streams on it: {} completed, \
             {} migrated, {} failed; {ended_before_up} ended while down{}; longest stall {worst_gap:.1} s; last ended \
             {last_end:.1} s after the cut; {}/{} equal undisturbed; {}",
            hold.as_secs_f64(),
            t.completed,
            t.migrated,
            t.failed,
            if ended_during { " (all of them)" } else { "" },
            t.equal,
            t.completed,
            held_line(&held)
        ),
        checks: checks.0,
        figures: json!({
            "streams": STREAMS, "tokens": TOKENS, "link_down_s": hold.as_secs_f64(), "on_partitioned": on_d1,
            "tally": t, "gaps_s": gap, "ended_while_down": ended_before_up, "last_end_after_cut_s": last_end,
            "failures": failure_messages(&disturbed), "held": held,
            "undisturbed": undisturbed, "disturbed": disturbed,
        }),
        ..Outcome::of(Scenario::Partition.name())
    })
}

// ---------------------------------------------------------------------------------------------
// Reporting

/// `scenario  PASS|FAIL  figures  [seconds]`.
pub fn result_line(o: &Outcome) -> String {
    format!(
        "{:<20} {}  {}  [{:.0} s]",
        o.scenario,
        match (o.skipped, o.passed) {
            (true, _) => "SKIP",
            (false, true) => "PASS",
            (false, false) => "FAIL",
        },
        o.summary,
        o.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frontend: &'static str, tokens: &[u32], text: &str, done: u32) -> Stream {
        Stream {
            frontend,
            tokens: tokens.to_vec(),
            text: text.into(),
            completion_tokens: done,
            finish: Some(Finish::default()),
            ..Default::default()
        }
    }

    #[test]
    fn dechunk_joins_chunks_split_anywhere() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Dechunk::default();
            let mut out = Vec::new();
            d.push(&wire[..split], &mut out);
            d.push(&wire[split..], &mut out);
            assert_eq!(out, b"hello, world", "split at {split}");
            assert_eq!(d.state, ChunkState::Done);
        }
    }

    #[test]
    fn sse_events_come_out_whole() {
        let mut sse = SseEvents::default();
        assert!(sse.push(b"data: {\"a\":").is_empty());
        assert_eq!(
            sse.push(b"1}\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn completion_events_fill_text_finish_and_usage() {
        let mut s = Stream::default();
        assert!(!apply_event(&mut s, r#"{"choices":[{"text":"Hi"}]}"#));
        assert!(!apply_event(
            &mut s,
            r#"{"choices":[{"text":"","finish_reason":"length"}],"baton":{"decode_worker":"decode-0","migrated_from":["decode-1"]}}"#
        ));
        assert!(!apply_event(
            &mut s,
            r#"{"choices":[],"usage":{"completion_tokens":2}}"#
        ));
        assert!(apply_event(&mut s, "[DONE]"));
        assert_eq!(s.text, "Hi");
        assert_eq!(s.completion_tokens, 2);
        let f = s.finish.expect("finish");
        assert_eq!(f.decode_worker, "decode-0");
        assert_eq!(f.migrated_from, vec!["decode-1".to_string()]);
        let mut e = Stream::default();
        apply_event(
            &mut e,
            r#"{"error":{"message":"busy","type":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(e.error.map(|f| f.class), Some(Class::Overloaded));
    }

    #[test]
    fn http_status_and_error_type_give_the_class() {
        assert_eq!(class_of_http(429, ""), Class::Overloaded);
        assert_eq!(
            class_of_http(503, "service_unavailable"),
            Class::Unavailable
        );
        assert_eq!(class_of_http(200, "timeout"), Class::Deadline);
        assert_eq!(class_of_http(500, "internal_error"), Class::Other);
        assert_eq!(
            class_of_code(tonic::Code::ResourceExhausted),
            Class::Overloaded
        );
    }

    #[test]
    fn tally_counts_migrations_of_the_killed_worker_and_equal_outputs() {
        let undisturbed = vec![
            stream("grpc", &[1, 2, 3], "", 3),
            stream("http", &[], "abc", 3),
            stream("grpc", &[4, 5, 6], "", 3),
        ];
        let mut migrated = stream("grpc", &[1, 2, 3], "", 3);
        migrated.finish = Some(Finish {
            migrated_from: vec!["decode-1".into()],
            ..Finish::default()
        });
        let mut failed = stream("grpc", &[4], "", 0);
        failed.failed(Class::Unavailable, "Unavailable", "gone");
        let disturbed = vec![migrated, stream("http", &[], "abc", 3), failed];
        let t = tally(&disturbed, &undisturbed, 3, "decode-1");
        assert_eq!(
            t,
            Tally {
                streams: 3,
                completed: 2,
                migrated: 1,
                failed: 1,
                equal: 2
            }
        );
        assert_eq!(tally(&disturbed, &undisturbed, 3, "decode-0").migrated, 0);
    }

    #[test]
    fn a_worker_holding_anything_is_not_settled() {
        let l = v1::LoadReport {
            free_blocks: 100,
            total_blocks: 100,
            ..Default::default()
        };
        assert!(Held::of("d", Some(&l)).settled());
        let leased = v1::LoadReport {
            leases: 1,
            ..l.clone()
        };
        assert!(!Held::of("d", Some(&leased)).settled());
        let pinned = v1::LoadReport {
            free_blocks: 97,
            ..l
        };
        assert_eq!(Held::of("d", Some(&pinned)).blocks, 3);
        assert!(!Held::of("d", None).settled(), "silence is not settled");
        assert!(held_line(&[Held::of("d", Some(&pinned))]).contains("3 blocks"));
    }

    #[test]
    fn the_victim_is_computing_for_push_and_leasing_for_pull() {
        let idle = v1::LoadReport::default();
        let computing = v1::LoadReport {
            running: 1,
            ..Default::default()
        };
        let leasing = v1::LoadReport {
            leases: 2,
            ..Default::default()
        };
        let loads = vec![Some(idle.clone()), Some(computing.clone()), Some(leasing)];
        assert_eq!(pick_victim("push", &loads), Some(1));
        assert_eq!(pick_victim("pull", &loads), Some(2));
        assert_eq!(pick_victim("push", &[None, Some(idle)]), None);
    }

    #[test]
    fn endings_past_the_bound_are_late() {
        let e = |s: f64| Ending {
            sent_before_stop: true,
            after_stop_s: s,
            ok: true,
            class: None,
            prefill_worker: String::new(),
        };
        assert_eq!(
            late(
                &[e(-1.0), e(3.0), e(12.5), e(f64::INFINITY)],
                Duration::from_secs(12)
            ),
            2
        );
    }

    #[test]
    fn flood_tally_separates_refusals_from_other_endings() {
        let mut refused = stream("http", &[], "", 0);
        refused.finish = None;
        refused.failed(Class::Overloaded, "HTTP 429", "busy");
        let mut hung = stream("grpc", &[], "", 0);
        hung.failed(Class::Hung, "client limit", "");
        let mut ok = stream("grpc", &[1], "", 1);
        ok.ttft_s = Some(0.5);
        let t = flood_tally(&[refused, hung, ok]);
        assert_eq!((t.completed, t.overloaded, t.other), (1, 1, 1));
        assert_eq!(t.ttft.count, 1);
    }

    #[test]
    fn metric_sums_the_samples_of_one_name() {
        let page =
            "# HELP x\nbaton_x_total{a=\"1\"} 2\nbaton_x_total{a=\"2\"} 3\nbaton_x_total_more 7\n";
        assert_eq!(metric(page, "baton_x_total", ""), 5.0);
        assert_eq!(metric(page, "baton_x_total", "a=\"2\""), 3.0);
    }

    #[test]
    fn prompts_are_distinct_and_of_the_asked_length() {
        let p = prompts(3, 1, |i| 10 + i);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 11, 12]);
        assert_ne!(p[0][..10], p[1][..10]);
        assert_eq!(prompts(3, 1, |i| 10 + i), p, "deterministic");
        assert!(p.iter().flatten().all(|&t| (300..10_300).contains(&t)));
    }

    #[test]
    fn a_restarted_coordinator_keeps_its_ports() {
        let args: Vec<String> = [
            "coordinator",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--handoff",
            "pull",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let again = same_ports(
            &args,
            SocketAddr::from(([127, 0, 0, 1], 5)),
            SocketAddr::from(([127, 0, 0, 1], 6)),
        );
        assert_eq!(again[2], "127.0.0.1:5");
        assert_eq!(again[4], "127.0.0.1:6");
        assert_eq!(again[6], "pull");
    }
}

//! `baton up`: a whole local cluster as separate OS processes on loopback: N prefill workers and
//! M decode workers (ports chosen by the OS, read from each child's `listening` line), then the
//! coordinator on the configured HTTP and gRPC ports. Prints the endpoints once the coordinator
//! is ready, and supervises the children until Ctrl-C or SIGTERM, which stop every child.
//!
//! Supervision: a child that dies is started again after a backoff (`--restart-backoff`, 0.5 s,
//! doubling with each quick death up to 30 s; a run of 60 s resets it) on the addresses its first
//! run announced, so it rejoins: the coordinator's worker list and health checks bring a worker
//! back (a failed poll while it is away makes the coordinator ask its `Info` again, hence a
//! backoff of at least two polls), and a restarted coordinator serves on the same ports and
//! polls the same workers. The rest of the cluster serves meanwhile. A child that dies
//! `--restart-limit` times within `--restart-window` (5 within 2 min) is crash-looping: `up`
//! stops every child and exits 1 with one line naming it, its last exit status and the error it
//! reported on stderr. Each death and each restart is one log line. `--no-restart` stops the
//! cluster at the first death instead.
//! Children start in order, each once those before it listen (the coordinator last, handed the
//! workers' addresses); one that dies while starting is restarted like any other.
//!
//! The decisions (backoff, crash loop, a dead child's last words) are [`crate::supervise`]'s,
//! with no IO. One loop here owns the processes and reacts to events: a signal, a child's
//! `listening` lines, a child's exit (a thread per child waits for it without reaping it), the
//! coordinator's readiness, a backoff running out.
//!
//! `baton up --colocated` is the aggregated baseline every disaggregation figure is compared
//! with: no prefill workers, and M decode workers that each prefill their own prompts (chunked
//! prefill in the same continuous batch, on the same engine and the same per-phase weights a
//! prefill worker would use), so the coordinator places every request aggregated. A colocated
//! worker is a `baton decode` process: that role already serves `DecodeRequest.prompt`, so the
//! baseline runs exactly the code an aggregated request runs in a disaggregated cluster.
//!
//! Configuration: `--config FILE` and `--set KEY=VALUE` go to the children whose table they
//! name, the environment is inherited, and `up`'s own flags become the children's flags. Every
//! role's configuration is loaded and validated here first, so a bad key stops `up` before any
//! child starts. `up` chooses, per child, what must differ between processes on one host: the
//! workers' listen ports (0), worker ids, the decode workers' shared-memory sockets, and the
//! coordinator's worker lists. A restart passes the same flags plus `--set <role>.<listen
//! key>=ADDR` for each address the first run announced (the last `--set` wins).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::{Flags, RoleName};
use crate::roles::ConfigArgs;
use crate::supervise::{LastWords, OnDeath, RestartPolicy, Restarts, Verdict};

#[derive(clap::Args)]
pub struct UpArgs {
    /// A .gguf file or a Hugging Face model directory, for every role (default: the
    /// configured models, else $BATON_MODEL, else the development model, fetched by
    /// scripts/fetch-model.sh when missing).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prefill workers (default 1; 0 with --colocated).
    #[arg(long)]
    prefill: Option<usize>,
    /// Decode workers (with --colocated: colocated workers).
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// Aggregated serving, the baseline for disaggregation: no prefill workers; each decode
    /// worker prefills its own prompts (chunked prefill in its continuous batch, f32 prefill
    /// weights and quantized decode weights under `weights = auto`) and every request is placed
    /// aggregated. A colocated worker is a `baton decode` process named colocated-N (the
    /// decode role serves prompts it prefills itself). Conflicts with --prefill N > 0.
    #[arg(long)]
    colocated: bool,
    /// OpenAI-compatible HTTP address (coordinator.http_listen; default 127.0.0.1:8080).
    #[arg(long)]
    http: Option<String>,
    /// gRPC address, baton.v1.Inference (coordinator.grpc_listen; default 127.0.0.1:50051).
    #[arg(long)]
    grpc: Option<String>,
    /// push | pull (coordinator.handoff; default push).
    #[arg(long)]
    handoff: Option<String>,
    /// auto | tcp | shm (coordinator.transport; default auto).
    #[arg(long)]
    transport: Option<String>,
    /// KV pool per worker, MiB (engine.kv_cache_mib of both worker roles; default 512).
    #[arg(long)]
    kv_cache_mib: Option<String>,
    /// Pin every prefill worker to these CPUs (comma list of CPU numbers, as `taskset -c`
    /// takes them without ranges); the worker's thread pools size themselves to the set.
    /// Default: unpinned.
    #[arg(long, value_delimiter = ',', value_parser = cpu_number)]
    prefill_cpus: Vec<usize>,
    /// Each decode (or colocated) worker as a group of this many tensor-parallel rank
    /// processes per pipeline stage (decode.group.tp; default 1). Needs --colocated for now: a
    /// group prefills its own prompts and takes no KV handoffs yet.
    #[arg(long)]
    decode_tp: Option<usize>,
    /// Each decode (or colocated) worker's layers split over this many pipeline stages, a rank
    /// process each (decode.group.pp; default 1). Needs --colocated for now.
    #[arg(long)]
    decode_pp: Option<usize>,
    /// Pin every decode (or colocated) worker to these CPUs. Default: unpinned.
    #[arg(long, value_delimiter = ',', value_parser = cpu_number)]
    decode_cpus: Vec<usize>,
    /// CPU priority of the decode workers below the prefill workers', as a nice value (0 to 19;
    /// decode.nice): on one host they share the cores, and giving prefill the cores first keeps
    /// time to first token low while streams decode. Default 10 with prefill workers, 0 with
    /// --colocated or --prefill 0.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=19))]
    decode_nice: Option<u8>,
    /// A child that dies is started again on the same addresses, so it rejoins, after this
    /// wait (e.g. 500ms, 2s); it doubles with each quick death, up to 30 s, and a run of 60 s
    /// resets it. At least two of the coordinator's load polls (coordinator.load_poll_interval),
    /// so the coordinator sees a worker gone before it comes back.
    #[arg(long, default_value = "500ms", value_parser = crate::bench_serve::duration)]
    restart_backoff: Duration,
    /// A child that dies this many times within --restart-window is crash-looping: `up` stops
    /// every child and exits non-zero, naming it (1: the first death stops the cluster).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    restart_limit: u32,
    /// The window --restart-limit counts deaths in (e.g. 2min, 90s).
    #[arg(long, default_value = "2min", value_parser = crate::bench_serve::duration)]
    restart_window: Duration,
    /// Stop the cluster as soon as any child dies instead of restarting it.
    #[arg(long, conflicts_with_all = ["restart_backoff", "restart_limit", "restart_window"])]
    no_restart: bool,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    telemetry: crate::roles::TelemetryArgs,
    /// With --discovery mdns (or etcd) the workers announce themselves and listen on every
    /// interface, the coordinator finds them (and workers other machines start with the same
    /// cluster key) instead of being handed their addresses.
    #[command(flatten)]
    discovery: crate::roles::DiscoveryArgs,
}

impl UpArgs {
    /// The flags `up` passes to the children of `role`, as (flag, value) pairs.
    fn child_flags(&self, role: RoleName) -> Vec<(&'static str, String)> {
        let mut flags = Vec::new();
        if let Some(m) = &self.model {
            flags.push(("--model", m.display().to_string()));
        }
        if let Some(path) = &self.config.config {
            flags.push(("--config", path.display().to_string()));
        }
        let role_prefix = format!("{}.", role.key());
        for set in &self.config.set {
            if set.starts_with(&role_prefix) {
                flags.push(("--set", set.clone()));
            }
        }
        let given = |flag, value: &Option<String>| value.clone().map(|v| (flag, v));
        let own = match role {
            RoleName::Coordinator => vec![
                given("--http", &self.http),
                given("--grpc", &self.grpc),
                given("--handoff", &self.handoff),
                given("--transport", &self.transport),
            ],
            RoleName::Prefill => vec![given("--kv-cache-mib", &self.kv_cache_mib)],
            RoleName::Decode => vec![
                given("--kv-cache-mib", &self.kv_cache_mib),
                Some(("--set", format!("decode.nice={}", self.decode_nice()))),
                self.decode_tp
                    .map(|n| ("--set", format!("decode.group.tp={n}"))),
                self.decode_pp
                    .map(|n| ("--set", format!("decode.group.pp={n}"))),
            ],
        };
        flags.extend(own.into_iter().flatten());
        flags.extend(self.discovery.as_flags());
        flags.extend(given("--log-format", &self.telemetry.log_format));
        flags.extend(given("--otlp-endpoint", &self.telemetry.otlp_endpoint));
        flags
    }

    /// The config keys `child_flags` and the per-child choices set, for checking every role's
    /// configuration before starting anything.
    fn flags_as_keys(&self, flags: &mut Flags) {
        let model = self.model.as_ref().map(|p| p.display());
        flags.named("coordinator.model", "--model", model.as_ref());
        flags.named("prefill.engine.model", "--model", model.as_ref());
        flags.named("decode.engine.model", "--model", model.as_ref());
        flags.named("coordinator.http_listen", "--http", self.http.as_ref());
        flags.named("coordinator.grpc_listen", "--grpc", self.grpc.as_ref());
        flags.named("coordinator.handoff", "--handoff", self.handoff.as_ref());
        flags.named(
            "coordinator.transport",
            "--transport",
            self.transport.as_ref(),
        );
        for role in ["prefill", "decode"] {
            flags.named(
                &format!("{role}.engine.kv_cache_mib"),
                "--kv-cache-mib",
                self.kv_cache_mib.as_ref(),
            );
            flags.named(&format!("{role}.listen"), "--listen", Some("127.0.0.1:0"));
        }
        flags.named(
            "decode.nice",
            "--decode-nice",
            Some(self.decode_nice().to_string()).as_ref(),
        );
        flags.named("decode.group.tp", "--decode-tp", self.decode_tp.as_ref());
        flags.named("decode.group.pp", "--decode-pp", self.decode_pp.as_ref());
        for role in ["coordinator", "prefill", "decode"] {
            self.discovery.flags(role, flags);
        }
        // Filled in with the workers' real addresses once they listen (discovery finds them
        // otherwise).
        if !self.discovery.dynamic() {
            flags.list(
                "coordinator.decode_workers",
                "--decode-worker",
                &["127.0.0.1:0".to_string()],
            );
        }
    }
}

/// The processes a command started; every one is stopped when this drops.
pub struct Children {
    pub procs: Vec<(String, Child)>,
    /// How long children may take to stop after SIGTERM: the workers' drain deadline and a
    /// margin.
    pub grace: Duration,
}

impl Children {
    /// SIGTERM to everyone, then wait up to the grace period; SIGKILL whoever is still there.
    pub fn stop(&mut self) {
        for (_, c) in &self.procs {
            signal(c.id(), libc::SIGTERM);
        }
        let (tx, rx) = mpsc::channel();
        let mut waiting = Vec::new();
        for (name, mut c) in self.procs.drain(..) {
            let tx = tx.clone();
            waiting.push((name, c.id()));
            std::thread::spawn(move || {
                let _ = c.wait();
                let _ = tx.send(c.id());
            });
        }
        drop(tx);
        let deadline = std::time::Instant::now() + self.grace;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(pid) => waiting.retain(|(_, p)| *p != pid),
                Err(_) => {
                    for (name, pid) in waiting.drain(..) {
                        eprintln!("baton up: {name} did not stop; killing it");
                        signal(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) on a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `--prefill-cpus` / `--decode-cpus`: one CPU number.
pub fn cpu_number(s: &str) -> Result<usize, String> {
    let cpu: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a CPU number"))?;
    // cpu_set_t holds CPU_SETSIZE bits.
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!(
            "CPU {cpu} is past the largest CPU number sched_setaffinity takes ({})",
            libc::CPU_SETSIZE - 1
        ));
    }
    Ok(cpu)
}

/// The `baton` executable: this process when it is `baton`; otherwise (`baton-lab`, a test)
/// `$BATON_EXE`, or the `baton` binary beside this one.
pub fn baton_exe() -> anyhow::Result<std::path::PathBuf> {
    if let Some(exe) = std::env::var_os("BATON_EXE") {
        return Ok(exe.into());
    }
    let me = std::env::current_exe().context("find this executable")?;
    if me.file_stem().is_some_and(|s| s == "baton") {
        return Ok(me);
    }
    let beside = me.with_file_name("baton");
    if !beside.is_file() {
        bail!(
            "no baton executable beside {} (build it: cargo build --release -p baton), and \
             BATON_EXE is not set",
            me.display()
        );
    }
    Ok(beside)
}

/// Starts `baton <args>` and returns it with the addresses of its first `announced`
/// `listening` lines.
pub fn spawn(
    name: &str,
    args: &[String],
    announced: usize,
) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    spawn_pinned(name, args, announced, &[])
}

/// [`spawn`], with the child's CPU affinity set to `cpus` (unless empty) before it executes,
/// so every thread it ever starts inherits the set and its pools (which size themselves from
/// the CPUs the process may use) match it.
pub fn spawn_pinned(
    name: &str,
    args: &[String],
    announced: usize,
    cpus: &[usize],
) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    spawn_exe(&baton_exe()?, name, args, announced, cpus)
}

/// Longest a child may take from its start to its last `listening` line: loading the model in
/// a fresh process, with the machine busy.
const START_WAIT: Duration = Duration::from_secs(120);

/// [`spawn_pinned`] of a given `baton` executable (another build, for a paired comparison).
pub fn spawn_exe(
    exe: &Path,
    name: &str,
    args: &[String],
    announced: usize,
    cpus: &[usize],
) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    let mut child = start(exe, name, args, cpus, Stdio::inherit())?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    forward_stdout(stdout, name, announced, move |addrs| {
        let _ = tx.send(addrs);
    });
    match rx.recv_timeout(START_WAIT) {
        Ok(addrs) => Ok((child, addrs)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("{name} did not start listening (exit status {status:?}); see its log above")
        }
    }
}

/// Starts `exe <args>` with stdout piped (for [`forward_stdout`]), stderr as given, the
/// parent-death signal set and, unless `cpus` is empty, the CPU affinity set before it
/// executes.
fn start(
    exe: &Path,
    name: &str,
    args: &[String],
    cpus: &[usize],
    stderr: Stdio,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped()).stderr(stderr);
    // Built before the fork: the child may only make async-signal-safe calls.
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: cpu_number bounded every CPU below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let pin = !cpus.is_empty();
    // SAFETY: prctl and sched_setaffinity in the child between fork and exec are system calls
    // on that process alone.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // The child dies with `baton up`, even if `up` is killed without cleaning up.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if pin && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| {
        if pin {
            format!("start {name} on CPUs {cpus:?}")
        } else {
            format!("start {name}")
        }
    })
}

/// Copies a child's stdout to ours as `[name] line`, except its `listening` lines: once it
/// announced `announced` addresses, `on_listening` gets them.
fn forward_stdout(
    stdout: ChildStdout,
    name: &str,
    announced: usize,
    on_listening: impl FnOnce(Vec<SocketAddr>) + Send + 'static,
) {
    let label = name.to_string();
    std::thread::spawn(move || {
        let mut on_listening = Some(on_listening);
        let mut addrs = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("listening ") {
                if let Some((_, addr)) = rest.split_once('=')
                    && let Ok(a) = addr.parse::<SocketAddr>()
                {
                    addrs.push(a);
                }
                if addrs.len() == announced
                    && let Some(announce) = on_listening.take()
                {
                    announce(addrs.clone());
                }
            } else {
                // A closed stdout must not stop the copying: the child would block on a full
                // pipe.
                let _ = writeln!(std::io::stdout().lock(), "[{label}] {line}");
            }
        }
    });
}

/// Copies a child's stderr to ours line by line, feeding `words`; `closed` fires when the
/// child's stderr closes (it exited).
fn forward_stderr(stderr: ChildStderr, words: Arc<Mutex<LastWords>>, closed: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        // Bytes, not `lines()`: a line that is not UTF-8 must not end the copying.
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&buf);
            let line = text.trim_end_matches(['\n', '\r']);
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            words.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            buf.clear();
        }
        let _ = closed.send(());
    });
}

/// Blocks until child `pid` has exited, without reaping it: its `Child` does, so the pid is not
/// reused while `up` may still signal it.
fn await_exit(pid: u32) {
    loop {
        // SAFETY: waitid writes only the siginfo_t on this stack; WNOWAIT leaves the exited
        // child for its `Child` to reap.
        let done = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                libc::id_t::from(pid),
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if done == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

impl UpArgs {
    /// The decode workers' nice value: lower than the prefill workers' when there are any.
    fn decode_nice(&self) -> u8 {
        let with_prefill = !self.colocated && self.prefill.unwrap_or(1) > 0;
        self.decode_nice
            .unwrap_or(if with_prefill { 10 } else { 0 })
    }

    /// Prefill workers to start: none when colocated.
    fn prefill_workers(&self) -> anyhow::Result<usize> {
        if (self.decode_tp.unwrap_or(1) > 1 || self.decode_pp.unwrap_or(1) > 1) && !self.colocated {
            bail!(
                "--decode-tp and --decode-pp need --colocated for now: a worker group prefills its own prompts and takes no KV handoffs from prefill workers yet"
            );
        }
        match (self.colocated, self.prefill) {
            (true, Some(n)) if n > 0 => bail!(
                "--colocated runs no prefill workers (each worker prefills its own prompts); \
                 drop --prefill {n}, or drop --colocated for a disaggregated cluster"
            ),
            (true, _) => Ok(0),
            (false, n) => Ok(n.unwrap_or(1)),
        }
    }
}

/// Longest `up` waits for the coordinator to report ready after it listens.
const READY_WAIT: Duration = Duration::from_secs(60);

/// Between attempts to watch the coordinator's health while it is not answering (restarting).
const READY_RETRY: Duration = Duration::from_millis(100);

/// Waits until the coordinator's grpc.health.v1 status (the same condition as its `/ready`)
/// is SERVING, for at most `limit`. A Watch stream pushes each change, so nothing polls; a
/// broken watch (the coordinator died, and may come back) is opened again.
fn wait_ready(grpc: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let serving = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
            .connect()
            .await?;
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        while let Some(status) = stream.message().await? {
            if status.status == ServingStatus::Serving as i32 {
                return anyhow::Ok(());
            }
        }
        bail!("the coordinator ended its health stream before it was serving")
    };
    let watch = async {
        loop {
            match serving().await {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, %grpc, "watching the coordinator's health"),
            }
            tokio::time::sleep(READY_RETRY).await;
        }
    };
    rt.block_on(async { tokio::time::timeout(limit, watch).await })
        .map_err(|_| {
            anyhow::anyhow!(
                "the coordinator at {grpc} did not report ready within {limit:?} (no healthy \
                 workers yet); see the workers' logs above"
            )
        })
}

/// Announced workers listen on every interface; each would refuse to start without TLS and
/// the cluster key (`baton_worker::exposure`). Said here once, with the command that fixes it,
/// rather than as children that keep dying.
fn check_lan_security(config: &crate::config::ClusterConfig) -> anyhow::Result<()> {
    use baton_worker::exposure::{Exposure, Verdict};
    let every = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let roles = [
        (
            "prefill",
            config.prefill.tls.is_some(),
            config.prefill.discovery.cluster_key_file.is_some(),
            config.prefill.insecure_remote,
        ),
        (
            "decode",
            config.decode.tls.is_some(),
            config.decode.discovery.cluster_key_file.is_some(),
            config.decode.insecure_remote,
        ),
    ];
    for (role, tls, cluster_key, insecure_remote) in roles {
        let exposure = Exposure::of_worker(role, every, every, tls, cluster_key, insecure_remote);
        if let Verdict::Refuse { reason, .. } = exposure.verdict() {
            bail!(
                "--discovery starts {role} workers on every interface: {reason}. A secured LAN \
                 cluster: `baton certs --out certs`, then `baton up --discovery mdns --config \
                 certs/tls.toml` (copy certs/ to the same path on every machine)"
            );
        }
    }
    Ok(())
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let n_prefill = args.prefill_workers()?;
    if args.decode == 0 {
        bail!("--decode must be at least 1: every request ends on a decode worker");
    }
    let sources = args
        .config
        .sources(None, |flags| args.flags_as_keys(flags))?;
    let loaded = crate::config::load(&sources)?;
    for role in RoleName::ALL {
        loaded.validate(role)?;
    }
    if args.discovery.dynamic() {
        check_lan_security(&loaded.config)?;
    }
    let on_death = args.on_death();
    // A restarted worker rejoins once the coordinator has seen it gone: a failed poll makes it
    // ask the worker's `Info` again (its KV port is new). A restart quicker than two polls
    // could come back unseen, and keep its old endpoints.
    let poll = loaded.config.coordinator.load_poll_interval;
    if let OnDeath::Restart(policy) = on_death
        && policy.backoff < 2 * poll
    {
        bail!(
            "--restart-backoff {:?} is shorter than two of the coordinator's load polls \
             (coordinator.load_poll_interval = {poll:?}): a worker restarted that quickly could \
             rejoin unseen and keep its old KV endpoints",
            policy.backoff
        );
    }
    // Fetched once here rather than by every child at once.
    crate::config::resolve_model(&loaded.config.coordinator.model)?;
    if n_prefill > 0 {
        crate::config::resolve_model(&loaded.config.prefill.engine.model)?;
    }
    crate::config::resolve_model(&loaded.config.decode.engine.model)?;
    let exe = baton_exe()?;

    let (events_tx, events) = mpsc::channel();
    // Before any child exists, so no signal ever meets the default action (a SIGTERM right
    // after the endpoints were printed once beat a handler installed later, and `up` died
    // without stopping its children).
    forward_signals(events_tx.clone())?;
    let drain = loaded
        .config
        .prefill
        .drain_timeout
        .max(loaded.config.decode.drain_timeout);
    let mut slots = Vec::new();
    let workers = (0..args.decode)
        .map(|i| (RoleName::Decode, i))
        .chain((0..n_prefill).map(|i| (RoleName::Prefill, i)));
    for (role, i) in workers {
        let name = match role {
            RoleName::Decode if args.colocated => format!("colocated-{i}"),
            _ => format!("{}-{i}", role.key()),
        };
        let mut role_args: Vec<String> = vec![role.key().into()];
        for (flag, value) in args.child_flags(role) {
            role_args.extend([flag.into(), value]);
        }
        // Announced workers are for the LAN: every interface, KV included.
        let any = if args.discovery.dynamic() {
            role_args.extend(["--kv-listen".into(), "0.0.0.0:0".into()]);
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        role_args.extend([
            "--listen".into(),
            any.into(),
            "--worker-id".into(),
            name.clone(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ]);
        if n_prefill > 0 {
            // Shared memory between the workers of this host: a prefill worker pushes into a
            // decode worker's pool through its socket, a decode worker reads a pull source
            // through the prefill worker's.
            let socket =
                std::env::temp_dir().join(format!("baton-{}-{name}.sock", std::process::id()));
            role_args.extend(["--kv-shm-socket".into(), socket.display().to_string()]);
        }
        let serves_metrics = match role {
            RoleName::Decode => loaded.config.decode.metrics,
            _ => loaded.config.prefill.metrics,
        };
        let cpus = match role {
            RoleName::Decode => &args.decode_cpus,
            _ => &args.prefill_cpus,
        };
        let mut listens = vec!["listen"];
        if serves_metrics {
            listens.push("metrics_listen");
        }
        slots.push(Slot::new(name, role, role_args, cpus.clone(), listens));
    }
    let mut coord_args = vec!["coordinator".to_string()];
    for (flag, value) in args.child_flags(RoleName::Coordinator) {
        coord_args.extend([flag.into(), value]);
    }
    slots.push(Slot::new(
        "coordinator".into(),
        RoleName::Coordinator,
        coord_args,
        Vec::new(),
        vec!["grpc_listen", "http_listen"],
    ));
    let shape = if args.colocated {
        format!(
            "baton is up (colocated): {} colocated workers, each prefilling and decoding its own requests",
            args.decode
        )
    } else {
        format!(
            "baton is up: {n_prefill} prefill + {} decode workers",
            args.decode
        )
    };
    let mut supervisor = Supervisor {
        slots,
        on_death,
        exe,
        static_workers: !args.discovery.dynamic(),
        events: events_tx,
        grace: drain + Duration::from_secs(5),
        serving: false,
        shape,
    };
    match supervisor.run(&events) {
        Ended::Signal { name, number } => {
            let serving = supervisor.serving;
            if serving {
                println!("baton up: stopping ({name})");
            } else {
                println!("baton up: stopping ({name} while starting)");
            }
            supervisor.stop();
            if !serving {
                std::process::exit(128 + number);
            }
            Ok(())
        }
        Ended::GaveUp(line) => {
            supervisor.stop();
            // One line, and not an error returned from `main`: that prints a stack backtrace
            // under RUST_BACKTRACE.
            eprintln!("baton up: {line}");
            std::process::exit(1)
        }
    }
}

impl UpArgs {
    fn on_death(&self) -> OnDeath {
        if self.no_restart {
            OnDeath::Stop
        } else {
            OnDeath::Restart(RestartPolicy::new(
                self.restart_limit,
                self.restart_window,
                self.restart_backoff,
            ))
        }
    }
}

/// What the supervisor hears, from its children's threads and the signal handler.
enum Event {
    /// SIGINT or SIGTERM.
    Signal { name: &'static str, number: i32 },
    /// The child `pid` of `slot` announced every address it listens on.
    Listening {
        slot: usize,
        pid: u32,
        addrs: Vec<SocketAddr>,
    },
    /// The child `pid` of `slot` exited; it is not reaped yet.
    Exited { slot: usize, pid: u32 },
    /// The coordinator `pid` reported ready, or did not within [`READY_WAIT`].
    Ready {
        pid: u32,
        result: Result<(), String>,
    },
}

/// How supervision ended.
enum Ended {
    Signal {
        name: &'static str,
        number: i32,
    },
    /// A child made `up` give up (crash loop, `--no-restart`, no start): the line that says why.
    GaveUp(String),
}

/// One child `up` keeps running, across its restarts.
struct Slot {
    /// decode-1, prefill-0, colocated-0, coordinator.
    name: String,
    role: RoleName,
    args: Vec<String>,
    cpus: Vec<usize>,
    /// The config key, in its role's table, of each address it announces, in order.
    listens: Vec<&'static str>,
    /// What its first run announced; every restart binds the same addresses.
    addrs: Option<Vec<SocketAddr>>,
    state: State,
    restarts: Restarts,
}

enum State {
    /// Not started: it starts once every child before it has listened.
    Waiting,
    Running(Running),
    /// Dead; starts again at this instant.
    Backoff(Instant),
    /// Dead or stopped, not to start again.
    Stopped,
}

/// One run of a child.
struct Running {
    child: Child,
    started: Instant,
    /// What it said on stderr; complete once `stderr_closed` fires.
    words: Arc<Mutex<LastWords>>,
    stderr_closed: mpsc::Receiver<()>,
}

/// Longest `up` waits, after a child exited, for the rest of its stderr.
const STDERR_DRAIN: Duration = Duration::from_secs(1);

impl Slot {
    fn new(
        name: String,
        role: RoleName,
        args: Vec<String>,
        cpus: Vec<usize>,
        listens: Vec<&'static str>,
    ) -> Self {
        Self {
            name,
            role,
            args,
            cpus,
            listens,
            addrs: None,
            state: State::Waiting,
            restarts: Restarts::default(),
        }
    }

    /// Its arguments for the next start: after a first run, with the addresses it announced.
    fn start_args(&self) -> Vec<String> {
        let mut args = self.args.clone();
        for (key, addr) in self.listens.iter().zip(self.addrs.iter().flatten()) {
            args.extend(["--set".into(), format!("{}.{key}={addr}", self.role.key())]);
        }
        args
    }

    fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Running(run) => Some(run.child.id()),
            _ => None,
        }
    }

    /// Starts its next run: stdout and stderr copied to `up`'s (its `listening` lines and its
    /// exit become events, its stderr its last words).
    fn launch(
        &self,
        exe: &Path,
        index: usize,
        events: &mpsc::Sender<Event>,
    ) -> anyhow::Result<Running> {
        let mut child = start(
            exe,
            &self.name,
            &self.start_args(),
            &self.cpus,
            Stdio::piped(),
        )?;
        let pid = child.id();
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} started without its output pipes", self.name);
        };
        let words = Arc::new(Mutex::new(LastWords::default()));
        let (closed, stderr_closed) = mpsc::channel();
        forward_stderr(stderr, words.clone(), closed);
        let listening = events.clone();
        forward_stdout(stdout, &self.name, self.listens.len(), move |addrs| {
            let _ = listening.send(Event::Listening {
                slot: index,
                pid,
                addrs,
            });
        });
        let exited = events.clone();
        std::thread::spawn(move || {
            await_exit(pid);
            let _ = exited.send(Event::Exited { slot: index, pid });
        });
        Ok(Running {
            child,
            started: Instant::now(),
            words,
            stderr_closed,
        })
    }
}

/// Owns `up`'s children: starts them in order, restarts those that die as [`Restarts`]
/// decides, and stops them all when dropped.
struct Supervisor {
    /// Workers first, the coordinator last.
    slots: Vec<Slot>,
    on_death: OnDeath,
    exe: PathBuf,
    /// The coordinator is handed the workers' addresses (no discovery).
    static_workers: bool,
    events: mpsc::Sender<Event>,
    /// How long children may take to stop after SIGTERM: the workers' drain deadline and a
    /// margin.
    grace: Duration,
    /// The coordinator reported ready and the endpoints are printed.
    serving: bool,
    /// The first line of the endpoints.
    shape: String,
}

impl Supervisor {
    /// Supervises until a signal, or until a child makes it give up.
    fn run(&mut self, events: &mpsc::Receiver<Event>) -> Ended {
        loop {
            if let Some(line) = self.start_due(Instant::now()) {
                return Ended::GaveUp(line);
            }
            // Nothing timed: wake up now and then anyway (the channel never closes while this
            // holds a sender).
            let wait = self.next_timer().map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
            let event = match events.recv_timeout(wait) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(line) = self.overdue(Instant::now()) {
                        return Ended::GaveUp(line);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Ended::GaveUp("lost its event channel".into());
                }
            };
            match event {
                Event::Signal { name, number } => return Ended::Signal { name, number },
                Event::Listening { slot, pid, addrs } => self.listening(slot, pid, addrs),
                Event::Exited { slot, pid } => {
                    if let Some(line) = self.exited(slot, pid) {
                        return Ended::GaveUp(line);
                    }
                }
                Event::Ready { pid, result } => match result {
                    Ok(()) if !self.serving => {
                        self.serving = true;
                        self.print_endpoints();
                    }
                    // A watcher of an earlier run of the coordinator: the current run has its own.
                    Err(e) if !self.serving && self.coordinator().pid() == Some(pid) => {
                        return Ended::GaveUp(e);
                    }
                    _ => {}
                },
            }
        }
    }

    /// Starts every child whose turn has come: a first start once all children before it
    /// listen, a restart once its backoff ran out.
    fn start_due(&mut self, now: Instant) -> Option<String> {
        for i in 0..self.slots.len() {
            let due = match self.slots[i].state {
                State::Waiting => self.slots[..i].iter().all(|s| s.addrs.is_some()),
                State::Backoff(at) => at <= now,
                State::Running(_) | State::Stopped => false,
            };
            if !due {
                continue;
            }
            if matches!(self.slots[i].state, State::Waiting)
                && self.slots[i].role == RoleName::Coordinator
                && self.static_workers
            {
                let lists = self.worker_lists();
                self.slots[i].args.extend(lists);
            }
            let slot = &self.slots[i];
            match slot.launch(&self.exe, i, &self.events) {
                Ok(run) => {
                    let pid = run.child.id();
                    match slot.restarts.count() {
                        0 => eprintln!("baton up: started {} (pid {pid})", slot.name),
                        n => {
                            eprintln!("baton up: restarted {} (pid {pid}, restart {n})", slot.name)
                        }
                    }
                    self.slots[i].state = State::Running(run);
                }
                Err(e) => {
                    let line = self.died(i, now, format!("could not start: {e:#}"), None);
                    if line.is_some() {
                        return line;
                    }
                }
            }
        }
        None
    }

    /// `--prefill-worker ADDR ... --decode-worker ADDR ...` of the workers as they first
    /// listened.
    fn worker_lists(&self) -> Vec<String> {
        let mut lists = Vec::new();
        for (role, flag) in [
            (RoleName::Prefill, "--prefill-worker"),
            (RoleName::Decode, "--decode-worker"),
        ] {
            for slot in self.slots.iter().filter(|s| s.role == role) {
                if let Some(addr) = slot.addrs.as_ref().and_then(|a| a.first()) {
                    lists.extend([flag.to_string(), addr.to_string()]);
                }
            }
        }
        lists
    }

    /// The next backoff to run out, or first start to overstay [`START_WAIT`].
    fn next_timer(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match &s.state {
                State::Backoff(at) => Some(*at),
                State::Running(run) if s.addrs.is_none() => Some(run.started + START_WAIT),
                _ => None,
            })
            .min()
    }

    /// A first start that has not listened within [`START_WAIT`].
    fn overdue(&self, now: Instant) -> Option<String> {
        self.slots.iter().find_map(|s| match &s.state {
            State::Running(run) if s.addrs.is_none() && now >= run.started + START_WAIT => {
                Some(format!(
                    "{} did not start listening within {START_WAIT:?}; see its log above; \
                     stopped the cluster",
                    s.name
                ))
            }
            _ => None,
        })
    }

    fn listening(&mut self, i: usize, pid: u32, addrs: Vec<SocketAddr>) {
        let slot = &mut self.slots[i];
        if slot.pid() != Some(pid) {
            return;
        }
        if slot.addrs.is_none() {
            slot.addrs = Some(addrs.clone());
        }
        // Listening is not serving: the coordinator answers 503 until it has seen a healthy
        // worker of each kind it needs, so `up` waits for it to report ready before saying so.
        if slot.role == RoleName::Coordinator
            && !self.serving
            && let Some(&grpc) = addrs.first()
        {
            let ready = self.events.clone();
            std::thread::spawn(move || {
                let result = wait_ready(grpc, READY_WAIT).map_err(|e| format!("{e:#}"));
                let _ = ready.send(Event::Ready { pid, result });
            });
        }
    }

    /// Child `pid` of slot `i` exited: reaps it, then restarts it or gives up.
    fn exited(&mut self, i: usize, pid: u32) -> Option<String> {
        let State::Running(run) = &mut self.slots[i].state else {
            return None;
        };
        if run.child.id() != pid {
            return None;
        }
        let status = match run.child.try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => return None,
            Err(e) => format!("exit status unknown ({e})"),
        };
        // Its stderr closes as it exits; the last lines may still be in the pipe.
        let _ = run.stderr_closed.recv_timeout(STDERR_DRAIN);
        let words = run
            .words
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary();
        let started = run.started;
        self.died(i, started, format!("(pid {pid}) died: {status}"), words)
    }

    /// Slot `i`'s run that started at `started` ended (`how`); `words`: the error it reported.
    /// Logs the death and schedules the restart, or returns the line `up` gives up with.
    fn died(
        &mut self,
        i: usize,
        started: Instant,
        how: String,
        words: Option<String>,
    ) -> Option<String> {
        let now = Instant::now();
        let slot = &mut self.slots[i];
        let said = words.map(|w| format!(": {w}")).unwrap_or_default();
        let name = &slot.name;
        match slot.restarts.died(&self.on_death, started, now) {
            Verdict::Restart { number, after } => {
                eprintln!("baton up: {name} {how}{said}; restart {number} in {after:?}");
                slot.state = State::Backoff(now + after);
                None
            }
            Verdict::NoRestart => {
                let line = format!("{name} {how}{said}; --no-restart: stopped the cluster");
                slot.state = State::Stopped;
                Some(line)
            }
            Verdict::CrashLoop { deaths, window } => {
                let line = format!(
                    "{name} {how}{said}; {deaths} deaths within {window:?} is a crash loop: \
                     stopped the cluster"
                );
                slot.state = State::Stopped;
                Some(line)
            }
        }
    }

    fn coordinator(&self) -> &Slot {
        // `run` builds the coordinator's slot last, always.
        &self.slots[self.slots.len() - 1]
    }

    fn print_endpoints(&self) {
        let Some([grpc, http]) = self.coordinator().addrs.as_deref() else {
            return;
        };
        println!("{}", self.shape);
        println!(
            "  OpenAI HTTP  http://{http}/v1   (health /health, readiness /ready, metrics /metrics)"
        );
        println!("  gRPC         {grpc}   (baton.v1.Inference, reflection on)");
        for slot in &self.slots {
            if let Some(at) = slot.addrs.as_ref().and_then(|a| a.get(1))
                && slot.role != RoleName::Coordinator
            {
                println!("  {:<12} metrics http://{at}/metrics", slot.name);
            }
        }
        println!("Ctrl-C stops the cluster.");
    }

    /// Stops every running child (SIGTERM, then SIGKILL after the grace period); none starts
    /// again.
    fn stop(&mut self) {
        let procs = self
            .slots
            .iter_mut()
            .filter_map(|s| match std::mem::replace(&mut s.state, State::Stopped) {
                State::Running(run) => Some((s.name.clone(), run.child)),
                _ => None,
            })
            .collect();
        Children {
            procs,
            grace: self.grace,
        }
        .stop();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends the first SIGINT or SIGTERM to the supervisor. The handlers are installed (tokio keeps
/// them for the life of the process) before the first child starts, and owned by a small
/// runtime on their own thread.
fn forward_signals(events: mpsc::Sender<Event>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the signal runtime")?;
    let (mut int, mut term) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("install the SIGINT and SIGTERM handlers")?;
    std::thread::spawn(move || {
        let (name, number) = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => ("SIGINT", libc::SIGINT),
                _ = term.recv() => ("SIGTERM", libc::SIGTERM),
            }
        });
        let _ = events.send(Event::Signal { name, number });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_numbers_are_plain_and_within_the_set_size() {
        assert_eq!(cpu_number("3"), Ok(3));
        assert_eq!(cpu_number(" 0 "), Ok(0));
        assert!(matches!(cpu_number("0-3"), Err(e) if e.contains("not a CPU number")));
        assert!(matches!(cpu_number("1024"), Err(e) if e.contains("largest CPU number")));
    }

    #[test]
    fn readiness_is_the_health_status_turning_serving() {
        use tonic_health::ServingStatus;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (health, addr) = rt.block_on(async {
            let (health, service) = tonic_health::server::health_reporter();
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(baton_proto::incoming(listener)),
            );
            (health, addr)
        });
        let err = wait_ready(addr, Duration::from_millis(300)).expect_err("not serving yet");
        assert!(err.to_string().contains("did not report ready"), "{err}");
        // Turned SERVING (before or while `up` watches: either way the watch sees it).
        let turn = std::thread::spawn({
            let rt = rt.handle().clone();
            move || rt.block_on(health.set_service_status("", ServingStatus::Serving))
        });
        wait_ready(addr, Duration::from_secs(30)).expect("ready");
        turn.join().expect("turn serving");
    }
}

//! `baton up`: a whole local cluster as separate OS processes on loopback: N prefill workers and
//! M decode workers (ports chosen by the OS, read from each child's `listening` line), then the
//! coordinator on the configured HTTP and gRPC ports. Prints the endpoints, and stops every
//! child on Ctrl-C, on SIGTERM, or as soon as any child dies.
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
//! coordinator's worker lists.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::{Flags, RoleName};
use crate::roles::ConfigArgs;

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
    /// Pin every decode (or colocated) worker to these CPUs. Default: unpinned.
    #[arg(long, value_delimiter = ',', value_parser = cpu_number)]
    decode_cpus: Vec<usize>,
    /// CPU priority of the decode workers below the prefill workers', as a nice value (0 to 19;
    /// decode.nice): on one host they share the cores, and giving prefill the cores first keeps
    /// time to first token low while streams decode. Default 10 with prefill workers, 0 with
    /// --colocated or --prefill 0.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=19))]
    decode_nice: Option<u8>,
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

/// [`spawn_pinned`] of a given `baton` executable (another build, for a paired comparison).
pub fn spawn_exe(
    exe: &std::path::Path,
    name: &str,
    args: &[String],
    announced: usize,
    cpus: &[usize],
) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
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
    let mut child = cmd.spawn().with_context(|| {
        if pin {
            format!("start {name} on CPUs {cpus:?}")
        } else {
            format!("start {name}")
        }
    })?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    let label = name.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs = Vec::new();
        let mut sent = false;
        while let Some(Ok(line)) = lines.next() {
            if let Some(rest) = line.strip_prefix("listening ") {
                if let Some((_, addr)) = rest.split_once('=')
                    && let Ok(a) = addr.parse::<SocketAddr>()
                {
                    addrs.push(a);
                }
                if !sent && addrs.len() == announced {
                    let _ = tx.send(addrs.clone());
                    sent = true;
                }
            } else {
                println!("[{label}] {line}");
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(addrs) => Ok((child, addrs)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("{name} did not start listening (exit status {status:?}); see its log above")
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

/// Waits until the coordinator's grpc.health.v1 status (the same condition as its `/ready`)
/// is SERVING, for at most `limit`. A Watch stream pushes each change, so nothing polls.
fn wait_ready(grpc: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let watch = async {
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
    rt.block_on(async { tokio::time::timeout(limit, watch).await })
        .map_err(|_| {
            anyhow::anyhow!(
                "the coordinator at {grpc} did not report ready within {limit:?} (no healthy \
                 workers yet); see the workers' logs above"
            )
        })?
        .with_context(|| format!("watching the coordinator's health at {grpc}"))
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
    // Fetched once here rather than by every child at once.
    crate::config::resolve_model(&loaded.config.coordinator.model)?;
    if n_prefill > 0 {
        crate::config::resolve_model(&loaded.config.prefill.engine.model)?;
    }
    crate::config::resolve_model(&loaded.config.decode.engine.model)?;

    // Before any child exists, so no signal ever meets the default action (a SIGTERM right
    // after the endpoints were printed once beat a handler installed later, and `up` died
    // without stopping its children).
    let stop = StopSignal::install()?;
    let drain = loaded
        .config
        .prefill
        .drain_timeout
        .max(loaded.config.decode.drain_timeout);
    let mut children = Children {
        procs: Vec::new(),
        grace: drain + Duration::from_secs(5),
    };
    let mut metrics = Vec::new();
    let mut prefill_addrs = Vec::new();
    let mut decode_addrs = Vec::new();
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
        let (child, addrs) =
            spawn_pinned(&name, &role_args, 1 + usize::from(serves_metrics), cpus)?;
        if let Some(at) = addrs.get(1) {
            metrics.push((name.clone(), *at));
        }
        match role {
            RoleName::Decode => decode_addrs.push(addrs[0]),
            _ => prefill_addrs.push(addrs[0]),
        }
        children.procs.push((name, child));
    }
    let mut coord_args = vec!["coordinator".to_string()];
    for (flag, value) in args.child_flags(RoleName::Coordinator) {
        coord_args.extend([flag.into(), value]);
    }
    if !args.discovery.dynamic() {
        for a in &prefill_addrs {
            coord_args.extend(["--prefill-worker".into(), a.to_string()]);
        }
        for a in &decode_addrs {
            coord_args.extend(["--decode-worker".into(), a.to_string()]);
        }
    }
    let (child, addrs) = spawn("coordinator", &coord_args, 2)?;
    children.procs.push(("coordinator".into(), child));
    let (grpc, http) = (addrs[0], addrs[1]);
    // Listening is not serving: the coordinator answers 503 until it has seen a healthy worker
    // of each kind it needs, so "up" waits for it to report ready before saying so.
    wait_ready(grpc, READY_WAIT)?;
    // Before the endpoints are printed: whoever reads them may signal at once.
    stop.serving();
    if args.colocated {
        println!(
            "baton is up (colocated): {} colocated workers, each prefilling and decoding its own requests",
            args.decode
        );
    } else {
        println!(
            "baton is up: {n_prefill} prefill + {} decode workers",
            args.decode
        );
    }
    println!(
        "  OpenAI HTTP  http://{http}/v1   (health /health, readiness /ready, metrics /metrics)"
    );
    println!("  gRPC         {grpc}   (baton.v1.Inference, reflection on)");
    for (name, at) in &metrics {
        println!("  {name:<12} metrics http://{at}/metrics");
    }
    println!("Ctrl-C stops the cluster.");

    // Watch for a child that dies on its own.
    loop {
        if let Ok(why) = stop.rx.recv_timeout(Duration::from_millis(200)) {
            println!("baton up: stopping ({why})");
            break;
        }
        let mut died = None;
        for (name, c) in &mut children.procs {
            if let Ok(Some(status)) = c.try_wait() {
                died = Some(format!("{name} exited with {status}"));
                break;
            }
        }
        if let Some(why) = died {
            eprintln!("baton up: {why}; stopping the cluster");
            children.stop();
            bail!("{why}");
        }
    }
    children.stop();
    Ok(())
}

/// What a SIGINT or SIGTERM does to `up`. Its handlers are installed (tokio keeps them for the
/// life of the process) before the first child starts and owned by a small runtime on its own
/// thread. Until [`StopSignal::serving`] a signal ends `up` at once, and the children, whose
/// parent-death signal is SIGTERM, drain and exit on their own; from then on it is a reason on
/// [`StopSignal::rx`] and `up` stops every child itself.
struct StopSignal {
    rx: mpsc::Receiver<String>,
    serving: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StopSignal {
    fn install() -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
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
        let serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let started = serving.clone();
        std::thread::spawn(move || {
            let (why, signo) = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => ("SIGINT", libc::SIGINT),
                    _ = term.recv() => ("SIGTERM", libc::SIGTERM),
                }
            });
            if !started.load(Ordering::Acquire) {
                eprintln!("baton up: {why} while starting; the started children stop on their own");
                std::process::exit(128 + signo);
            }
            let _ = tx.send(why.to_string());
        });
        Ok(Self { rx, serving })
    }

    /// From now on a signal is handled by whoever reads [`StopSignal::rx`].
    fn serving(&self) {
        self.serving
            .store(true, std::sync::atomic::Ordering::Release);
    }
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

//! `baton up`: a whole local cluster as separate OS processes on loopback: N prefill workers and
//! M decode workers (ports chosen by the OS, read from each child's `listening` line), then the
//! coordinator on the configured HTTP and gRPC ports. Prints the endpoints, and stops every
//! child on Ctrl-C, on SIGTERM, or as soon as any child dies.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct UpArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model, fetched
    /// by scripts/fetch-model.sh when missing).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// OpenAI-compatible HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// gRPC address (baton.v1.Inference).
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// push | pull
    #[arg(long, default_value = "push")]
    handoff: String,
    /// auto | tcp | shm
    #[arg(long, default_value = "auto")]
    transport: String,
    /// KV pool per worker, MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// On SIGTERM, how long a worker's in-flight work may take before it is cancelled, in
    /// milliseconds.
    #[arg(long, default_value_t = 30_000)]
    drain_timeout_ms: u64,
    #[command(flatten)]
    telemetry: crate::roles::TelemetryArgs,
}

struct Children {
    procs: Vec<(String, Child)>,
    /// How long children may take to stop after SIGTERM: the workers' drain deadline and a
    /// margin.
    grace: Duration,
}

impl Children {
    /// SIGTERM to everyone, then wait up to the grace period; SIGKILL whoever is still there.
    fn stop(&mut self) {
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

fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) on a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Starts `baton <args>` and returns it with the address from its first `listening` line.
fn spawn(name: &str, args: &[String]) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    let exe = std::env::current_exe().context("find the baton executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: prctl in the child between fork and exec only sets a flag of that process.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            // The child dies with `baton up`, even if `up` is killed without cleaning up.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
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
                // The coordinator announces two listeners (gRPC, HTTP); workers two too
                // (gRPC, metrics).
                if !sent && addrs.len() == 2 {
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

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let model = crate::model_path::resolve(args.model)?;
    let model_arg = model.display().to_string();
    let mut children = Children {
        procs: Vec::new(),
        grace: Duration::from_millis(args.drain_timeout_ms) + Duration::from_secs(5),
    };
    let mut prefill_addrs = Vec::new();
    let mut metrics = Vec::new();
    let mut decode_addrs = Vec::new();
    let kv_mib = args.kv_cache_mib.to_string();
    let workers = (0..args.decode)
        .map(|i| ("decode", i))
        .chain((0..args.prefill).map(|i| ("prefill", i)));
    for (role, i) in workers {
        let name = format!("{role}-{i}");
        let mut role_args: Vec<String> = vec![
            role.into(),
            "--model".into(),
            model_arg.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--kv-cache-mib".into(),
            kv_mib.clone(),
            "--worker-id".into(),
            name.clone(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--drain-timeout-ms".into(),
            args.drain_timeout_ms.to_string(),
        ];
        role_args.extend(args.telemetry.to_args());
        if role == "decode" {
            // Shared memory for prefill workers on this host.
            let socket =
                std::env::temp_dir().join(format!("baton-{}-{name}.sock", std::process::id()));
            role_args.extend(["--kv-shm-socket".into(), socket.display().to_string()]);
        }
        let (child, addrs) = spawn(&name, &role_args)?;
        metrics.push((name.clone(), addrs[1]));
        match role {
            "decode" => decode_addrs.push(addrs[0]),
            _ => prefill_addrs.push(addrs[0]),
        }
        children.procs.push((name, child));
    }
    let mut coord_args = vec![
        "coordinator".to_string(),
        "--model".into(),
        model_arg,
        "--grpc".into(),
        args.grpc.to_string(),
        "--http".into(),
        args.http.to_string(),
        "--handoff".into(),
        args.handoff,
        "--transport".into(),
        args.transport,
    ];
    coord_args.extend(args.telemetry.to_args());
    for a in &prefill_addrs {
        coord_args.extend(["--prefill-worker".into(), a.to_string()]);
    }
    for a in &decode_addrs {
        coord_args.extend(["--decode-worker".into(), a.to_string()]);
    }
    let (child, addrs) = spawn("coordinator", &coord_args)?;
    children.procs.push(("coordinator".into(), child));
    let (grpc, http) = (addrs[0], addrs[1]);
    println!(
        "baton is up: {} prefill + {} decode workers",
        args.prefill, args.decode
    );
    println!(
        "  OpenAI HTTP  http://{http}/v1   (health /health, readiness /ready, metrics /metrics)"
    );
    println!("  gRPC         {grpc}   (baton.v1.Inference, reflection on)");
    for (name, at) in &metrics {
        println!("  {name:<12} metrics http://{at}/metrics");
    }
    println!("Ctrl-C stops the cluster.");

    let (stop_tx, stop_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        if wait_for_signal() {
            let _ = stop_tx.send("signal".into());
        }
    });
    // Watch for a child that dies on its own.
    loop {
        if let Ok(why) = stop_rx.recv_timeout(Duration::from_millis(200)) {
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

/// Blocks this thread until SIGINT or SIGTERM arrives (a tiny runtime owns the handlers).
fn wait_for_signal() -> bool {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    rt.block_on(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return false;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => true,
            _ = term.recv() => true,
        }
    })
}

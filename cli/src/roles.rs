//! `baton prefill | decode | coordinator`: one role per process. Each loads its configuration
//! (defaults < `--config FILE` < `BATON_*` env < flags, see `config.rs`), validates it before
//! binding anything, binds its listener, prints one `listening ...` line on stdout (what `baton
//! up` reads to learn ports chosen by the OS), serves until SIGINT or SIGTERM, and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{Flags, Loaded, RoleName, Sources};

/// Where a role's configuration comes from besides its named flags. Named flags and `--set`
/// override `BATON_*` environment variables, which override the file.
#[derive(clap::Args, Clone, Default)]
pub struct ConfigArgs {
    /// A TOML config file, one table per role (see baton.toml at the repository root).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Sets any config key, e.g. `--set decode.engine.max_running=32`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The layers, with the named flags `named` adds and this role's `--set`s on top.
    pub fn sources(
        &self,
        role: Option<RoleName>,
        named: impl FnOnce(&mut Flags),
    ) -> anyhow::Result<Sources> {
        let mut sources = Sources::from_process(self.config.clone());
        named(&mut sources.flags);
        sources.flags.set_args(role, &self.set)?;
        Ok(sources)
    }
}

/// Engine settings every worker role takes as flags; each sets the key in its comment under
/// the role's table, and only when given.
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// A .gguf file or a Hugging Face model directory (engine.model; default: $BATON_MODEL,
    /// else the development model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto | quantized | f32 | f16 (engine.weights; default auto: f32 for prefill, quantized
    /// for decode).
    #[arg(long)]
    pub weights: Option<String>,
    /// cpu, or cuda:N with a build that has the `cuda` feature (engine.device; default cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// KV block pool, in MiB (engine.kv_cache_mib; default 512).
    #[arg(long)]
    pub kv_cache_mib: Option<String>,
    /// Longest prompt slice one step computes, a multiple of the block size
    /// (engine.prefill_chunk_tokens; default 512).
    #[arg(long)]
    pub prefill_chunk_tokens: Option<String>,
    /// Cap on the context length (engine.max_context; default: the model's).
    #[arg(long)]
    pub max_context: Option<String>,
}

impl EngineArgs {
    fn flags(&self, role: &str, f: &mut Flags) {
        let key = |k: &str| format!("{role}.engine.{k}");
        f.named(
            &key("model"),
            "--model",
            self.model.as_ref().map(|p| p.display()),
        );
        f.named(&key("weights"), "--weights", self.weights.as_ref());
        f.named(&key("device"), "--device", self.device.as_ref());
        f.named(
            &key("kv_cache_mib"),
            "--kv-cache-mib",
            self.kv_cache_mib.as_ref(),
        );
        f.named(
            &key("prefill_chunk_tokens"),
            "--prefill-chunk-tokens",
            self.prefill_chunk_tokens.as_ref(),
        );
        f.named(
            &key("max_context"),
            "--max-context",
            self.max_context.as_ref(),
        );
    }
}

/// Logs and traces, the same flags for every role (`<role>.telemetry.*`).
#[derive(clap::Args, Clone, Default)]
pub struct TelemetryArgs {
    /// human | json: how log lines are written to stderr (telemetry.log_format; default
    /// human).
    #[arg(long)]
    pub log_format: Option<String>,
    /// OTLP/gRPC collector that receives this process's spans, e.g. http://127.0.0.1:4317
    /// (telemetry.otlp_endpoint; default: none).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    fn flags(&self, role: &str, f: &mut Flags) {
        f.named(
            &format!("{role}.telemetry.log_format"),
            "--log-format",
            self.log_format.as_ref(),
        );
        f.named(
            &format!("{role}.telemetry.otlp_endpoint"),
            "--otlp-endpoint",
            self.otlp_endpoint.as_ref(),
        );
    }
}

/// Settings both worker roles take besides the engine's.
#[derive(clap::Args, Clone)]
pub struct WorkerArgs {
    /// Prometheus /metrics address; port 0 lets the OS choose, the chosen one is printed
    /// (metrics_listen; default 127.0.0.1:9061 for prefill, 127.0.0.1:9071 for decode).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Serve no /metrics endpoint (metrics = false).
    #[arg(long, conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
    /// On SIGTERM, how long in-flight work may take before it is cancelled, in milliseconds
    /// (drain_timeout; default 30000).
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Where the KV transfer agent accepts TCP connections (kv.tcp_listen; default
    /// 127.0.0.1:0).
    #[arg(long)]
    pub kv_listen: Option<String>,
    /// Unix socket of the KV transfer agent, for workers on this host to use shared memory
    /// (kv.shm_socket; default: none, shared memory off).
    #[arg(long)]
    pub kv_shm_socket: Option<PathBuf>,
}

impl WorkerArgs {
    fn flags(&self, role: &str, f: &mut Flags) {
        f.named(
            &format!("{role}.metrics_listen"),
            "--metrics-listen",
            self.metrics_listen.as_ref(),
        );
        f.named(
            &format!("{role}.metrics"),
            "--no-metrics",
            self.no_metrics.then_some("false"),
        );
        f.named(
            &format!("{role}.drain_timeout"),
            "--drain-timeout-ms",
            self.drain_timeout_ms.map(|ms| format!("{ms}ms")),
        );
        f.named(
            &format!("{role}.kv.tcp_listen"),
            "--kv-listen",
            self.kv_listen.as_ref(),
        );
        f.named(
            &format!("{role}.kv.shm_socket"),
            "--kv-shm-socket",
            self.kv_shm_socket.as_ref().map(|p| p.display()),
        );
    }
}

/// How workers are found (`[<role>.discovery]`), for every role.
#[derive(clap::Args, Clone)]
pub struct DiscoveryArgs {
    /// static | mdns | etcd: how coordinators find workers (discovery.backend; default
    /// static). mdns and etcd need --cluster-key-file.
    #[arg(long)]
    pub discovery: Option<String>,
    /// The cluster's name; adverts of other clusters are ignored (discovery.cluster; default
    /// baton).
    #[arg(long)]
    pub cluster: Option<String>,
    /// File holding the cluster key that signs every advert, at least 16 bytes
    /// (discovery.cluster_key_file).
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// An etcd client URL; repeat for several (discovery.etcd.endpoints; default
    /// http://127.0.0.1:2379).
    #[arg(long = "etcd-endpoint")]
    pub etcd_endpoints: Vec<String>,
    /// Workers: the address other machines reach this worker at (discovery.advertise_host).
    #[arg(long)]
    pub advertise_host: Option<String>,
}

impl DiscoveryArgs {
    /// Whether a backend other than `static` was asked for on the command line.
    pub fn dynamic(&self) -> bool {
        self.discovery.as_deref().is_some_and(|d| d != "static")
    }

    /// The flags as given, to pass on to a child process.
    pub fn as_flags(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut one = |flag, v: Option<String>| {
            if let Some(v) = v {
                out.push((flag, v));
            }
        };
        one("--discovery", self.discovery.clone());
        one("--cluster", self.cluster.clone());
        one(
            "--cluster-key-file",
            self.cluster_key_file
                .as_ref()
                .map(|p| p.display().to_string()),
        );
        for e in &self.etcd_endpoints {
            out.push(("--etcd-endpoint", e.clone()));
        }
        out
    }

    pub(crate) fn flags(&self, role: &str, f: &mut Flags) {
        let key = |k: &str| format!("{role}.discovery.{k}");
        f.named(&key("backend"), "--discovery", self.discovery.as_ref());
        f.named(&key("cluster"), "--cluster", self.cluster.as_ref());
        f.named(
            &key("cluster_key_file"),
            "--cluster-key-file",
            self.cluster_key_file.as_ref().map(|p| p.display()),
        );
        f.list(
            &key("etcd.endpoints"),
            "--etcd-endpoint",
            &self.etcd_endpoints,
        );
        f.named(
            &key("advertise_host"),
            "--advertise-host",
            self.advertise_host.as_ref(),
        );
    }
}

/// Installs this process's logs and span export.
fn telemetry(
    config: &baton_telemetry::TelemetryConfig,
    role: &str,
    instance: Option<&str>,
) -> anyhow::Result<baton_telemetry::Telemetry> {
    let service = baton_telemetry::ServiceName {
        name: format!("baton-{role}"),
        instance: instance.map(str::to_string),
    };
    Ok(baton_telemetry::init(config, &service)?)
}

#[derive(clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// gRPC address; port 0 lets the OS choose, the chosen one is printed (prefill.listen;
    /// default 127.0.0.1:50061).
    #[arg(long)]
    pub listen: Option<String>,
    /// Name in logs, metrics and placements (prefill.worker_id).
    #[arg(long)]
    pub worker_id: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the effective configuration (TOML, secrets redacted) and exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

impl PrefillArgs {
    fn sources(&self) -> anyhow::Result<Sources> {
        self.config.sources(Some(RoleName::Prefill), |f| {
            self.engine.flags("prefill", f);
            self.worker.flags("prefill", f);
            self.telemetry.flags("prefill", f);
            self.discovery.flags("prefill", f);
            f.named("prefill.listen", "--listen", self.listen.as_ref());
            f.named("prefill.worker_id", "--worker-id", self.worker_id.as_ref());
        })
    }
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// gRPC address; port 0 lets the OS choose, the chosen one is printed (decode.listen;
    /// default 127.0.0.1:50071).
    #[arg(long)]
    pub listen: Option<String>,
    /// fail | recompute: what happens to a stream whose KV transfer fails
    /// (decode.kv_failure_policy; default fail).
    #[arg(long)]
    pub kv_failure_policy: Option<String>,
    /// Name in logs, metrics and placements (decode.worker_id).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Run as a group of this many tensor-parallel rank processes per pipeline stage
    /// (decode.group.tp; default 1).
    #[arg(long)]
    pub tp: Option<usize>,
    /// Split the model's layers over this many pipeline stages, a rank process each
    /// (decode.group.pp; default 1).
    #[arg(long)]
    pub pp: Option<usize>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the effective configuration (TOML, secrets redacted) and exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

impl DecodeArgs {
    fn sources(&self) -> anyhow::Result<Sources> {
        self.config.sources(Some(RoleName::Decode), |f| {
            self.engine.flags("decode", f);
            self.worker.flags("decode", f);
            self.telemetry.flags("decode", f);
            self.discovery.flags("decode", f);
            f.named("decode.listen", "--listen", self.listen.as_ref());
            f.named(
                "decode.kv_failure_policy",
                "--kv-failure-policy",
                self.kv_failure_policy.as_ref(),
            );
            f.named("decode.worker_id", "--worker-id", self.worker_id.as_ref());
            f.named("decode.group.tp", "--tp", self.tp.as_ref());
            f.named("decode.group.pp", "--pp", self.pp.as_ref());
        })
    }
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// The model whose tokenizer and chat template requests use; no weights are loaded
    /// (coordinator.model; default: $BATON_MODEL, else the development model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The API's model name (coordinator.model_name; default: the model file's stem).
    #[arg(long)]
    pub model_name: Option<String>,
    /// gRPC address (coordinator.grpc_listen; default 127.0.0.1:50051).
    #[arg(long)]
    pub grpc: Option<String>,
    /// OpenAI HTTP address (coordinator.http_listen; default 127.0.0.1:8080).
    #[arg(long)]
    pub http: Option<String>,
    /// A prefill worker's gRPC address; repeat for several (coordinator.prefill_workers).
    #[arg(long = "prefill-worker")]
    pub prefill_workers: Vec<String>,
    /// A decode worker's gRPC address; repeat for several; at least one is needed
    /// (coordinator.decode_workers).
    #[arg(long = "decode-worker")]
    pub decode_workers: Vec<String>,
    /// push | pull (coordinator.handoff; default push).
    #[arg(long)]
    pub handoff: Option<String>,
    /// auto | tcp | shm (coordinator.transport; default auto).
    #[arg(long)]
    pub transport: Option<String>,
    /// Prompts shorter than this run on the decode worker alone under pd_mode auto
    /// (coordinator.min_disaggregated_tokens; default 32).
    #[arg(long)]
    pub min_disaggregated_tokens: Option<String>,
    /// Requests admitted at once; more get 429 / RESOURCE_EXHAUSTED (coordinator.max_inflight;
    /// default 256).
    #[arg(long)]
    pub max_inflight: Option<String>,
    /// Time to live of a handoff's pinned blocks, in milliseconds, renewed while KV flows
    /// (coordinator.lease_ttl; default 10000).
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the effective configuration (TOML, secrets redacted) and exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

impl CoordinatorArgs {
    fn sources(&self) -> anyhow::Result<Sources> {
        self.config.sources(Some(RoleName::Coordinator), |f| {
            self.telemetry.flags("coordinator", f);
            self.discovery.flags("coordinator", f);
            f.named(
                "coordinator.model",
                "--model",
                self.model.as_ref().map(|p| p.display()),
            );
            f.named(
                "coordinator.model_name",
                "--model-name",
                self.model_name.as_ref(),
            );
            f.named("coordinator.grpc_listen", "--grpc", self.grpc.as_ref());
            f.named("coordinator.http_listen", "--http", self.http.as_ref());
            f.list(
                "coordinator.prefill_workers",
                "--prefill-worker",
                &self.prefill_workers,
            );
            f.list(
                "coordinator.decode_workers",
                "--decode-worker",
                &self.decode_workers,
            );
            f.named("coordinator.handoff", "--handoff", self.handoff.as_ref());
            f.named(
                "coordinator.transport",
                "--transport",
                self.transport.as_ref(),
            );
            f.named(
                "coordinator.min_disaggregated_tokens",
                "--min-disaggregated-tokens",
                self.min_disaggregated_tokens.as_ref(),
            );
            f.named(
                "coordinator.max_inflight",
                "--max-inflight",
                self.max_inflight.as_ref(),
            );
            f.named(
                "coordinator.lease_ttl",
                "--lease-ttl-ms",
                self.lease_ttl_ms.map(|ms| format!("{ms}ms")),
            );
        })
    }
}

/// Loads and validates one role's configuration. With `print`, prints it (even when it does
/// not validate, before the error) and returns `None`.
pub fn configure(sources: &Sources, role: RoleName, print: bool) -> anyhow::Result<Option<Loaded>> {
    let loaded = crate::config::load(sources)?;
    let valid = loaded.validate(role);
    if print {
        let mut shown = loaded.config.clone();
        crate::config::show_default_models(&mut shown);
        print!("{}", crate::config::to_toml(&shown, role)?);
        valid?;
        return Ok(None);
    }
    valid?;
    Ok(Some(loaded))
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves on either.
/// Called before the role announces itself: whoever reads the `listening` line may signal at
/// once, and that must be a clean shutdown, not the default action.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))
}

fn announce(what: &str, addr: SocketAddr) {
    // One line, flushed: `baton up` reads it from a pipe.
    println!("listening {what}={addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Binds the metrics listener (when metrics are on) and announces it after the gRPC one.
async fn bind_metrics(at: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match at {
        Some(at) => {
            let listener = bind(at).await?;
            announce("metrics", listener.local_addr()?);
            Ok(Some(listener))
        }
        None => Ok(None),
    }
}

pub fn prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let Some(loaded) = configure(&args.sources()?, RoleName::Prefill, args.print_config)? else {
        return Ok(());
    };
    let mut config = loaded.config.prefill;
    let _telemetry = telemetry(&config.telemetry, "prefill", config.worker_id.as_deref())?;
    config.engine.model = crate::config::resolve_model(&config.engine.model)?;
    runtime()?.block_on(async {
        let stop = shutdown_signal()?;
        let listener = bind(config.listen).await?;
        announce("grpc", listener.local_addr()?);
        let metrics = bind_metrics(config.metrics.then_some(config.metrics_listen)).await?;
        baton_prefill_worker::serve_with_metrics(config, listener, metrics, stop)
            .await
            .context("prefill worker")
    })
}

pub fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let Some(loaded) = configure(&args.sources()?, RoleName::Decode, args.print_config)? else {
        return Ok(());
    };
    let mut config = loaded.config.decode;
    let _telemetry = telemetry(&config.telemetry, "decode", config.worker_id.as_deref())?;
    config.engine.model = crate::config::resolve_model(&config.engine.model)?;
    runtime()?.block_on(async {
        let stop = shutdown_signal()?;
        let listener = bind(config.listen).await?;
        announce("grpc", listener.local_addr()?);
        let metrics = bind_metrics(config.metrics.then_some(config.metrics_listen)).await?;
        baton_decode_worker::serve_with_metrics(config, listener, metrics, stop)
            .await
            .context("decode worker")
    })
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let Some(loaded) = configure(&args.sources()?, RoleName::Coordinator, args.print_config)?
    else {
        return Ok(());
    };
    let mut config = loaded.config.coordinator;
    let _telemetry = telemetry(&config.telemetry, "coordinator", None)?;
    config.model = crate::config::resolve_model(&config.model)?;
    runtime()?.block_on(async {
        let stop = shutdown_signal()?;
        let grpc = bind(config.grpc_listen).await?;
        let http = bind(config.http_listen).await?;
        announce("grpc", grpc.local_addr()?);
        announce("http", http.local_addr()?);
        baton_coordinator::serve(config, grpc, http, stop)
            .await
            .context("coordinator")
    })
}

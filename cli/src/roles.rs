//! `baton prefill | decode | coordinator`: one role per process. Each binds its listener, prints
//! one `listening ...` line on stdout (what `baton up` reads to learn ports chosen by the OS),
//! serves until SIGINT or SIGTERM, and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use baton_coordinator::{CoordinatorConfig, HandoffShape, TransportChoice};
use baton_decode_worker::{DecodeConfig, KvFailurePolicy};
use baton_engine::{EngineConfig, Role, WeightsSetting};
use baton_prefill_worker::PrefillConfig;
use baton_telemetry::{LogFormat, Telemetry, TelemetryConfig};
use tokio::net::TcpListener;

/// Engine settings every worker role takes.
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto | quantized | f32 | f16 (auto: f32 for prefill, quantized for decode).
    #[arg(long, default_value = "auto")]
    pub weights: WeightsSetting,
    /// cpu, or cuda:N with a build that has the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: baton_engine::DeviceSetting,
    /// Bytes of KV block pool, in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mib: usize,
    /// Longest prompt slice one step computes (a multiple of the 16-token block).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk_tokens: usize,
    /// Cap on the context length (default: the model's).
    #[arg(long)]
    pub max_context: Option<usize>,
}

impl EngineArgs {
    fn config(&self, role: Role) -> anyhow::Result<EngineConfig> {
        let model = crate::model_path::resolve(self.model.clone())?;
        let mut cfg = EngineConfig::new(model, role);
        cfg.weights = self.weights;
        cfg.device = self.device;
        cfg.kv_cache_bytes = self.kv_cache_mib << 20;
        cfg.prefill_chunk_tokens = self.prefill_chunk_tokens;
        cfg.max_batch_tokens = cfg.max_batch_tokens.max(self.prefill_chunk_tokens);
        cfg.max_context = self.max_context;
        Ok(cfg)
    }
}

/// Logs and traces, the same for every role.
#[derive(clap::Args, Clone)]
pub struct TelemetryArgs {
    /// human | json: how log lines are written to stderr.
    #[arg(long, default_value = "human")]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector that receives this process's spans (e.g. http://127.0.0.1:4317);
    /// none exports no spans.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// Installs this process's logs and span export for `role`.
    pub fn init(&self, role: &str, instance: Option<&str>) -> anyhow::Result<Telemetry> {
        let mut config = TelemetryConfig::new(format!("baton-{role}"));
        config.instance_id = instance.map(str::to_string);
        config.log_format = self.log_format;
        config.otlp_endpoint = self.otlp_endpoint.clone();
        Ok(baton_telemetry::init(&config)?)
    }

    /// The same settings as flags, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--log-format".into(), self.log_format.to_string()];
        if let Some(e) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".into(), e.clone()]);
        }
        args
    }
}

/// Settings both worker roles take besides the engine's.
#[derive(clap::Args, Clone)]
pub struct WorkerArgs {
    /// Prometheus /metrics address (port 0 lets the OS choose; the chosen one is printed).
    /// Default: 127.0.0.1:9061 for prefill workers, 127.0.0.1:9071 for decode workers.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve no /metrics endpoint.
    #[arg(long, conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
    /// On SIGTERM, how long in-flight work may take before it is cancelled, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
}

impl WorkerArgs {
    fn metrics(&self, default: Option<SocketAddr>) -> Option<SocketAddr> {
        if self.no_metrics {
            None
        } else {
            self.metrics_listen.or(default)
        }
    }
}

#[derive(clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// gRPC address (port 0 lets the OS choose; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    #[arg(long)]
    pub worker_id: Option<String>,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// gRPC address (port 0 lets the OS choose; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50071")]
    pub listen: SocketAddr,
    /// Where the TCP KV receiver listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub kv_listen: SocketAddr,
    /// Unix socket of the shared-memory KV receiver, for prefill workers on this host; none
    /// turns shared memory off.
    #[arg(long)]
    pub kv_shm_socket: Option<PathBuf>,
    /// fail | recompute: what happens to a stream whose KV transfer fails.
    #[arg(long, default_value = "fail")]
    pub kv_failure_policy: KvFailurePolicy,
    #[arg(long)]
    pub worker_id: Option<String>,
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// The model whose tokenizer and chat template requests use (no weights are loaded).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The API's model name (default: the model file's stem).
    #[arg(long)]
    pub model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// A prefill worker's gRPC address; repeat for several.
    #[arg(long = "prefill-worker")]
    pub prefill_workers: Vec<String>,
    /// A decode worker's gRPC address; repeat for several.
    #[arg(long = "decode-worker", required = true)]
    pub decode_workers: Vec<String>,
    /// push | pull
    #[arg(long, default_value = "push")]
    pub handoff: HandoffShape,
    /// auto | tcp | shm
    #[arg(long, default_value = "auto")]
    pub transport: TransportChoice,
    /// Prompts shorter than this run on the decode worker alone (pd_mode auto).
    #[arg(long, default_value_t = 32)]
    pub min_disaggregated_tokens: usize,
    /// Requests admitted at once; more get 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// Time to live of a handoff's pinned blocks, in milliseconds (renewed while KV flows).
    #[arg(long, default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
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
    let _telemetry = args.telemetry.init("prefill", args.worker_id.as_deref())?;
    let mut config = PrefillConfig::new(args.engine.config(Role::Prefill)?);
    config.listen = args.listen;
    config.worker_id = args.worker_id;
    config.metrics_listen = args.worker.metrics(config.metrics_listen);
    config.drain_timeout = Duration::from_millis(args.worker.drain_timeout_ms);
    runtime()?.block_on(async {
        let listener = bind(config.listen).await?;
        announce("grpc", listener.local_addr()?);
        let metrics = bind_metrics(config.metrics_listen).await?;
        baton_prefill_worker::serve_with_metrics(config, listener, metrics, shutdown_signal())
            .await
            .context("prefill worker")
    })
}

pub fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let _telemetry = args.telemetry.init("decode", args.worker_id.as_deref())?;
    let mut config = DecodeConfig::new(args.engine.config(Role::Decode)?);
    config.metrics_listen = args.worker.metrics(config.metrics_listen);
    config.drain_timeout = Duration::from_millis(args.worker.drain_timeout_ms);
    config.listen = args.listen;
    config.kv_tcp_listen = args.kv_listen;
    config.kv_shm_socket = args.kv_shm_socket;
    config.kv_failure_policy = args.kv_failure_policy;
    config.worker_id = args.worker_id;
    runtime()?.block_on(async {
        let listener = bind(config.listen).await?;
        announce("grpc", listener.local_addr()?);
        let metrics = bind_metrics(config.metrics_listen).await?;
        baton_decode_worker::serve_with_metrics(config, listener, metrics, shutdown_signal())
            .await
            .context("decode worker")
    })
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let _telemetry = args.telemetry.init("coordinator", None)?;
    let model = crate::model_path::resolve(args.model)?;
    let mut config = CoordinatorConfig::new(model);
    config.model_name = args.model_name;
    config.prefill_workers = args.prefill_workers;
    config.decode_workers = args.decode_workers;
    config.handoff = args.handoff;
    config.transport = args.transport;
    config.min_disaggregated_tokens = args.min_disaggregated_tokens;
    config.max_inflight = args.max_inflight;
    config.lease_ttl = Duration::from_millis(args.lease_ttl_ms);
    config.load_poll_interval = Duration::from_millis(250);
    runtime()?.block_on(async {
        let grpc = bind(args.grpc).await?;
        let http = bind(args.http).await?;
        announce("grpc", grpc.local_addr()?);
        announce("http", http.local_addr()?);
        baton_coordinator::serve(config, grpc, http, shutdown_signal())
            .await
            .context("coordinator")
    })
}

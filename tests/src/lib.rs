//! End-to-end harness: a real cluster in this process (prefill worker, decode worker and
//! coordinators, each a real gRPC/HTTP server on 127.0.0.1:0), the single-process reference
//! it must match, and small clients.
//!
//! test --gRPC/HTTP--> coordinator --> prefill worker --KV (tcp | shm)--> decode worker
//!
//! Readiness is awaited through `grpc.health.v1` Watch on the coordinator (it reports SERVING
//! once its workers are healthy), never by sleeping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use baton_coordinator::{CoordinatorConfig, HandoffShape, TransportChoice};
use baton_decode_worker::DecodeConfig;
use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::{Engine, EngineConfig, Role, SamplingParams, SeqId};
use baton_prefill_worker::PrefillConfig;
use baton_proto::tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use baton_proto::v1::{
    self, GenerateFinish, LoadRequest, decode_worker_client::DecodeWorkerClient,
    inference_client::InferenceClient, prefill_worker_client::PrefillWorkerClient,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Upper bound on any wait; reaching it is a failure, not pacing.
pub const LIMIT: Duration = Duration::from_secs(120);

/// The development model, fetched by `scripts/fetch-model.sh` when missing.
pub fn dev_model() -> PathBuf {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Token ids of the development model's vocabulary, mixed from real text so attention sees
/// something natural; `n` tokens long.
pub fn prompt_of(n: usize, salt: u32) -> Vec<u32> {
    const TEXT: &[u32] = &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28, 665, 4161, 504, 3575,
        282, 4649, 314, 1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681,
        46477, 1230, 7996, 198,
    ];
    (0..n)
        .map(|i| TEXT[(i + salt as usize * 7) % TEXT.len()])
        .collect()
}

/// Engine settings shared by the cluster's workers and the reference, so numerics agree.
pub fn engine_config(role: Role, kv_mib: usize) -> EngineConfig {
    let mut cfg = EngineConfig::new(dev_model(), role);
    cfg.kv_cache_bytes = kv_mib << 20;
    cfg
}

pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_new_tokens: max_tokens,
        ..SamplingParams::default()
    }
}

/// Greedy outputs of one process running prefill and decode with the per-phase weights a
/// cluster uses: the reference a cluster must equal token for token.
pub fn reference(prompts: &[Vec<u32>], max_tokens: u32) -> Vec<Vec<u32>> {
    let engine = Engine::load(engine_config(Role::Colocated, 256)).expect("load reference engine");
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    let mut batcher = Batcher::new(engine, eos);
    let mut out = vec![Vec::new(); prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        batcher
            .submit(GenerateRequest {
                id: SeqId(i as u64),
                prompt: p.clone(),
                params: greedy(max_tokens),
            })
            .expect("submit");
        while !batcher.is_idle() {
            for ev in batcher.step().expect("step") {
                match ev {
                    Event::Token { seq, token, .. } => out[seq.0 as usize].push(token.id),
                    Event::Failed { error, .. } => panic!("reference failed: {error}"),
                }
            }
        }
    }
    out
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A prefill and a decode worker serving in this process.
pub struct Workers {
    pub prefill: SocketAddr,
    pub decode: SocketAddr,
    pub kv_bytes_per_token: u64,
    stops: Vec<oneshot::Sender<()>>,
    shm_dir: PathBuf,
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

impl Workers {
    /// Starts both workers; each pool holds `kv_mib` MiB of KV.
    pub async fn start(kv_mib: usize) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let shm_dir = std::env::temp_dir().join(format!("baton-e2e-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&shm_dir).expect("shm socket dir");
        let mut stops = Vec::new();

        let (pl, prefill) = listener().await;
        let mut config = PrefillConfig::new(engine_config(Role::Prefill, kv_mib));
        config.kv.shm_socket = Some(shm_dir.join("prefill.sock"));
        config.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        tokio::spawn(async move {
            if let Err(e) = baton_prefill_worker::serve(config, pl, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("prefill worker failed: {e}");
            }
        });

        let (dl, decode) = listener().await;
        let mut config = DecodeConfig::new(engine_config(Role::Decode, kv_mib));
        config.kv.shm_socket = Some(shm_dir.join("decode.sock"));
        config.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        tokio::spawn(async move {
            if let Err(e) = baton_decode_worker::serve(config, dl, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("decode worker failed: {e}");
            }
        });

        // Info answers once the engine is loaded (the listener queues connections until then).
        let info = tokio::time::timeout(LIMIT, async {
            DecodeWorkerClient::new(channel(decode))
                .info(v1::InfoRequest {})
                .await
        })
        .await
        .expect("decode worker start within the limit")
        .expect("decode worker info")
        .into_inner();
        let layout = info.layout.expect("layout");
        let per_token = u64::from(layout.num_layers)
            * 2
            * u64::from(layout.kv_head_end - layout.kv_head_start)
            * u64::from(layout.head_dim)
            * 4;
        Self {
            prefill,
            decode,
            kv_bytes_per_token: per_token,
            stops,
            shm_dir,
        }
    }

    /// Free and total blocks of (prefill, decode), as the workers report now.
    pub async fn pools(&self) -> ((u32, u32), (u32, u32)) {
        let p = PrefillWorkerClient::new(channel(self.prefill))
            .load(LoadRequest::default())
            .await
            .expect("prefill load")
            .into_inner();
        let d = DecodeWorkerClient::new(channel(self.decode))
            .load(LoadRequest::default())
            .await
            .expect("decode load")
            .into_inner();
        (
            (p.free_blocks, p.total_blocks),
            (d.free_blocks, d.total_blocks),
        )
    }

    /// Waits (by asking, within `limit`) until both pools are full again.
    pub async fn await_pools_full(&self, limit: Duration) {
        let result = tokio::time::timeout(limit, async {
            loop {
                let ((pf, pt), (df, dt)) = self.pools().await;
                if pf == pt && df == dt {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        if result.is_err() {
            let pools = self.pools().await;
            panic!("pools not full within {limit:?}: (free, total) prefill, decode = {pools:?}");
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        let _ = std::fs::remove_dir_all(&self.shm_dir);
    }
}

pub fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

/// A coordinator serving in this process.
pub struct Coordinator {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Coordinator {
    /// Starts a coordinator over `workers` and waits until it reports SERVING.
    pub async fn start(
        workers: &Workers,
        handoff: HandoffShape,
        transport: TransportChoice,
        tweak: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let c = Self::spawn(workers, handoff, transport, tweak).await;
        c.await_serving().await;
        c
    }

    /// Starts a coordinator over `workers` without waiting for it to be ready.
    pub async fn spawn(
        workers: &Workers,
        handoff: HandoffShape,
        transport: TransportChoice,
        tweak: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let (gl, grpc) = listener().await;
        let (hl, http) = listener().await;
        let mut config = CoordinatorConfig::new(dev_model());
        config.prefill_workers = vec![workers.prefill.to_string()];
        config.decode_workers = vec![workers.decode.to_string()];
        config.handoff = handoff;
        config.transport = transport;
        config.load_poll_interval = Duration::from_millis(50);
        tweak(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = baton_coordinator::serve(config, gl, hl, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("coordinator failed: {e}");
            }
        });
        Self {
            grpc,
            http,
            stop: Some(tx),
        }
    }

    async fn await_serving(&self) {
        let mut health = HealthClient::new(channel(self.grpc));
        let watched = tokio::time::timeout(LIMIT, async {
            let mut stream = health
                .watch(HealthCheckRequest {
                    service: "baton.v1.Inference".into(),
                })
                .await
                .expect("health watch")
                .into_inner();
            while let Some(status) = stream.message().await.expect("health stream") {
                if status.status == 1 {
                    return;
                }
            }
            panic!("health stream ended before SERVING");
        })
        .await;
        watched.expect("coordinator ready within the limit");
    }

    pub fn client(&self) -> InferenceClient<tonic::transport::Channel> {
        InferenceClient::new(channel(self.grpc))
    }

    /// Generates from token ids; returns the tokens and the finish message.
    pub async fn generate(
        &self,
        prompt: &[u32],
        max_tokens: u32,
        pd_mode: v1::PdMode,
    ) -> Result<(Vec<u32>, GenerateFinish), tonic::Status> {
        let mut stream = self
            .client()
            .generate(v1::GenerateRequest {
                input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: prompt.to_vec(),
                })),
                sampling: Some(v1::SamplingParams {
                    temperature: Some(0.0),
                    max_tokens: Some(max_tokens),
                    ..Default::default()
                }),
                pd_mode: pd_mode as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut tokens = Vec::new();
        while let Some(m) = stream.message().await? {
            tokens.extend(m.token_ids);
            if let Some(f) = m.finish {
                return Ok((tokens, f));
            }
        }
        Err(tonic::Status::internal("stream ended without a finish"))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A raw HTTP/1.1 POST; returns (status, body). Bodies are small JSON.
pub async fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    http_request(addr, "POST", path, "", body).await
}

/// A raw HTTP/1.1 POST with extra header lines (`"Authorization: Bearer x\r\n"`).
pub async fn http_post_with(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    http_request(addr, "POST", path, headers, body).await
}

/// A raw HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "", "").await
}

async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if status == 429 {
        assert!(
            head.to_ascii_lowercase().contains("retry-after:"),
            "429 without Retry-After: {head}"
        );
    }
    (status, body.to_string())
}

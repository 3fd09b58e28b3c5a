//! `baton kv-demo`: one prompt's KV moved between a real prefill worker and a real decode worker
//! (two `baton` processes), over each transport and shape, with no coordinator, and the decode
//! side's tokens compared with the same prompt generated in this process.
//!
//! ```text
//! this process: the reference run (one engine), then per run:
//!   push: decode --Decode(push)--> reserved blocks --> prefill --Prefill(push into them)-->
//!         the prefill agent writes every layer into the decode pool; tokens stream back
//!   pull: prefill --Prefill(pull)--> pinned source --> decode --Decode(pull from it)-->
//!         the decode agent asks, the prefill agent writes; tokens stream back
//! ```
//!
//! Every run prints `MATCH ...` or `MISMATCH ...`, the bytes each side counted and the time the
//! transfer took; the command fails if any run mismatched or moved other than the prompt's KV
//! (`layers x kv_layer_bytes(prompt)` bytes).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::sampling::SamplingParams;
use baton_engine::{Engine, EngineConfig, Role, SeqId};
use baton_proto::v1::{
    self, decode_worker_client::DecodeWorkerClient, prefill_worker_client::PrefillWorkerClient,
};
use tonic::transport::Channel;

use crate::up::{Children, spawn};

#[derive(clap::Args)]
pub struct KvDemoArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Transport(s) to demonstrate.
    #[arg(long, value_enum, default_value = "both")]
    transport: TransportArg,
    /// Handoff shape(s) to demonstrate.
    #[arg(long, value_enum, default_value = "both")]
    shape: ShapeArg,
    /// Prompt length in tokens (English text, repeated as needed).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to generate, counting the first one, which the prefill worker samples.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    Tcp,
    Shm,
    Both,
}

impl TransportArg {
    fn transports(self) -> Vec<v1::Transport> {
        match self {
            TransportArg::Tcp => vec![v1::Transport::Tcp],
            TransportArg::Shm => vec![v1::Transport::Shm],
            TransportArg::Both => vec![v1::Transport::Tcp, v1::Transport::Shm],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeArg {
    Push,
    Pull,
    Both,
}

impl ShapeArg {
    fn shapes(self) -> Vec<v1::HandoffShape> {
        match self {
            ShapeArg::Push => vec![v1::HandoffShape::Push],
            ShapeArg::Pull => vec![v1::HandoffShape::Pull],
            ShapeArg::Both => vec![v1::HandoffShape::Push, v1::HandoffShape::Pull],
        }
    }
}

/// What one run produced.
struct RunResult {
    tokens: Vec<u32>,
    sent: u64,
    received: u64,
    took: Duration,
    /// Prompt tokens the decode worker's prefix cache held (an earlier run's blocks): not moved.
    cached: u32,
}

pub fn run(args: KvDemoArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 || args.max_tokens == 0 {
        bail!("--prompt-tokens and --max-tokens must be at least 1");
    }
    let model = crate::model_path::resolve(args.model.clone())?;
    let params = SamplingParams {
        max_new_tokens: args.max_tokens,
        ignore_eos: true,
        seed: Some(7),
        ..SamplingParams::default()
    };

    // The reference: the same prompt in one engine, as `baton generate --local` runs it.
    let mut cfg = EngineConfig::new(&model, Role::Colocated);
    cfg.kv_cache_bytes = 128 << 20;
    let engine = Engine::load(cfg).context("load the reference engine")?;
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let base = engine.tokenizer().encode(&text, false)?;
    let prompt: Vec<u32> = base
        .iter()
        .copied()
        .cycle()
        .take(args.prompt_tokens)
        .collect();
    let layers = engine.model_config().num_layers as u64;
    let kv_bytes = layers * engine.kv_layer_bytes(prompt.len()) as u64;
    let reference = generate_here(engine, &prompt, &params)?;
    println!(
        "prompt: {} tokens; reference (one process): {:?}",
        prompt.len(),
        reference
    );
    println!(
        "kv of the prompt: {layers} layers x kv_layer_bytes({}) = {kv_bytes} B",
        prompt.len()
    );

    // The two workers, each with shared memory for the other.
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let worker = |role: &str| -> anyhow::Result<(std::process::Child, std::net::SocketAddr)> {
        let socket = dir.join(format!("baton-kv-demo-{pid}-{role}.sock"));
        let args: Vec<String> = [
            role,
            "--model",
            &model.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--kv-cache-mib",
            "128",
            "--worker-id",
            &format!("kv-demo-{role}"),
            "--kv-shm-socket",
            &socket.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, addrs) = spawn(role, &args, 1)?;
        Ok((child, addrs[0]))
    };
    let mut children = Children {
        procs: Vec::new(),
        grace: Duration::from_secs(10),
    };
    let (p_child, p_addr) = worker("prefill")?;
    children.procs.push(("prefill".into(), p_child));
    let (d_child, d_addr) = worker("decode")?;
    children.procs.push(("decode".into(), d_child));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut failed = Vec::new();
    let mut handoff = 0u64;
    for transport in args.transport.transports() {
        for shape in args.shape.shapes() {
            handoff += 1;
            let name = format!(
                "{} {}",
                transport_name(transport),
                if shape == v1::HandoffShape::Push {
                    "push"
                } else {
                    "pull"
                }
            );
            let result = rt.block_on(handoff_run(
                p_addr, d_addr, transport, shape, handoff, &prompt, &params,
            ));
            println!();
            println!("== {name} (handoff {handoff}) ==");
            match result {
                Ok(r) => {
                    println!("kv sent        {} B (the prefill worker's count)", r.sent);
                    println!(
                        "kv received    {} B in {:.1} ms (the decode worker's count)",
                        r.received,
                        r.took.as_secs_f64() * 1e3
                    );
                    println!(
                        "kv cached      {} tokens (the decode worker held them from an earlier run; not moved)",
                        r.cached
                    );
                    println!("tokens         {:?}", r.tokens);
                    let same = r.tokens == reference;
                    // Exactly the KV of the tokens the decode worker did not hold.
                    let expected = kv_bytes / prompt.len() as u64
                        * (prompt.len() as u64 - u64::from(r.cached));
                    let exact = r.sent == expected && r.received == expected;
                    if same && exact {
                        println!(
                            "MATCH {name}: {} tokens equal the single process",
                            r.tokens.len()
                        );
                    } else {
                        println!(
                            "MISMATCH {name}: tokens equal: {same}; bytes exact: {exact} (expected {expected})"
                        );
                        failed.push(name);
                    }
                }
                Err(e) => {
                    println!("MISMATCH {name}: {e:#}");
                    failed.push(name);
                }
            }
        }
    }
    drop(children);
    if !failed.is_empty() {
        bail!(
            "kv-demo: {} run(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn transport_name(t: v1::Transport) -> &'static str {
    match t {
        v1::Transport::Shm => "shm",
        _ => "tcp",
    }
}

/// The prompt generated in one engine: the first token and the rest, as the cluster streams
/// them.
fn generate_here(
    engine: Engine,
    prompt: &[u32],
    params: &SamplingParams,
) -> anyhow::Result<Vec<u32>> {
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    let mut batcher = Batcher::new(engine, eos);
    batcher.submit(GenerateRequest {
        id: SeqId(0),
        prompt: prompt.to_vec(),
        params: params.clone(),
    })?;
    let mut tokens = Vec::new();
    while !batcher.is_idle() {
        for event in batcher.step()? {
            match event {
                Event::Token { token, .. } => tokens.push(token.id),
                Event::Failed { error, .. } => bail!("reference run failed: {error}"),
            }
        }
    }
    Ok(tokens)
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// One handoff through the two workers' gRPC APIs and transfer agents.
async fn handoff_run(
    p_addr: std::net::SocketAddr,
    d_addr: std::net::SocketAddr,
    transport: v1::Transport,
    shape: v1::HandoffShape,
    handoff: u64,
    prompt: &[u32],
    params: &SamplingParams,
) -> anyhow::Result<RunResult> {
    let mut p = PrefillWorkerClient::new(channel(p_addr).await?);
    let mut d = DecodeWorkerClient::new(channel(d_addr).await?);
    let sampling = baton_proto::convert::sampling_to_proto(params);
    let request_id = format!("kv-demo-{handoff}");
    let started = Instant::now();
    let (first, mut stream) = if shape == v1::HandoffShape::Push {
        let mut stream = d
            .decode(v1::DecodeRequest {
                request_id: request_id.clone(),
                sampling: Some(sampling.clone()),
                source: Some(v1::decode_request::Source::Push(v1::PushSource {
                    handoff_id: handoff,
                    prompt_token_ids: prompt.to_vec(),
                    transport: transport as i32,
                    ttl_ms: 10_000,
                })),
                generated_token_ids: Vec::new(),
            })
            .await
            .context("the decode worker's Decode (push)")?
            .into_inner();
        let reserved = stream
            .message()
            .await?
            .and_then(|m| m.reserved)
            .context("the decode stream's first message carries the reserved blocks")?;
        let prefilled = p
            .prefill(v1::PrefillRequest {
                request_id,
                prompt_token_ids: prompt.to_vec(),
                sampling: Some(sampling),
                handoff: Some(v1::prefill_request::Handoff::Push(v1::PushTarget {
                    handoff_id: handoff,
                    destination: Some(reserved),
                    transport: transport as i32,
                    ttl_ms: 10_000,
                })),
            })
            .await
            .context("the prefill worker's Prefill (push)")?
            .into_inner();
        (prefilled.first_token, stream)
    } else {
        let prefilled = p
            .prefill(v1::PrefillRequest {
                request_id: request_id.clone(),
                prompt_token_ids: prompt.to_vec(),
                sampling: Some(sampling.clone()),
                handoff: Some(v1::prefill_request::Handoff::Pull(v1::PullLease {
                    handoff_id: handoff,
                    ttl_ms: 10_000,
                })),
            })
            .await
            .context("the prefill worker's Prefill (pull)")?
            .into_inner();
        let stream = d
            .decode(v1::DecodeRequest {
                request_id,
                sampling: Some(sampling),
                source: Some(v1::decode_request::Source::Pull(v1::PullSource {
                    handoff_id: handoff,
                    source: prefilled.source,
                    prompt_token_ids: prompt.to_vec(),
                    transport: transport as i32,
                    ttl_ms: 10_000,
                })),
                generated_token_ids: Vec::new(),
            })
            .await
            .context("the decode worker's Decode (pull)")?
            .into_inner();
        (prefilled.first_token, stream)
    };
    let first = first.context("the prefill worker sampled no first token")?;
    let mut tokens = vec![first.token_id];
    loop {
        let message = stream
            .message()
            .await
            .context("the decode stream")?
            .context("the decode stream ended without a finish")?;
        tokens.extend(message.tokens.iter().map(|t| t.token_id));
        if let Some(finish) = message.finish {
            let (received, cached) = finish.kv.map_or((0, 0), |k| (k.bytes, k.cached_tokens));
            let (sent, took) = finish.source_kv.map_or((0, Duration::ZERO), |k| {
                (k.bytes, Duration::from_secs_f64(k.transfer_seconds))
            });
            let took = if took.is_zero() {
                started.elapsed()
            } else {
                took
            };
            return Ok(RunResult {
                tokens,
                sent,
                received,
                cached,
                took,
            });
        }
    }
}

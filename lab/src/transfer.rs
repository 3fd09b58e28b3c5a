//! `baton-lab transfer`: the transfer agent's backends on a real prompt's KV, each beside its
//! baseline measured in the same process and the same repeat.
//!
//! For each prompt length a prefill engine computes the prompt; its KV stays in the engine's
//! pool (baton-owned host memory) in the blocks the engine gave it. A second pool, shareable (a
//! memfd, as a decode worker with shared memory allocates it), receives it. Per layer the same
//! byte copies (`memory::layer_copies`, from the sequence's blocks to the destination's) are
//! moved by:
//!
//! - memcpy: the copies on one thread, pool to pool (the one-copy floor);
//! - raw TCP: the same bytes over one loopback TCP stream, read into a buffer (the TCP floor);
//! - baton shm: the prefill side's agent copies straight into the mapped destination pool and
//!   hands each layer's `Landed` notice to a task that sends it (as a prefill worker's engine
//!   thread hands it to its sender task); the destination agent admits the ranges (it copies
//!   nothing) and reports the arrival. With `--shm-checksums` the copy computes each range's
//!   crc32c as it goes and the destination checks it in place;
//! - baton tcp: owned bytes per layer as write frames over the link's streams; the destination
//!   agent reads each admitted frame straight into its pool and checks its crc.
//!
//! A baton figure runs from the first byte handed over to the destination's `Arrived` event
//! (every byte verified), and the CPU each side spent is measured: the sending thread's own
//! CPU time, and the rest of the process's (the agents' tasks, mostly the receiver) over the
//! same interval. Ratios are taken within each repeat (baseline and baton back to back, which
//! goes first alternating) and the figure is their median with quartiles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_bench::metrics::percentile;
use baton_core::{BlockId, HandoffId, WorkerId};
use baton_engine::{Engine, EngineConfig, Phase, Role, SeqId, StepItem};
use baton_kv_transfer::Endpoint;
use baton_kv_transfer::agent::{Agent, Event, Expectation, HostPool, KvConfig, KvRegion, Peer};
use baton_kv_transfer::memory::{ByteCopy, HostRegion, PoolLayout, SeqBlocks, layer_copies};
use baton_kv_transfer::wire::Notice;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct TransferArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    json: bool,
    /// Timed repeats (after one warm-up); each moves the prompt's KV by every method, each
    /// transport back to back with its baseline.
    #[arg(long, default_value_t = 21)]
    repeats: usize,
    /// Prompt lengths to measure; a length at or past the model's context is cut to the longest
    /// prompt it accepts.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    prompt_tokens: Vec<usize>,
    /// The sending agent checksums its shared-memory copies (`shm_checksums = true` in
    /// `[prefill.kv]`) and the receiver checks them in place.
    #[arg(long)]
    shm_checksums: bool,
}

/// The target for one-copy shared memory against memcpy.
const TARGET_SHM_OVER_MEMCPY: f64 = 0.90;

/// One method's timing and CPU in one repeat.
#[derive(Debug, Clone, Copy, Default)]
struct Timed {
    secs: f64,
    /// CPU seconds of the sending thread.
    send_cpu: f64,
    /// CPU seconds of the rest of the process (the agents' tasks: receiving, verifying).
    other_cpu: f64,
}

/// This thread's CPU time so far.
fn thread_cpu() -> f64 {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The process's CPU time so far.
fn process_cpu() -> f64 {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A side of the measurement: an agent over a pool.
struct Side {
    agent: Agent,
    events: mpsc::Receiver<Event>,
    pool: PoolLayout,
}

pub fn run(args: TransferArgs) -> anyhow::Result<()> {
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    ensure!(
        !args.prompt_tokens.is_empty() && !args.prompt_tokens.contains(&0),
        "--prompt-tokens must list positive lengths"
    );
    let model = baton::model_path::resolve(args.model.clone())?;
    let mut cfg = EngineConfig::new(&model, Role::Prefill);
    let longest = args.prompt_tokens.iter().copied().max().unwrap_or(512);
    cfg.kv_cache_bytes = (longest + 64) * 30 * 2 * 3 * 64 * 4 + (64 << 20);
    let mut engine = Engine::load(cfg.clone()).context("load the prefill engine")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The engine's own pool: the sending side reads the prompt's blocks where the engine wrote
    // them.
    let src_memory = engine.kv_region();
    let src_host = src_memory
        .host()
        .context("the prefill pool is not host memory (cpu_kernels = baton is needed)")?;
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let (src, dst) = rt.block_on(async {
        let src = side_over("lab-prefill", src_memory.clone(), None, args.shm_checksums).await?;
        let dst_pool = src_memory.pool().clone();
        let len = dst_pool.region_bytes() as usize;
        let region = Arc::new(HostRegion::shared(len, "baton-lab-decode")?);
        let memory = Arc::new(HostPool {
            region: region.clone(),
            pool: dst_pool,
        });
        let dst = side_over(
            "lab-decode",
            memory,
            Some(dir.join(format!("baton-lab-{pid}-d.sock"))),
            false,
        )
        .await?;
        anyhow::Ok((src, (dst, region)))
    })?;
    let (mut dst, dst_region) = dst;
    let tcp_peer = rt.block_on(src.agent.connect(&endpoint(&dst, true)))?;
    let shm_peer = rt.block_on(src.agent.connect(&endpoint(&dst, false)))?;
    ensure!(
        shm_peer.direct(),
        "the shm link did not map the destination pool"
    );
    let (raw_tx, raw_rx) = rt.block_on(raw_pair())?;
    let mut raw = (raw_tx, raw_rx);

    let mut report = Vec::new();
    println!(
        "baton-lab transfer — {} ({} repeats; destination pool {} MiB, shareable; shm {})",
        model.display(),
        args.repeats,
        src.pool.region_bytes() >> 20,
        if args.shm_checksums {
            "checksummed"
        } else {
            "unchecked"
        },
    );
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(400);
    let base = engine.tokenizer().encode(&text, false)?;
    for (i, &asked) in args.prompt_tokens.iter().enumerate() {
        let n = asked.min(engine.max_context() - 1);
        let prompt: Vec<u32> = base.iter().copied().cycle().take(n).collect();
        let seq = SeqId(i as u64);
        engine.add_sequence(seq, prompt.clone())?;
        while engine.computed(seq)? < n {
            let left = n - engine.computed(seq)?;
            engine.step(&[StepItem {
                seq,
                tokens: left.min(cfg.prefill_chunk_tokens),
                phase: Phase::Prefill,
            }])?;
        }
        let src_blocks = engine.block_ids(seq)?.to_vec();
        // Destination blocks: the same count, elsewhere in the pool, in order.
        let dst_blocks: Vec<BlockId> = (0..src_blocks.len() as u32)
            .map(|b| BlockId(src.pool.num_blocks - 1 - b))
            .rev()
            .collect();
        let per_layer: Vec<Vec<ByteCopy>> = (0..src.pool.layers())
            .map(|layer| {
                let mut out = Vec::new();
                layer_copies(
                    layer,
                    &src.pool.layout.kv_heads,
                    &(0..src_blocks.len() as u32),
                    n as u32,
                    SeqBlocks {
                        pool: &src.pool,
                        blocks: &src_blocks,
                    },
                    SeqBlocks {
                        pool: &dst.pool,
                        blocks: &dst_blocks,
                    },
                    &mut out,
                );
                out
            })
            .collect();
        let bytes: u64 = per_layer.iter().flatten().map(|c| c.len).sum();
        let mut runs: Vec<[Timed; 4]> = Vec::new();
        let mut handoff = (i as u64) << 32;
        for repeat in 0..=args.repeats {
            let mut t = [Timed::default(); 4];
            let order: [usize; 4] = if repeat % 2 == 0 {
                [0, 2, 1, 3]
            } else {
                [2, 0, 3, 1]
            };
            for m in order {
                handoff += 1;
                t[m] = match m {
                    0 => memcpy(src_host, &dst_region, &per_layer),
                    1 => rt.block_on(raw_tcp(&mut raw, src_host, &per_layer))?,
                    _ => rt.block_on(baton(
                        &mut dst,
                        if m == 2 { &shm_peer } else { &tcp_peer },
                        HandoffId(handoff),
                        &per_layer,
                        src_host,
                        n as u32,
                        &dst_blocks,
                    ))?,
                };
            }
            // The first repeat warms caches and pages; it is not counted.
            if repeat > 0 {
                runs.push(t);
            }
        }
        engine.release(seq);
        report.push(summarize(n, bytes, &runs));
    }
    drop((tcp_peer, shm_peer, src, dst));
    drop(src_memory);
    print_report(&report, args.json);
    Ok(())
}

fn endpoint(side: &Side, tcp: bool) -> Endpoint {
    side.agent
        .endpoints()
        .into_iter()
        .find(|e| matches!(e, Endpoint::Tcp(_)) == tcp)
        .expect("endpoint")
}

async fn side_over(
    name: &str,
    memory: Arc<dyn KvRegion>,
    shm: Option<PathBuf>,
    shm_checksums: bool,
) -> anyhow::Result<Side> {
    let pool = memory.pool().clone();
    let config = KvConfig {
        shm_socket: shm,
        shm_checksums,
        ..KvConfig::default()
    };
    let (agent, events) =
        Agent::start(WorkerId::parse(name).expect("id"), memory, config, None).await?;
    Ok(Side {
        agent,
        events,
        pool,
    })
}

fn memcpy(src: &HostRegion, dst: &HostRegion, per_layer: &[Vec<ByteCopy>]) -> Timed {
    let (c0, t0) = (thread_cpu(), Instant::now());
    for copies in per_layer {
        for c in copies {
            // SAFETY: the measurement owns both regions; the ranges are disjoint blocks.
            unsafe {
                let from = src.bytes(c.src, c.len as usize).expect("inside");
                let to = dst.bytes_mut(c.dst, c.len as usize).expect("inside");
                to.copy_from_slice(from);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Timed {
        secs,
        send_cpu: thread_cpu() - c0,
        other_cpu: 0.0,
    }
}

async fn raw_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let a = a?;
    let (b, _) = b?;
    a.set_nodelay(true)?;
    Ok((a, b))
}

async fn raw_tcp(
    raw: &mut (TcpStream, TcpStream),
    src: &HostRegion,
    per_layer: &[Vec<ByteCopy>],
) -> anyhow::Result<Timed> {
    let total: u64 = per_layer.iter().flatten().map(|c| c.len).sum();
    let (tx, rx) = raw;
    let (c0, p0, t0) = (thread_cpu(), process_cpu(), Instant::now());
    let reader = async {
        let mut buf = vec![0u8; 1 << 20];
        let mut left = total as usize;
        while left > 0 {
            let n = rx.read(&mut buf[..left.min(1 << 20)]).await?;
            anyhow::ensure!(n > 0, "raw stream closed");
            left -= n;
        }
        anyhow::Ok(())
    };
    let writer = async {
        for copies in per_layer {
            for c in copies {
                // SAFETY: nothing writes the source pool while it is read.
                let bytes = unsafe { src.bytes(c.src, c.len as usize) }.context("inside")?;
                tx.write_all(bytes).await?;
            }
        }
        anyhow::Ok(())
    };
    let (r, w) = tokio::join!(reader, writer);
    r?;
    w?;
    let secs = t0.elapsed().as_secs_f64();
    let send = thread_cpu() - c0;
    Ok(Timed {
        secs,
        send_cpu: send,
        other_cpu: (process_cpu() - p0 - send).max(0.0),
    })
}

/// One handoff over `peer`: every layer's copies (direct for shm, owned frames for tcp), the
/// completion, and the destination's arrival.
async fn baton(
    dst: &mut Side,
    peer: &Peer,
    handoff: HandoffId,
    per_layer: &[Vec<ByteCopy>],
    src: &HostRegion,
    tokens: u32,
    dst_blocks: &[BlockId],
) -> anyhow::Result<Timed> {
    dst.agent.expect(
        handoff,
        Expectation {
            tokens,
            layers: dst.pool.layout.layers.clone(),
            heads: dst.pool.layout.kv_heads.clone(),
            blocks: dst_blocks.to_vec(),
            guard: Arc::new(()),
        },
    )?;
    if peer.direct() {
        peer.begin(handoff).await?;
    }
    let complete = || Notice::Complete {
        bytes: 0,
        transfer_us: 0,
        completion: Vec::new(),
    };
    let (c0, p0, t0) = (thread_cpu(), process_cpu(), Instant::now());
    if peer.direct() {
        // As the prefill worker does: its engine thread copies each layer and hands the
        // layer's `Landed` notice to its sender task, so the next layer's copy does not wait
        // on a socket; the same task sends `Complete` after the last.
        let (notices, mut queued) = mpsc::channel(per_layer.len().max(1));
        let notifier = {
            let peer = peer.clone();
            tokio::spawn(async move {
                while let Some((layer, ranges)) = queued.recv().await {
                    peer.landed(handoff, layer, ranges).await?;
                }
                peer.notify(handoff, &complete()).await?;
                anyhow::Ok(())
            })
        };
        for (layer, copies) in per_layer.iter().enumerate() {
            let ranges = peer.write_direct(copies)?;
            notices
                .try_send((layer as u32, ranges))
                .map_err(|_| anyhow::anyhow!("the notice task ended early"))?;
        }
        drop(notices);
        notifier.await??;
    } else {
        for (layer, copies) in per_layer.iter().enumerate() {
            // The owned bytes a prefill worker's engine thread hands its sender.
            let pieces: Vec<(u64, Vec<u8>)> = copies
                .iter()
                .map(|c| {
                    // SAFETY: nothing writes the source pool while it is read.
                    let b = unsafe { src.bytes(c.src, c.len as usize) }.expect("inside");
                    (c.dst, b.to_vec())
                })
                .collect();
            peer.write(handoff, layer as u32, &pieces).await?;
        }
        peer.notify(handoff, &complete()).await?;
    }
    let send = thread_cpu() - c0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), dst.events.recv())
            .await
            .context("arrival within a minute")?
            .context("agent alive")?;
        match event {
            Event::Arrived { handoff: h, .. } if h == handoff => break,
            Event::Failed { error, .. } => bail!("transfer failed: {error}"),
            _ => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Timed {
        secs,
        send_cpu: send,
        other_cpu: (process_cpu() - p0 - send).max(0.0),
    })
}

struct Summary {
    tokens: usize,
    bytes: u64,
    /// Median GB/s per method: memcpy, raw tcp, baton shm, baton tcp.
    gbps: [f64; 4],
    /// shm over memcpy and tcp over raw tcp: median, p25, p75 of the per-repeat ratios.
    shm_ratio: (f64, f64, f64),
    tcp_ratio: (f64, f64, f64),
    /// CPU seconds per GB, (sending thread, rest of the process), medians.
    cpu_per_gb: [(f64, f64); 4],
}

fn summarize(tokens: usize, bytes: u64, runs: &[[Timed; 4]]) -> Summary {
    let gb = bytes as f64 / 1e9;
    let med = |f: &dyn Fn(&[Timed; 4]) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (
            percentile(&v, 50.0),
            percentile(&v, 25.0),
            percentile(&v, 75.0),
        )
    };
    let gbps = std::array::from_fn(|m| med(&|t| gb / t[m].secs).0);
    let cpu_per_gb = std::array::from_fn(|m| {
        (
            med(&|t| t[m].send_cpu / gb).0,
            med(&|t| t[m].other_cpu / gb).0,
        )
    });
    Summary {
        tokens,
        bytes,
        gbps,
        shm_ratio: med(&|t| t[0].secs / t[2].secs),
        tcp_ratio: med(&|t| t[1].secs / t[3].secs),
        cpu_per_gb,
    }
}

fn print_report(report: &[Summary], as_json: bool) {
    const NAMES: [&str; 4] = ["memcpy", "raw_tcp", "baton_shm", "baton_tcp"];
    if as_json {
        let rows: Vec<_> = report
            .iter()
            .map(|s| {
                json!({
                    "prompt_tokens": s.tokens,
                    "kv_bytes": s.bytes,
                    "gb_per_s": NAMES.iter().zip(s.gbps).map(|(n, g)| (n.to_string(), json!(g))).collect::<serde_json::Map<_, _>>(),
                    "shm_over_memcpy": {"median": s.shm_ratio.0, "p25": s.shm_ratio.1, "p75": s.shm_ratio.2},
                    "tcp_over_raw_tcp": {"median": s.tcp_ratio.0, "p25": s.tcp_ratio.1, "p75": s.tcp_ratio.2},
                    "cpu_s_per_gb": NAMES.iter().zip(s.cpu_per_gb).map(|(n, (a, b))| (n.to_string(), json!({"sender_thread": a, "rest_of_process": b}))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        println!("{}", json!({ "runs": rows }));
        return;
    }
    println!();
    println!(
        "{:>7} {:>10} | {:>7} {:>7} {:>7} {:>7} GB/s | {:>21} {:>21}",
        "tokens",
        "kv MiB",
        "memcpy",
        "raw tcp",
        "shm",
        "tcp",
        "shm/memcpy (p25-p75)",
        "tcp/raw tcp (p25-p75)"
    );
    for s in report {
        println!(
            "{:>7} {:>10.1} | {:>7.2} {:>7.2} {:>7.2} {:>7.2}      | {:>6.2} ({:.2}-{:.2})    {:>6.2} ({:.2}-{:.2})",
            s.tokens,
            s.bytes as f64 / (1 << 20) as f64,
            s.gbps[0],
            s.gbps[1],
            s.gbps[2],
            s.gbps[3],
            s.shm_ratio.0,
            s.shm_ratio.1,
            s.shm_ratio.2,
            s.tcp_ratio.0,
            s.tcp_ratio.1,
            s.tcp_ratio.2,
        );
    }
    println!();
    println!(
        "CPU seconds per GB moved (sending thread / rest of the process: the agents' receiving and verifying tasks)"
    );
    for s in report {
        let row: Vec<String> = NAMES
            .iter()
            .zip(s.cpu_per_gb)
            .map(|(n, (a, b))| format!("{n} {a:.3}/{b:.3}"))
            .collect();
        println!("{:>7} tokens: {}", s.tokens, row.join("  "));
    }
    println!();
    println!(
        "target: shm >= {TARGET_SHM_OVER_MEMCPY:.2} of memcpy with one copy (the receiving side copies nothing)"
    );
}

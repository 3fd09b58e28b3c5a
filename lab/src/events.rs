//! `baton-lab events`: how many event-plane messages one coordinator absorbs, and at what CPU
//! cost, from N publishing workers.
//!
//! ```text
//! N simulated workers (this process): gRPC Info/Load + ZeroMQ PUB of signed WorkerEvents,
//!   each message carrying K new KV events from the worker's own KvEventLog
//!     --> `baton coordinator` (its own process, static list + cluster key: it subscribes)
//! ```
//!
//! For each (N, offered rate) the publishers send for a fixed window; the coordinator's own
//! counters (`baton_events_received_total`, `_gaps_`, `_resyncs_`, the lag histogram
//! `baton_event_lag_seconds`, `process_cpu_seconds_total`) are read before and after, so the
//! figures are what the coordinator applied and what it cost, against what was offered in the
//! same window. The simulated workers are not baton workers: they hold no model and answer only
//! `Info` and `Load`, so the coordinator's placement never runs; only this experiment starts
//! them, on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_core::{BlockHash, KvEvent, KvEventLog};
use baton_discovery::ClusterKey;
use baton_discovery::events::EventPublisher;
use baton_proto::convert::kv_events_to_proto;
use baton_proto::v1::{
    self, DecodeRequest, DecodeResponse, DisconnectRequest, DisconnectResponse, InfoRequest,
    LoadReport, LoadRequest, WorkerInfo,
    decode_worker_server::{DecodeWorker, DecodeWorkerServer},
};
use prost::Message;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use baton::up::{Children, spawn};

/// Blocks a simulated worker's pool holds: its KV index may grow to this many names.
const POOL_BLOCKS: u32 = 1 << 20;

/// A simulated worker's log window, as a real worker's.
const LOG_WINDOW: usize = 8192;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Publishing workers, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    publishers: Vec<usize>,
    /// Messages per second offered by all publishers together, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,8000,20000")]
    rates: Vec<u64>,
    /// KV events per message (new blocks stored; once a worker holds 4096, as many evicted).
    #[arg(long, default_value_t = 8)]
    kv_events: usize,
    /// Measured seconds per run (after the coordinator has subscribed to every publisher).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The coordinator's model (its tokenizer; no weights are loaded).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct Run {
    publishers: usize,
    offered_per_s: f64,
    applied_per_s: f64,
    kv_events_per_s: f64,
    gaps: f64,
    resyncs: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    cpu_ms_per_1000_messages: f64,
    cpu_ms_per_1000_kv_events: f64,
    coordinator_cpu_share: f64,
}

/// One simulated worker: its log, and the service that answers `Info` and `Load` from it.
struct Simulated {
    log: Arc<Mutex<KvEventLog>>,
    info: WorkerInfo,
}

#[tonic::async_trait]
impl DecodeWorker for SimulatedService {
    type DecodeStream = tokio_stream::Empty<Result<DecodeResponse, Status>>;

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.0.info.clone()))
    }

    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<LoadReport>, Status> {
        Ok(Response::new(report(&self.0.log, request.get_ref())))
    }

    /// No KV agent here, so no link to close.
    async fn disconnect_peer(
        &self,
        _: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        Ok(Response::new(DisconnectResponse {
            was_connected: false,
        }))
    }

    async fn decode(
        &self,
        _: Request<DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        Err(Status::unimplemented(
            "a simulated event publisher serves no requests",
        ))
    }
}

#[derive(Clone)]
struct SimulatedService(Arc<Simulated>);

fn report(log: &Mutex<KvEventLog>, request: &LoadRequest) -> LoadReport {
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    let held = log.len() as u32;
    LoadReport {
        free_blocks: POOL_BLOCKS - held,
        total_blocks: POOL_BLOCKS,
        kv_events: request.kv_events.then(|| {
            kv_events_to_proto(&log.since(request.kv_events_epoch, request.kv_events_after))
        }),
        ..Default::default()
    }
}

/// Starts worker `i`: its gRPC service and its publisher; returns the gRPC address and the
/// publisher, whose messages the caller drives.
async fn simulated(
    i: usize,
    key: ClusterKey,
) -> anyhow::Result<(SocketAddr, EventPublisher, Arc<Simulated>)> {
    let publisher = EventPublisher::bind("127.0.0.1:0".parse()?, key).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let worker = Arc::new(Simulated {
        log: Arc::new(Mutex::new(KvEventLog::new(rand_epoch(i), LOG_WINDOW))),
        info: WorkerInfo {
            worker_id: format!("sim-{i}"),
            role: v1::WorkerRole::Decode as i32,
            layout: Some(v1::LayoutDescriptor {
                fingerprint: b"baton-lab simulated event source".to_vec(),
                ..Default::default()
            }),
            max_context: 2048,
            block_size: 16,
            total_blocks: POOL_BLOCKS,
            event_port: u32::from(publisher.port()),
            ..Default::default()
        },
    });
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(DecodeWorkerServer::new(SimulatedService(worker.clone())))
            .serve_with_incoming(baton_proto::incoming(listener)),
    );
    Ok((address, publisher, worker))
}

fn rand_epoch(i: usize) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(i);
    h.finish()
}

/// Publishes from one worker at `per_s` messages per second until `stop`, each message with
/// `k` new KV events; counts what it sent into `sent`.
async fn drive(
    mut publisher: EventPublisher,
    worker: Arc<Simulated>,
    per_s: f64,
    k: usize,
    sent: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut epoch, mut after, mut seq, mut next_block) = (u64::MAX, 0u64, 0u64, 0u64);
    let id = worker.info.worker_id.clone();
    while !*stop.borrow() {
        tick.tick().await;
        let load = {
            let mut log = worker.log.lock().unwrap_or_else(|p| p.into_inner());
            let mut events = Vec::with_capacity(2 * k);
            for _ in 0..k {
                events.push(KvEvent::Stored(block(&id, next_block)));
                if next_block >= 4096 {
                    events.push(KvEvent::Removed(block(&id, next_block - 4096)));
                }
                next_block += 1;
            }
            log.record(events);
            drop(log);
            report(
                &worker.log,
                &LoadRequest {
                    kv_events: true,
                    kv_events_epoch: epoch,
                    kv_events_after: after,
                },
            )
        };
        if let Some(kv) = &load.kv_events {
            (epoch, after) = (kv.epoch, kv.next);
        }
        seq += 1;
        let message = v1::WorkerEvent {
            worker_id: id.clone(),
            epoch,
            seq,
            sent_ms: baton_discovery::advert::now_ms(),
            load: Some(load),
        };
        if publisher.publish(message.encode_to_vec()).await.is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn block(worker: &str, n: u64) -> BlockHash {
    let digest = blake3::hash(format!("{worker}/{n}").as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest.as_bytes()[..16]);
    BlockHash(out)
}

/// The coordinator's counters that matter here, from its `/metrics`.
#[derive(Debug, Default, Clone)]
struct Scrape {
    received: f64,
    gaps: f64,
    resyncs: f64,
    cpu_s: f64,
    /// Cumulative lag histogram: (upper bound in seconds, count).
    lag: Vec<(f64, f64)>,
}

fn scrape(http: SocketAddr) -> anyhow::Result<Scrape> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http)?;
    // HTTP/1.0: the body comes whole, never in chunks that could split a line.
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let mut s = Scrape::default();
    for line in text.lines() {
        let mut parts = line.rsplitn(2, ' ');
        let (Some(value), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "baton_events_received_total" => s.received = value,
            "baton_events_gaps_total" => s.gaps = value,
            "baton_events_resyncs_total" => s.resyncs = value,
            "process_cpu_seconds_total" => s.cpu_s = value,
            _ => {
                if let Some(le) = name
                    .strip_prefix("baton_event_lag_seconds_bucket{le=\"")
                    .and_then(|r| r.strip_suffix("\"}"))
                {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse()?
                    };
                    s.lag.push((le, value));
                }
            }
        }
    }
    Ok(s)
}

/// The `q` quantile of the observations between two cumulative histograms, as the upper
/// bound of the bucket it falls in (milliseconds).
pub fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, m)| *m);
            (*le, n - was)
        })
        .collect();
    let total = counts.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    counts
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::INFINITY, |(le, _)| le * 1000.0)
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    if args.publishers.contains(&0) || args.rates.contains(&0) || args.seconds == 0 {
        bail!("--publishers, --rates and --seconds must be positive");
    }
    let model = baton::model_path::resolve(args.model.clone())?;
    let dir = std::env::temp_dir().join(format!("baton-lab-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key_file = dir.join("cluster.key");
    std::fs::write(&key_file, "baton-lab events experiment key, 32+ bytes\n")?;
    let key = ClusterKey::from_file(&key_file)?;
    let mut runs = Vec::new();
    for &n in &args.publishers {
        for &rate in &args.rates {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let run = one(&rt, &args, &model, &key_file, &key, n, rate)
                .with_context(|| format!("{n} publishers at {rate} messages/s"))?;
            if !args.json {
                println!(
                    "{:>3} publishers  offered {:>7.0}/s  applied {:>7.0}/s ({:>8.0} kv events/s)  gaps {:>5}  resyncs {:>5}  lag p50 {:>6.1} ms p99 {:>6.1} ms  coordinator {:>5.2} ms cpu / 1000 messages ({:>4.0}% of a core)",
                    run.publishers,
                    run.offered_per_s,
                    run.applied_per_s,
                    run.kv_events_per_s,
                    run.gaps,
                    run.resyncs,
                    run.lag_p50_ms,
                    run.lag_p99_ms,
                    run.cpu_ms_per_1000_messages,
                    run.coordinator_cpu_share * 100.0
                );
            }
            runs.push(run);
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "kv_events_per_message": args.kv_events,
                "seconds": args.seconds,
                "runs": runs,
            }))?
        );
    }
    Ok(())
}

fn one(
    rt: &tokio::runtime::Runtime,
    args: &EventsArgs,
    model: &std::path::Path,
    key_file: &std::path::Path,
    key: &ClusterKey,
    n: usize,
    rate: u64,
) -> anyhow::Result<Run> {
    let mut workers = Vec::new();
    for i in 0..n {
        workers.push(rt.block_on(simulated(i, key.clone()))?);
    }
    let mut coordinator: Vec<String> = vec![
        "coordinator".into(),
        "--model".into(),
        model.display().to_string(),
        "--grpc".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--set".into(),
        format!(
            "coordinator.discovery.cluster_key_file={}",
            key_file.display()
        ),
    ];
    for (address, _, _) in &workers {
        coordinator.extend(["--decode-worker".into(), address.to_string()]);
    }
    let mut procs = Children {
        procs: Vec::new(),
        grace: Duration::from_secs(5),
    };
    let (child, addrs) = spawn("coordinator", &coordinator, 2)?;
    procs.procs.push(("coordinator".into(), child));
    let http = addrs[1];

    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let per_worker = rate as f64 / n as f64;
    for (_, publisher, worker) in workers {
        rt.spawn(drive(
            publisher,
            worker,
            per_worker,
            args.kv_events,
            sent.clone(),
            stop_rx.clone(),
        ));
    }
    // Subscribed to every publisher (each has sent something the coordinator applied), then
    // a second more to settle.
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = scrape(http).unwrap_or_default();
        if now.received >= n as f64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the coordinator applied no events within 60 s");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = scrape(http)?;
    let sent_before = sent.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let after = scrape(http)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let offered = (sent.load(Ordering::Relaxed) - sent_before) as f64 / elapsed;
    let _ = stop_tx.send(true);
    procs.stop();
    let applied = (after.received - before.received) / elapsed;
    let cpu = after.cpu_s - before.cpu_s;
    let messages = after.received - before.received;
    Ok(Run {
        publishers: n,
        offered_per_s: offered,
        applied_per_s: applied,
        kv_events_per_s: applied * args.kv_events as f64,
        gaps: after.gaps - before.gaps,
        resyncs: after.resyncs - before.resyncs,
        lag_p50_ms: histogram_quantile(&before.lag, &after.lag, 0.5),
        lag_p99_ms: histogram_quantile(&before.lag, &after.lag, 0.99),
        cpu_ms_per_1000_messages: cpu * 1e6 / messages.max(1.0),
        cpu_ms_per_1000_kv_events: cpu * 1e6 / (messages * args.kv_events as f64).max(1.0),
        coordinator_cpu_share: cpu / elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_window_between_two_scrapes() {
        let before = [(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)];
        let after = [(0.001, 15.0), (0.01, 110.0), (f64::INFINITY, 110.0)];
        // 100 observations in the window: 5 under 1 ms, 95 under 10 ms.
        assert_eq!(histogram_quantile(&before, &after, 0.04), 1.0);
        assert_eq!(histogram_quantile(&before, &after, 0.5), 10.0);
        assert!(histogram_quantile(&after, &after, 0.5).is_nan());
    }
}

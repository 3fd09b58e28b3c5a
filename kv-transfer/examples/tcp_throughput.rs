//! The TCP transport alone, on synthetic KV shaped like SmolLM2-135M's (30 layers, 3 kv heads x
//! 64, f32, 16-token blocks), paired with a raw loopback `TcpStream` copy of the same bytes in
//! the same chunk sizes: the quick loop for working on (and profiling) the transport without a
//! model or a prefill. `baton bench transfer` is the benchmark of record.
//!
//! ```sh
//! cargo run --release -p baton-kv-transfer --example tcp_throughput -- [tokens] [repeats] [which] [streams]
//! ```
//!
//! `which` is `both` (default), `raw` or `baton`, to profile one side alone; `streams` the TCP
//! streams baton opens (default: `TcpConfig`'s). Each repeat moves
//! the segments (one layer of a 512-token chunk each, as a push sends them) raw and through
//! baton TCP back to back, alternating which goes first; it prints the median GB/s of each and
//! the median of the per-repeat ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_kv_transfer::{
    Expectation, HandoffId, KvReceiver, KvSegment, Shard, TcpConfig, TcpReceiver, TcpSender,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{gbps, layout, median, segments, send_and_consume};

async fn raw(
    writer: &mut TcpStream,
    reader: TcpStream,
    segs: &[KvSegment],
) -> anyhow::Result<(TcpStream, Duration)> {
    let sizes: Vec<usize> = segs.iter().map(|s| s.chunk.data.len()).collect();
    let read = tokio::spawn(async move {
        let mut reader = reader;
        let mut buf = vec![0u8; sizes.iter().copied().max().unwrap_or(0)];
        for n in sizes {
            reader.read_exact(&mut buf[..n]).await?;
        }
        std::io::Result::Ok((reader, Instant::now()))
    });
    let started = Instant::now();
    for s in segs {
        writer.write_all(&s.chunk.data).await?;
    }
    let (reader, done) = read.await??;
    Ok((reader, done - started))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: u32 = args.next().map_or(Ok(512), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(21), |a| a.parse())?;
    let which = args.next().unwrap_or_else(|| "both".into());
    let config = TcpConfig {
        streams: args
            .next()
            .map_or(Ok(TcpConfig::default().streams), |a| a.parse())?,
        ..TcpConfig::default()
    };
    let (do_raw, do_baton) = match which.as_str() {
        "both" => (true, true),
        "raw" => (true, false),
        "baton" => (false, true),
        other => anyhow::bail!("which must be both, raw or baton, not {other}"),
    };
    let d = layout();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let (receiver, mut rx, sender, mut raw_writer, raw_reader) = rt.block_on(async {
        let (receiver, rx) = TcpReceiver::bind(loopback, d.clone(), config.clone()).await?;
        let sender =
            TcpSender::connect(receiver.local_addr(), d.clone(), Shard::default(), config).await?;
        let listener = TcpListener::bind(loopback).await?;
        let w = TcpStream::connect(listener.local_addr()?).await?;
        let (r, _) = listener.accept().await?;
        w.set_nodelay(true)?;
        r.set_nodelay(true)?;
        anyhow::Ok((Arc::new(receiver), rx, sender, w, r))
    })?;
    let mut raw_reader = Some(raw_reader);
    let mut segs = segments(&d, tokens, 512);
    let bytes: usize = segs.iter().map(|s| s.chunk.data.len()).sum();
    let (mut raw_runs, mut baton_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = 0;
    for r in 0..=repeats {
        let mut t_raw = Duration::ZERO;
        let mut t_baton = Duration::ZERO;
        for first in [r % 2 == 0, r % 2 != 0] {
            if first && do_raw {
                let reader = raw_reader.take().expect("raw reader");
                let (reader, t) = rt.block_on(raw(&mut raw_writer, reader, &segs))?;
                raw_reader = Some(reader);
                t_raw = t;
            }
            if !first && do_baton {
                next += 1;
                let id = HandoffId(next);
                for s in &mut segs {
                    s.handoff = id;
                }
                receiver.expect(id, Expectation::whole_sequence(&d, tokens))?;
                let (rx_back, t) =
                    rt.block_on(send_and_consume(&receiver, rx, &sender, &segs, bytes))?;
                rx = rx_back;
                t_baton = t;
            }
        }
        if r > 0 {
            if do_raw {
                raw_runs.push(gbps(bytes, t_raw));
            }
            if do_baton {
                baton_runs.push(gbps(bytes, t_baton));
            }
            if do_raw && do_baton {
                ratios.push(t_raw.as_secs_f64() / t_baton.as_secs_f64());
            }
        }
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let med = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            median(v.to_vec())
        }
    };
    println!(
        "{tokens} tokens push: {} x {} B  raw tcp {:.2} GB/s  baton tcp {:.2} GB/s  baton/raw per repeat, median {:.2}",
        segs.len(),
        segs[0].chunk.data.len(),
        med(&raw_runs),
        med(&baton_runs),
        med(&ratios),
    );
    println!("    raw   runs: {}", fmt(&raw_runs));
    println!("    baton runs: {}", fmt(&baton_runs));
    println!("    ratios:     {}", fmt(&ratios));
    Ok(())
}

//! The shared-memory transport alone, on synthetic KV shaped like SmolLM2-135M's (30 layers,
//! 3 kv heads x 64, f32, 16-token blocks), against a memcpy of the same bytes in the same run:
//! the quick loop for working on the transport without a model or a prefill.
//! `baton bench transfer` is the benchmark of record.
//!
//! ```sh
//! cargo run --release -p baton-kv-transfer --example shm_throughput -- [tokens] [repeats] [run]
//! ```
//!
//! For each segmentation (push: one layer of a 512-token chunk per segment; pull: one layer in
//! runs of at most `MAX_SEGMENT_BYTES`; or only `run`-token segments when given) it prints the median GB/s of memcpy and of baton shm
//! (first byte handed to the sender to the last delivery consumed; the consumer recycles each
//! payload, as the decode worker does after importing it), and their ratio.

use std::time::Instant;

use baton_kv_transfer::{
    Expectation, HandoffId, KvReceiver, Shard, ShmConfig, ShmReceiver, ShmSender,
    max_blocks_per_segment,
};

mod common;
use common::{gbps, layout, median, segments, send_and_consume};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: u32 = args.next().map_or(Ok(2048), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(9), |a| a.parse())?;
    let d = layout();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()?;
    let socket = std::env::temp_dir().join(format!("baton-shm-tput-{}.sock", std::process::id()));
    let (receiver, mut rx, sender) = rt.block_on(async {
        let (receiver, rx) = ShmReceiver::bind(&socket, d.clone(), ShmConfig::default()).await?;
        let sender =
            ShmSender::connect(&socket, d.clone(), Shard::default(), ShmConfig::default()).await?;
        anyhow::Ok((std::sync::Arc::new(receiver), rx, sender))
    })?;
    let block_bytes = d.bytes_per_token_half() * 2 * d.block_size as usize;
    let pull_run = (max_blocks_per_segment(block_bytes) as u32) * d.block_size;
    let mut next = 0;
    let shapes: Vec<(&str, u32)> = match args.next() {
        Some(run) => vec![("run", run.parse()?)],
        None => vec![("push", 512), ("pull", pull_run)],
    };
    for (shape, run) in shapes {
        let mut segs = segments(&d, tokens, run);
        let bytes: usize = segs.iter().map(|s| s.chunk.data.len()).sum();
        let mut dst = vec![0u8; bytes];
        let (mut copy, mut shm) = (Vec::new(), Vec::new());
        for r in 0..=repeats {
            let started = Instant::now();
            let mut at = 0;
            for s in &segs {
                dst[at..at + s.chunk.data.len()].copy_from_slice(&s.chunk.data);
                at += s.chunk.data.len();
            }
            let t_copy = started.elapsed();
            std::hint::black_box(&dst);

            next += 1;
            let id = HandoffId(next);
            for s in &mut segs {
                s.handoff = id;
            }
            receiver.expect(id, Expectation::whole_sequence(&d, tokens))?;
            let (rx_back, t_shm) =
                rt.block_on(send_and_consume(&receiver, rx, &sender, &segs, bytes))?;
            rx = rx_back;
            if r > 0 {
                copy.push(gbps(bytes, t_copy));
                shm.push(gbps(bytes, t_shm));
            }
        }
        let (c, s) = (median(copy.clone()), median(shm.clone()));
        println!(
            "{tokens} tokens {shape}: {} x {} B  memcpy {c:.2} GB/s  shm {s:.2} GB/s  shm/memcpy {:.2}",
            segs.len(),
            segs[0].chunk.data.len(),
            s / c
        );
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("    memcpy runs: {}", fmt(&copy));
        println!("    shm    runs: {}", fmt(&shm));
    }
    Ok(())
}

//! What the throughput examples share: synthetic KV shaped like SmolLM2-135M's and the
//! arithmetic of their reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::{Fingerprint, KvChunk, KvDType, LayoutDescriptor};
use baton_kv_transfer::{Delivery, HandoffId, KvReceiver, KvSegment, KvSender};
use tokio::sync::mpsc;

pub fn layout() -> LayoutDescriptor {
    LayoutDescriptor {
        fingerprint: Fingerprint([7; 32]),
        dtype: KvDType::F32,
        block_size: 16,
        num_layers: 30,
        layers: 0..30,
        num_kv_heads: 3,
        kv_heads: 0..3,
        head_dim: 64,
    }
}

pub fn segments(d: &LayoutDescriptor, tokens: u32, run_tokens: u32) -> Vec<KvSegment> {
    let per_token = 2 * (d.kv_heads.len() as u32 * d.head_dim) as usize * d.dtype.size();
    let mut out = Vec::new();
    let mut fill = 0u8;
    for layer in d.layers.clone() {
        let mut first = 0;
        while first < tokens {
            let n = run_tokens.min(tokens - first);
            let data = (0..n as usize * per_token)
                .map(|i| {
                    fill = fill.wrapping_add(1);
                    (i as u8) ^ fill
                })
                .collect();
            out.push(KvSegment {
                handoff: HandoffId(0),
                kv_heads: d.kv_heads.clone(),
                chunk: KvChunk {
                    layer,
                    first_block: first / d.block_size,
                    num_blocks: n.div_ceil(d.block_size),
                    tokens: n,
                    data,
                },
            });
            first += n;
        }
    }
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// Sends `segs` (one handoff `receiver` already expects) and consumes the deliveries as the
/// decode worker does, recycling each payload. Returns the delivery channel and the time from
/// the first send to the last delivery consumed.
pub async fn send_and_consume<R: KvReceiver + 'static>(
    receiver: &Arc<R>,
    mut rx: mpsc::Receiver<Delivery>,
    sender: &impl KvSender,
    segs: &[KvSegment],
    bytes: usize,
) -> anyhow::Result<(mpsc::Receiver<Delivery>, Duration)> {
    let receiver = receiver.clone();
    let consumer = tokio::spawn(async move {
        let mut got = 0;
        loop {
            match rx.recv().await {
                Some(Delivery::Segment(s)) => {
                    got += s.chunk.data.len();
                    receiver.recycle(s.chunk.data);
                }
                Some(Delivery::Complete(_)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        (rx, got, Instant::now())
    });
    let started = Instant::now();
    for s in segs {
        sender.send(s).await?;
    }
    let (rx, got, done) = consumer.await?;
    anyhow::ensure!(got == bytes, "{got} of {bytes} bytes delivered");
    Ok((rx, done - started))
}

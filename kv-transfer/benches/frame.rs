//! KV frames (`kv-transfer/src/wire.rs`): encoding a write frame's header with its payload's
//! crc32c, and decoding one with both checksums verified, for payloads the transports really
//! move.
//!
//!     cargo bench -p baton-kv-transfer --bench frame
//!
//! Sizes: 4 KiB (a few tokens), 768 KiB (one layer of one 512-token push of SmolLM2-135M: 3 kv
//! heads x 64 x f32, K and V), 4 MiB (the largest write frame). Throughput is payload bytes per
//! second. Baseline in the same run: copying the payload once (`copy_baseline`), the least any
//! transport does with those bytes.

use std::hint::black_box;

use baton_kv_transfer::HandoffId;
use baton_kv_transfer::wire::{HEADER_LEN, Header, Kind, Limits};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngCore, SeedableRng};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (768 << 10, "768KiB"), (4 << 20, "4MiB")];

fn payload(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(len as u64).fill_bytes(&mut v);
    v
}

fn frames(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("frame");
    for (len, name) in SIZES {
        let data = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("encode", name), &data, |b, data| {
            b.iter(|| {
                let mut h =
                    Header::new(Kind::Write, HandoffId(7), data.len(), crc32c::crc32c(data))
                        .expect("header");
                h.layer = 3;
                h.offset = 1 << 20;
                black_box(h.encode())
            })
        });
        let mut h = Header::new(Kind::Write, HandoffId(7), data.len(), crc32c::crc32c(&data))
            .expect("header");
        h.offset = 4096;
        let head: [u8; HEADER_LEN] = h.encode();
        group.bench_with_input(BenchmarkId::new("decode_verify", name), &data, |b, data| {
            b.iter(|| {
                let h = Header::decode(black_box(&head), &limits).expect("decode");
                h.verify(data.len(), crc32c::crc32c(black_box(data)))
                    .expect("verify");
                black_box(h)
            })
        });
        group.bench_with_input(BenchmarkId::new("copy_baseline", name), &data, |b, data| {
            let mut out = vec![0u8; data.len()];
            b.iter(|| {
                out.copy_from_slice(black_box(data));
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);

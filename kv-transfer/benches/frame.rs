//! KV frames (`kv-transfer/src/frame.rs`): encoding a header with the payload's crc32c, and
//! decoding a whole frame with both checksums verified, for payloads the transports really move.
//!
//!     cargo bench -p baton-kv-transfer --bench frame
//!
//! Sizes: 4 KiB (a few tokens), 768 KiB (one layer of one 512-token push segment of
//! SmolLM2-135M: 3 kv heads x 64 x f32, K and V), 4 MiB (the largest pull run). Throughput is
//! payload bytes per second; the header alone is timed too. Baseline in the same run: copying the
//! payload once (`copy_baseline`), the least any transport does with those bytes.

use std::hint::black_box;

use baton_kv_transfer::FrameLimits;
use baton_kv_transfer::frame::{
    Decoded, FrameHeader, FrameKind, HEADER_LEN, decode_frame, encode_frame,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngCore, SeedableRng};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (768 << 10, "768KiB"), (4 << 20, "4MiB")];

fn payload(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(len as u64).fill_bytes(&mut v);
    v
}

fn frames(c: &mut Criterion) {
    let limits = FrameLimits::default();
    let mut group = c.benchmark_group("frame");
    for (len, name) in SIZES {
        let data = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(
            BenchmarkId::new("encode_with_crc", name),
            &data,
            |b, data| {
                b.iter(|| {
                    let header =
                        FrameHeader::new(FrameKind::KvData, black_box(data)).expect("fits");
                    black_box(header.encode())
                })
            },
        );
        let mut copy = vec![0u8; len];
        group.bench_with_input(BenchmarkId::new("copy_baseline", name), &data, |b, data| {
            b.iter(|| {
                copy.copy_from_slice(black_box(data));
                black_box(copy.as_ptr())
            })
        });
        let header = FrameHeader::new(FrameKind::KvData, &data).expect("fits");
        let wire = encode_frame(&header, &data);
        group.bench_with_input(
            BenchmarkId::new("decode_and_verify", name),
            &wire,
            |b, wire| {
                b.iter(
                    || match decode_frame(black_box(wire), &limits).expect("valid") {
                        Decoded::Frame { len, .. } => black_box(len),
                        Decoded::NeedMore { .. } => unreachable!("the whole frame is there"),
                    },
                )
            },
        );
    }
    let header = FrameHeader::new(FrameKind::KvData, &payload(64)).expect("fits");
    let bytes = header.encode();
    group.throughput(Throughput::Elements(1));
    group.bench_function("header_encode", |b| {
        b.iter(|| black_box(black_box(&header).encode()))
    });
    group.bench_function("header_decode", |b| {
        b.iter(|| {
            let h: &[u8; HEADER_LEN] = black_box(&bytes);
            black_box(FrameHeader::decode(h, &limits).expect("valid"))
        })
    });
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);

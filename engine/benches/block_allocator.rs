//! The KV block allocator (`engine/src/kv.rs`): what a sequence pays to get and return its
//! blocks. The pool is one free list behind a mutex, shared by every block table.
//!
//!     cargo bench -p baton-engine --bench block_allocator
//!
//! Cases: a 256-token prompt's 16 blocks taken and freed at once (admission and finish); a
//! sequence growing block by block to 64 blocks, as decode appends tokens, then freed; the
//! per-token check that finds the table already big enough (the common decode step).

use std::hint::black_box;

use baton_engine::kv::BlockAllocator;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BLOCK_SIZE: usize = 16;
const POOL_BLOCKS: usize = 16_384;

fn allocator(c: &mut Criterion) {
    let pool = BlockAllocator::new(POOL_BLOCKS);
    let mut group = c.benchmark_group("block_allocator");

    group.throughput(Throughput::Elements(16));
    group.bench_function("take_and_free_16_blocks", |b| {
        b.iter(|| {
            let mut table = pool.new_table();
            table
                .ensure_capacity(black_box(16 * BLOCK_SIZE), BLOCK_SIZE)
                .expect("the pool has room");
            black_box(table.len());
        })
    });

    group.throughput(Throughput::Elements(64));
    group.bench_function("grow_to_64_blocks_one_at_a_time_then_free", |b| {
        b.iter(|| {
            let mut table = pool.new_table();
            for blocks in 1..=64 {
                table
                    .ensure_capacity(black_box(blocks * BLOCK_SIZE), BLOCK_SIZE)
                    .expect("the pool has room");
            }
            black_box(table.len());
        })
    });

    group.throughput(Throughput::Elements(1));
    let mut table = pool.new_table();
    table
        .ensure_capacity(64 * BLOCK_SIZE, BLOCK_SIZE)
        .expect("the pool has room");
    group.bench_function("ensure_capacity_without_growth", |b| {
        b.iter(|| {
            table
                .ensure_capacity(black_box(63 * BLOCK_SIZE + 1), BLOCK_SIZE)
                .expect("no growth needed");
        })
    });
    drop(table);
    group.finish();
    assert_eq!(pool.free_blocks(), POOL_BLOCKS, "every block came back");
}

criterion_group!(benches, allocator);
criterion_main!(benches);

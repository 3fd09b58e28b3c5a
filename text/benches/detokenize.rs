//! The incremental detokenizer (`text/src/detokenize.rs`) that turns every generated token into
//! a text delta on the coordinator, on the development model's tokenizer.
//!
//!     cargo bench -p baton-text --bench detokenize
//!
//! Model: `$BATON_MODEL`, else `~/.cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf`
//! (`scripts/fetch-model.sh`); without it the benchmark says so and measures nothing. Cases:
//! English prose (one token is usually whole characters) and text with CJK and emoji (byte-level
//! tokens split characters, so the detokenizer holds bytes back); throughput is tokens per second
//! including the stream's setup and final flush. Baseline in the same run: one `decode` of all
//! 256 ids at once (`decode_all_at_once_baseline`), what a non-streaming answer costs.

use std::hint::black_box;
use std::path::PathBuf;

use baton_text::{IncrementalDetokenizer, Tokenizer};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

const PROSE: &str = "The coordinator takes requests from gRPC and HTTP clients, sends the prompt \
to a prefill worker, and hands the resulting KV cache to a decode worker, which streams tokens \
back. Prefill is compute-bound and decode is memory-bound, so each runs on hardware that suits it, \
and long prompts never stall running streams. ";

const MIXED: &str = "東京の天気は晴れです。🌤️ Les élèves étudient l'algèbre; 数学が好き 🧮🎉 \
Привет, мир! — 한국어 텍스트도 있습니다. ";

fn detokenize(c: &mut Criterion) {
    let path = model_path();
    let tokenizer = match Tokenizer::load(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "detokenize bench skipped: {} ({e}); run scripts/fetch-model.sh",
                path.display()
            );
            return;
        }
    };
    let mut group = c.benchmark_group("detokenize");
    for (name, text) in [("prose", PROSE), ("cjk_emoji", MIXED)] {
        let ids: Vec<u32> = tokenizer
            .encode(&text.repeat(4), false)
            .expect("encode")
            .into_iter()
            .take(256)
            .collect();
        let prompt_tail = tokenizer.encode("Answer: ", false).expect("encode");
        group.throughput(Throughput::Elements(ids.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("decode_all_at_once_baseline", name),
            &ids,
            |b, ids| b.iter(|| black_box(tokenizer.decode(black_box(ids), true).expect("decode"))),
        );
        group.bench_with_input(
            BenchmarkId::new("stream_256_tokens", name),
            &ids,
            |b, ids| {
                b.iter(|| {
                    let mut detok =
                        IncrementalDetokenizer::new(tokenizer.clone(), &prompt_tail, true);
                    let mut bytes = 0;
                    for &id in ids {
                        if let Some(delta) = detok.push(black_box(id)).expect("in vocabulary") {
                            bytes += delta.len();
                        }
                    }
                    bytes += detok.finish().expect("flush").len();
                    black_box(bytes)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, detokenize);
criterion_main!(benches);

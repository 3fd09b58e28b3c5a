//! The disaggregation invariant: prefill in engine A, export its KV layer by layer, import into
//! a fresh engine B in another process, decode there: the tokens equal prefill and decode in
//! one engine, and the bytes that moved are exactly the prompt's KV.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};

use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::sampling::{Sampler, SamplingParams};
use baton_engine::{
    Engine, EngineConfig, Error, Kernels, KvChunk, KvDType, Phase, Role, SeqId, StepItem,
    WeightsSetting,
};
use common::{PROMPTS, dev_model_path};

const NEW_TOKENS: u32 = 24;
const CHILD_ENV: &str = "BATON_DISAGG_CHILD";

fn config(role: Role) -> EngineConfig {
    kernels_config(role, Kernels::Baton)
}

fn kernels_config(role: Role, kernels: Kernels) -> EngineConfig {
    let mut cfg = EngineConfig::new(dev_model_path(), role);
    cfg.cpu_kernels = kernels;
    cfg.prefill_chunk_tokens = 64;
    cfg.kv_cache_bytes = 64 << 20;
    cfg
}

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: NEW_TOKENS,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn long_prompt() -> Vec<u32> {
    PROMPTS
        .iter()
        .cycle()
        .take(9)
        .flat_map(|p| p.iter().copied())
        .collect()
}

/// Prefill side: chunks of the prompt, each step exporting every layer of the blocks it wrote;
/// returns the chunks and the first sampled token.
fn prefill_and_export(e: &mut Engine, id: SeqId, prompt: &[u32]) -> (Vec<KvChunk>, u32) {
    e.add_sequence(id, prompt.to_vec()).expect("add");
    let chunk = e.config().prefill_chunk_tokens;
    let mut chunks = Vec::new();
    let mut first = None;
    while e.computed(id).expect("seq") < prompt.len() {
        let n = chunk.min(prompt.len() - e.computed(id).expect("seq"));
        let out = e
            .step_with_export(
                &[StepItem {
                    seq: id,
                    tokens: n,
                    phase: Phase::Prefill,
                }],
                &[id],
                &mut |_, c| {
                    chunks.push(c);
                    Ok(())
                },
            )
            .expect("prefill step");
        if let Some(l) = &out[0].logits {
            first = Some(Sampler::new(&params(), prompt).sample(l).id);
        }
    }
    e.release(id);
    (chunks, first.expect("last chunk gives logits"))
}

/// Decode side: import, resume, generate. Returns the tokens after the first.
fn import_and_decode(
    b: &mut Batcher,
    id: SeqId,
    prompt: &[u32],
    chunks: &[KvChunk],
    first: u32,
) -> Vec<u32> {
    b.engine_mut()
        .begin_import(id, prompt.to_vec())
        .expect("reserve");
    for c in chunks {
        b.engine_mut().import(id, c).expect("import");
    }
    b.engine_mut().finish_import(id).expect("all layers landed");
    b.resume_imported(id, params(), first).expect("resume");
    let mut out = Vec::new();
    while !b.is_idle() {
        for ev in b.step().expect("step") {
            if let Event::Token { token, .. } = ev {
                out.push(token.id);
            }
        }
    }
    out
}

fn colocated(prompts: &[Vec<u32>], kernels: Kernels) -> HashMap<usize, Vec<u32>> {
    let mut b = Batcher::new(
        Engine::load(kernels_config(Role::Colocated, kernels)).expect("load"),
        vec![2],
    );
    let mut out: HashMap<usize, Vec<u32>> = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        b.submit(GenerateRequest {
            id: SeqId(i as u64),
            prompt: p.clone(),
            params: params(),
        })
        .expect("submit");
        while !b.is_idle() {
            for ev in b.step().expect("step") {
                if let Event::Token { token, .. } = ev {
                    out.entry(i).or_default().push(token.id);
                }
            }
        }
    }
    out
}

fn test_prompts() -> Vec<Vec<u32>> {
    vec![PROMPTS[0].to_vec(), PROMPTS[1].to_vec(), long_prompt()]
}

fn write_chunks(w: &mut impl Write, prompt: &[u32], first: u32, chunks: &[KvChunk]) {
    let mut put = |x: u32| w.write_all(&x.to_le_bytes()).expect("write");
    put(prompt.len() as u32);
    prompt.iter().for_each(|&t| put(t));
    put(first);
    put(chunks.len() as u32);
    for c in chunks {
        for x in [
            c.layer,
            c.first_block,
            c.num_blocks,
            c.tokens,
            c.data.len() as u32,
        ] {
            put(x);
        }
    }
    for c in chunks {
        w.write_all(&c.data).expect("write");
    }
}

fn read_chunks(r: &mut impl Read) -> (Vec<u32>, u32, Vec<KvChunk>) {
    let mut get = || {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).expect("read");
        u32::from_le_bytes(b)
    };
    let n = get() as usize;
    let prompt: Vec<u32> = (0..n).map(|_| get()).collect();
    let first = get();
    let count = get() as usize;
    let mut heads = Vec::new();
    for _ in 0..count {
        heads.push((get(), get(), get(), get(), get() as usize));
    }
    let chunks = heads
        .into_iter()
        .map(|(layer, first_block, num_blocks, tokens, len)| {
            let mut data = vec![0u8; len];
            r.read_exact(&mut data).expect("read data");
            KvChunk {
                layer,
                first_block,
                num_blocks,
                tokens,
                data,
            }
        })
        .collect();
    (prompt, first, chunks)
}

/// The decode process: reads prompts' KV from stdin, decodes, prints tokens one line each.
#[test]
fn decode_process_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return; // Only meaningful when spawned by `kv_moved_to_another_process_decodes_identically`.
    }
    let mut b = Batcher::new(Engine::load(config(Role::Decode)).expect("load"), vec![2]);
    let mut stdin = std::io::stdin().lock();
    let count = {
        let mut n = [0u8; 4];
        stdin.read_exact(&mut n).expect("count");
        u32::from_le_bytes(n)
    };
    for i in 0..count {
        let (prompt, first, chunks) = read_chunks(&mut stdin);
        let tokens = import_and_decode(&mut b, SeqId(i as u64), &prompt, &chunks, first);
        let mut line: Vec<String> = vec![first.to_string()];
        line.extend(tokens.iter().map(|t| t.to_string()));
        println!("TOKENS {}", line.join(" "));
    }
    assert_eq!(b.engine().free_blocks(), b.engine().total_blocks());
}

#[test]
fn kv_moved_to_another_process_decodes_identically() {
    let prompts = test_prompts();
    let expected = colocated(&prompts, Kernels::Baton);
    let mut prefill = Engine::load(config(Role::Prefill)).expect("load");
    let layers = prefill.model_config().num_layers;
    let mut payload = Vec::new();
    payload.extend_from_slice(&(prompts.len() as u32).to_le_bytes());
    for (i, p) in prompts.iter().enumerate() {
        let (chunks, first) = prefill_and_export(&mut prefill, SeqId(i as u64), p);
        // Every (layer, block) exported exactly once: one chunk per layer per prefill step.
        let steps = p.len().div_ceil(prefill.config().prefill_chunk_tokens);
        assert_eq!(chunks.len(), layers * steps);
        let mut seen = std::collections::HashSet::new();
        for c in &chunks {
            for b in c.first_block..c.first_block + c.num_blocks {
                assert!(
                    seen.insert((c.layer, b)),
                    "layer {} block {b} twice",
                    c.layer
                );
            }
        }
        assert_eq!(seen.len(), layers * prefill.blocks_for(p.len()));
        let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(
            bytes,
            layers * prefill.kv_layer_bytes(p.len()),
            "prompt {i}: bytes moved"
        );
        write_chunks(&mut payload, p, first, &chunks);
    }
    assert_eq!(prefill.free_blocks(), prefill.total_blocks());

    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "decode_process_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn decode process");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&payload)
        .expect("send kv");
    let out = child.wait_with_output().expect("decode process");
    assert!(out.status.success(), "decode process failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: Vec<Vec<u32>> = stdout
        .lines()
        // libtest may print "test decode_process_child ... " on the same line first.
        .filter_map(|l| l.split_once("TOKENS ").map(|(_, rest)| rest))
        .map(|l| l.split(' ').map(|t| t.parse().expect("token id")).collect())
        .collect();
    assert_eq!(got.len(), prompts.len());
    for (i, tokens) in got.iter().enumerate() {
        assert_eq!(
            tokens, &expected[&i],
            "prompt {i}: disaggregated tokens differ"
        );
    }
}

#[test]
fn kv_moved_between_engines_in_one_process_decodes_identically() {
    moved_in_one_process(Kernels::Baton);
}

/// The same on candle's kernels, the path a GPU takes: export reads K and V out of candle
/// tensors and import writes them back through candle's slice ops.
#[test]
fn with_candle_kernels_moved_kv_decodes_identically() {
    moved_in_one_process(Kernels::Candle);
}

fn moved_in_one_process(kernels: Kernels) {
    let prompts = test_prompts();
    let expected = colocated(&prompts, kernels);
    let mut prefill = Engine::load(kernels_config(Role::Prefill, kernels)).expect("load");
    let mut decode = Batcher::new(
        Engine::load(kernels_config(Role::Decode, kernels)).expect("load"),
        vec![2],
    );
    decode
        .engine()
        .descriptor()
        .check_compatible(prefill.descriptor())
        .expect("same model, same layout");
    for (i, p) in prompts.iter().enumerate() {
        let id = SeqId(i as u64);
        let (chunks, first) = prefill_and_export(&mut prefill, id, p);
        let mut tokens = vec![first];
        tokens.extend(import_and_decode(&mut decode, id, p, &chunks, first));
        assert_eq!(tokens, expected[&i], "{kernels:?} kernels, prompt {i}");
    }
    assert_eq!(
        decode.engine().free_blocks(),
        decode.engine().total_blocks()
    );
}

#[test]
fn import_refuses_descriptors_and_chunks_it_cannot_map() {
    let f32_engine = Engine::load(config(Role::Decode)).expect("load");
    let mut cfg = config(Role::Decode);
    cfg.kv_dtype = KvDType::F16;
    cfg.weights = WeightsSetting::Quantized;
    let f16_engine = Engine::load(cfg).expect("load");
    let err = f32_engine
        .descriptor()
        .check_compatible(f16_engine.descriptor())
        .expect_err("dtype differs");
    assert!(err.reason.contains("dtype f32 against f16"), "{err}");

    let mut other = f32_engine.descriptor().clone();
    other.fingerprint.0[0] ^= 1;
    let err = f32_engine
        .descriptor()
        .check_compatible(&other)
        .expect_err("other model");
    assert!(err.reason.contains("fingerprints differ"), "{err}");

    // A chunk of the wrong size, layer or block range changes nothing and is refused.
    let mut e = f32_engine;
    let prompt = PROMPTS[1].to_vec();
    e.begin_import(SeqId(1), prompt.clone()).expect("reserve");
    let good = e.kv_layer_bytes(prompt.len());
    let blocks = e.blocks_for(prompt.len()) as u32;
    let bad = [
        KvChunk {
            layer: 0,
            first_block: 0,
            num_blocks: blocks,
            tokens: prompt.len() as u32,
            data: vec![0; good - 4],
        },
        KvChunk {
            layer: 99,
            first_block: 0,
            num_blocks: blocks,
            tokens: prompt.len() as u32,
            data: vec![0; good],
        },
        KvChunk {
            layer: 0,
            first_block: 1,
            num_blocks: blocks,
            tokens: prompt.len() as u32,
            data: vec![0; good],
        },
    ];
    for c in &bad {
        assert!(matches!(e.import(SeqId(1), c), Err(Error::KvImport(_))));
    }
    let err = e.finish_import(SeqId(1)).expect_err("nothing landed");
    assert!(matches!(err, Error::KvImport(_)));
    assert!(e.release(SeqId(1)));
    assert_eq!(e.free_blocks(), e.total_blocks());
}

//! Replay, the engine half of a migrated stream: a sequence that goes on from tokens its client
//! already has (computed on a decode worker that died) recomputes them as decode steps and
//! continues exactly as the undisturbed run did, greedy or seeded, alone or in a batch.

mod common;

use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::sampling::{Sampler, SamplingParams};
use baton_engine::{Engine, EngineConfig, KvChunk, Phase, Role, SeqId, StepItem};
use common::{PROMPTS, dev_model_path};

const NEW_TOKENS: u32 = 40;
const EOS: u32 = 2;

fn batcher() -> Batcher {
    // A decode worker's engine: f32 prefill weights, the file's quantized weights for decode.
    let mut cfg = EngineConfig::new(dev_model_path(), Role::Decode);
    cfg.prefill_chunk_tokens = 64;
    cfg.kv_cache_bytes = 64 << 20;
    Batcher::new(Engine::load(cfg).expect("load"), vec![EOS])
}

fn greedy() -> SamplingParams {
    SamplingParams {
        max_new_tokens: NEW_TOKENS,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn seeded() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(11),
        ..greedy()
    }
}

/// Runs every queued sequence to its end; the tokens each emitted, by id.
fn drain(b: &mut Batcher, ids: &[SeqId]) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); ids.len()];
    while !b.is_idle() {
        for ev in b.step().expect("step") {
            match ev {
                Event::Token { seq, token, .. } => {
                    let i = ids.iter().position(|&s| s == seq).expect("known seq");
                    out[i].push(token.id);
                }
                Event::Failed { seq, error } => panic!("{seq} failed: {error}"),
            }
        }
    }
    out
}

fn submit(b: &mut Batcher, id: u64, prompt: &[u32], params: SamplingParams) -> SeqId {
    let id = SeqId(id);
    b.submit(GenerateRequest {
        id,
        prompt: prompt.to_vec(),
        params,
    })
    .expect("submit");
    id
}

#[test]
fn a_replayed_sequence_continues_exactly_as_the_undisturbed_run() {
    let mut b = batcher();
    let prompt = PROMPTS[1];
    for params in [greedy(), seeded()] {
        let whole = {
            let id = submit(&mut b, 1, prompt, params.clone());
            drain(&mut b, &[id]).remove(0)
        };
        assert_eq!(whole.len(), NEW_TOKENS as usize);
        for k in [1usize, 7, 23] {
            let before = b.stats();
            let id = submit(&mut b, 2, prompt, params.clone());
            b.replay(id, whole[..k].to_vec()).expect("replay");
            // Another sequence shares every step: a replay's numbers do not depend on its batch.
            let other = submit(&mut b, 3, PROMPTS[0], greedy());
            let out = drain(&mut b, &[id, other]);
            assert_eq!(
                out[0],
                whole[k..],
                "after replaying {k} tokens ({params:?}) the stream goes on as it did"
            );
            let after = b.stats();
            assert_eq!(after.replayed_tokens - before.replayed_tokens, k as u64);
            assert_eq!(
                after.replay_divergences, before.replay_divergences,
                "every replayed token is the one this engine draws"
            );
        }
    }
}

/// The prefill worker's side: the prompt computed in chunks on a prefill engine, every layer
/// exported; the chunks and the first token it sampled.
fn prefill_and_export(prompt: &[u32], params: &SamplingParams) -> (Vec<KvChunk>, u32) {
    let mut cfg = EngineConfig::new(dev_model_path(), Role::Prefill);
    cfg.prefill_chunk_tokens = 64;
    cfg.kv_cache_bytes = 64 << 20;
    let mut e = Engine::load(cfg).expect("load");
    let id = SeqId(0);
    e.add_sequence(id, prompt.to_vec()).expect("add");
    let mut chunks = Vec::new();
    let mut first = None;
    while e.computed(id).expect("seq") < prompt.len() {
        let n = 64.min(prompt.len() - e.computed(id).expect("seq"));
        let item = StepItem {
            seq: id,
            tokens: n,
            phase: Phase::Prefill,
        };
        let out = e
            .step_with_export(&[item], &[id], &mut |_, c| {
                chunks.push(c);
                Ok(())
            })
            .expect("prefill step");
        if let Some(l) = &out[0].logits {
            first = Some(Sampler::new(params, prompt).sample(l).id);
        }
    }
    (chunks, first.expect("the last chunk gives logits"))
}

#[test]
fn a_replay_on_imported_kv_continues_exactly() {
    let mut b = batcher();
    let prompt = PROMPTS[1];
    for params in [greedy(), seeded()] {
        let whole = {
            let id = submit(&mut b, 1, prompt, params.clone());
            drain(&mut b, &[id]).remove(0)
        };
        // A migrated disaggregated stream: the prompt's KV arrives from a prefill worker with
        // its first token, which must be the client's; the client's other tokens are replayed.
        let (chunks, first) = prefill_and_export(prompt, &params);
        assert_eq!(first, whole[0]);
        let id = SeqId(2);
        let e = b.engine_mut();
        e.begin_import(id, prompt.to_vec()).expect("reserve");
        for c in &chunks {
            e.import(id, c).expect("import");
        }
        e.finish_import(id).expect("every layer landed");
        b.resume_imported(id, params.clone(), first)
            .expect("resume");
        b.replay(id, whole[1..12].to_vec()).expect("replay");
        assert_eq!(drain(&mut b, &[id]).remove(0), whole[12..], "{params:?}");
    }
    assert_eq!(b.stats().replay_divergences, 0);
}

#[test]
fn a_replay_that_would_have_finished_or_names_no_token_is_refused() {
    let mut b = batcher();
    let vocab = b.engine().model_config().vocab_size as u32;
    let params = SamplingParams {
        max_new_tokens: 3,
        ..SamplingParams::default()
    };
    for (tokens, says) in [
        (vec![5, EOS], "[1] = 2 would have ended"),
        (vec![5, 6, 7], "[2] = 7 would have ended"),
        (vec![vocab], "outside the"),
    ] {
        let e = b.check_replay(&params, &tokens).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("generated_token_ids") && text.contains(says),
            "{text}"
        );
    }
    b.check_replay(&params, &[5, 6])
        .expect("two of three tokens");
    let id = submit(&mut b, 1, PROMPTS[0], params.clone());
    b.replay(id, vec![5]).expect("first replay");
    let again = b.replay(id, vec![6]).expect_err("only once");
    assert!(again.to_string().contains("already"), "{again}");
}

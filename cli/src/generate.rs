//! `baton generate --local`: prefill and decode in this process, with the per-phase weight
//! formats a cluster uses by default, so its greedy output is the reference a cluster's output
//! must equal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::chat::{ChatMessage, Role as ChatRole};
use baton_engine::detokenize::IncrementalDetokenizer;
use baton_engine::sampling::{SamplingLimits, SamplingParams};
use baton_engine::{Engine, EngineConfig, Role, SeqId, WeightsSetting};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Run the engine in this process (the cluster client arrives with the coordinator).
    #[arg(long)]
    local: bool,
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    /// auto | quantized | f32 | f16
    #[arg(long, default_value = "auto")]
    weights: WeightsSetting,
    /// cpu, or cuda:N with a build that has the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: baton_engine::DeviceSetting,
    /// Print token ids and timing to stderr after the text.
    #[arg(long)]
    verbose: bool,
    prompt: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.local {
        bail!(
            "baton generate talks to a cluster over gRPC, which this build does not serve yet; \
             pass --local to run the engine in this process"
        );
    }
    let model = crate::model_path::resolve(args.model)?;
    let mut cfg = EngineConfig::new(&model, Role::Colocated);
    cfg.weights = args.weights;
    cfg.device = args.device;
    let engine = Engine::load(cfg).with_context(|| format!("loading {}", model.display()))?;
    let tokenizer = engine.tokenizer().clone();
    let text = if args.chat {
        let template = tokenizer
            .chat_template()
            .context("--chat: the model carries no chat template")?;
        template.render(&[ChatMessage::new(ChatRole::User, args.prompt)], true)?
    } else {
        args.prompt
    };
    let prompt = tokenizer.encode(&text, true)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_new_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    params.validate(&SamplingLimits::with_room(
        engine.max_context().saturating_sub(prompt.len()),
    ))?;
    let eos = tokenizer.eos_token_ids().to_vec();
    let mut batcher = Batcher::new(engine, eos);
    let id = SeqId(0);
    let started = std::time::Instant::now();
    batcher.submit(GenerateRequest {
        id,
        prompt: prompt.clone(),
        params,
    })?;
    let mut detok = IncrementalDetokenizer::new(tokenizer, &prompt, true);
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut first_token_at = None;
    let mut finish = None;
    while !batcher.is_idle() {
        for event in batcher.step()? {
            match event {
                Event::Token {
                    token, finish: f, ..
                } => {
                    first_token_at.get_or_insert_with(|| started.elapsed());
                    ids.push(token.id);
                    // The stop token's own text is not part of the answer.
                    if f != Some(baton_engine::stop::FinishReason::Stop)
                        && let Some(delta) = detok.push(token.id)?
                    {
                        out.write_all(delta.as_bytes())?;
                        out.flush()?;
                    }
                    finish = f.or(finish);
                }
                Event::Failed { error, .. } => bail!("generation failed: {error}"),
            }
        }
    }
    out.write_all(detok.finish()?.as_bytes())?;
    writeln!(out)?;
    if args.verbose {
        let total = started.elapsed();
        let ttft = first_token_at.unwrap_or(total);
        let decode_tps = (ids.len().saturating_sub(1)) as f64 / (total - ttft).as_secs_f64();
        eprintln!(
            "prompt {} tokens, generated {} ({}), ttft {:.1} ms, decode {:.1} tok/s\nids {:?}",
            prompt.len(),
            ids.len(),
            finish.map(|f| f.as_str()).unwrap_or("?"),
            ttft.as_secs_f64() * 1e3,
            decode_tps,
            ids
        );
    }
    Ok(())
}

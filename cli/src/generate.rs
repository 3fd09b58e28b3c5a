//! `baton generate`: a gRPC client of a running cluster that streams to the terminal; with
//! `--local`, prefill and decode in this process with the per-phase weight formats a cluster
//! uses by default, so its greedy output is the reference a cluster's output must equal.

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
    /// Run the engine in this process instead of asking a cluster.
    #[arg(long)]
    local: bool,
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// auto | force | off: disaggregate, or run prefill on the decode worker.
    #[arg(long, default_value = "auto")]
    pd_mode: String,
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
    /// On the CPU: baton (fast) or candle (candle's ops, the path a CUDA device takes).
    #[arg(long, default_value = "baton")]
    cpu_kernels: baton_engine::Kernels,
    /// Print token ids and timing to stderr after the text.
    #[arg(long)]
    verbose: bool,
    prompt: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.local {
        return remote(args);
    }
    let model = crate::model_path::resolve(args.model)?;
    let mut cfg = EngineConfig::new(&model, Role::Colocated);
    cfg.weights = args.weights;
    cfg.device = args.device;
    cfg.cpu_kernels = args.cpu_kernels;
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

/// Streams a generation from a cluster's coordinator.
fn remote(args: GenerateArgs) -> anyhow::Result<()> {
    use baton_proto::v1::{self, inference_client::InferenceClient};
    let pd_mode = match args.pd_mode.as_str() {
        "auto" => v1::PdMode::Auto,
        "force" => v1::PdMode::Force,
        "off" => v1::PdMode::Off,
        other => bail!("--pd-mode: {other:?} is not one of auto, force, off"),
    };
    let input = if args.chat {
        v1::generate_request::Input::Chat(v1::ChatMessages {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: args.prompt,
            }],
        })
    } else {
        v1::generate_request::Input::Prompt(args.prompt)
    };
    let request = v1::GenerateRequest {
        input: Some(input),
        sampling: Some(v1::SamplingParams {
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            top_k: args.top_k,
            seed: args.seed,
            max_tokens: Some(args.max_tokens),
            ..v1::SamplingParams::default()
        }),
        pd_mode: pd_mode as i32,
        ..v1::GenerateRequest::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", args.addr))
            .await
            .with_context(|| format!("connect to the coordinator at {}", args.addr))?;
        let started = std::time::Instant::now();
        let mut stream = client
            .generate(crate::api_key::request(request)?)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let mut out = std::io::stdout().lock();
        let mut first = None;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            first.get_or_insert_with(|| started.elapsed());
            out.write_all(msg.text.as_bytes())?;
            out.flush()?;
            if let Some(finish) = msg.finish {
                writeln!(out)?;
                if args.verbose {
                    let usage = finish.usage.unwrap_or_default();
                    let p = finish.placement.unwrap_or_default();
                    let kv = p.kv.unwrap_or_default();
                    eprintln!(
                        "{} prompt + {} generated tokens ({}), ttft {:.1} ms, total {:.1} ms\n\
                         placement: {} (prefill {:?}, decode {:?}), kv {} bytes in {:.2} ms, {:.2} ms exposed",
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        v1::FinishReason::try_from(finish.reason)
                            .map(|r| r.as_str_name())
                            .unwrap_or("?"),
                        first.unwrap_or_default().as_secs_f64() * 1e3,
                        started.elapsed().as_secs_f64() * 1e3,
                        p.mode,
                        p.prefill_worker,
                        p.decode_worker,
                        kv.bytes,
                        kv.transfer_seconds * 1e3,
                        kv.exposed_seconds * 1e3,
                    );
                }
            }
        }
        Ok(())
    })
}

//! `baton kv-demo`: one sequence's KV moved between two processes by the kv-transfer crate,
//! with no coordinator and no gRPC, and the decode side's tokens compared with a single-process
//! run of the same prompt.
//!
//! ```text
//! baton kv-demo                      --KvSegments, tcp | shm-->    baton kv-demo --decode-side
//! (prefill engine, Link, send_all)                                 (receivers, decode engine,
//!           \--requests on the child's stdin, replies on its stdout--/          batcher)
//! ```
//!
//! - push: the decode side reserves the blocks and expects the handoff before the prefill runs;
//!   the prefill side sends each layer's KV as `step_with_export` produces it, then the first
//!   token it sampled.
//! - pull: the prefill side computes the whole prompt and keeps the sequence; the decode side asks
//!   for it, and the prefill side exports every layer in transport-sized runs
//!   ([`max_blocks_per_segment`]).
//!
//! Control lines (one per message, fields separated by spaces, token lists by commas):
//!
//! ```text
//! child -> parent   endpoint tcp 127.0.0.1:PORT | endpoint shm PATH | ready
//!                   expecting HANDOFF | send HANDOFF
//!                   done HANDOFF bytes=N segments=N receive_us=N complete_unix_us=N tokens=T,T,..
//! parent -> child   push tcp|shm HANDOFF MAX_TOKENS PROMPT
//!                   first HANDOFF TOKEN
//!                   pull tcp|shm HANDOFF MAX_TOKENS FIRST_TOKEN PROMPT
//! ```
//!
//! The child exits when its stdin closes. Every run prints `MATCH ...` or `MISMATCH ...`; the
//! command fails if any run mismatched or moved other than `layers x kv_layer_bytes(prompt)`
//! bytes.

use std::fmt;
use std::io::{BufRead, BufReader, Lines, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::sampling::{Sampler, SamplingParams};
use baton_engine::{Engine, EngineConfig, Phase, Role, SeqId, StepItem, Tokenizer};
use baton_kv_transfer::{
    Delivery, Endpoint, Expectation, HandoffId, KvReceiver, KvSegment, Link, LinkConfig,
    SendReport, ShmConfig, ShmReceiver, TcpConfig, TcpReceiver, max_blocks_per_segment, send_all,
};
use baton_prefill_worker::PrefillConfig;
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct KvDemoArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Transport(s) to demonstrate.
    #[arg(long, value_enum, default_value = "both")]
    transport: TransportArg,
    /// Handoff shape(s) to demonstrate.
    #[arg(long, value_enum, default_value = "both")]
    shape: ShapeArg,
    /// Prompt length in tokens (English text, repeated as needed).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to generate, counting the first one, which the prefill side samples.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Run as the decode side, spawned by the prefill side.
    #[arg(long, hide = true)]
    decode_side: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    Tcp,
    Shm,
    Both,
}

impl TransportArg {
    fn transports(self) -> Vec<Transport> {
        match self {
            TransportArg::Tcp => vec![Transport::Tcp],
            TransportArg::Shm => vec![Transport::Shm],
            TransportArg::Both => vec![Transport::Tcp, Transport::Shm],
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TransportArg::Tcp => "tcp",
            TransportArg::Shm => "shm",
            TransportArg::Both => "both",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeArg {
    Push,
    Pull,
    Both,
}

impl ShapeArg {
    fn shapes(self) -> Vec<Shape> {
        match self {
            ShapeArg::Push => vec![Shape::Push],
            ShapeArg::Pull => vec![Shape::Pull],
            ShapeArg::Both => vec![Shape::Push, Shape::Pull],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Shm,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
        })
    }
}

impl FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "shm" => Ok(Transport::Shm),
            other => bail!("transport {other:?} is not tcp or shm"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Push,
    Pull,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Shape::Push => "push",
            Shape::Pull => "pull",
        })
    }
}

/// A control line from the prefill side to the decode side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// Reserve blocks and expect `handoff`; its KV is about to be computed and sent.
    Push {
        transport: Transport,
        handoff: HandoffId,
        max_tokens: u32,
        prompt: Vec<u32>,
    },
    /// The first token of a pushed handoff, sampled by the prefill side.
    First { handoff: HandoffId, token: u32 },
    /// The prefill side holds the prompt's KV; reserve blocks, expect `handoff` and ask for it.
    Pull {
        transport: Transport,
        handoff: HandoffId,
        max_tokens: u32,
        first: u32,
        prompt: Vec<u32>,
    },
}

/// A control line from the decode side to the prefill side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Endpoint(Endpoint),
    /// Every receiver is bound; requests may come.
    Ready,
    /// Blocks reserved and the handoff expected: the push may start.
    Expecting(HandoffId),
    /// Blocks reserved and the handoff expected: send the pulled KV now.
    Send(HandoffId),
    Done(Received),
}

/// What the decode side received and generated for one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    handoff: HandoffId,
    /// KV payload bytes delivered (frame headers not counted).
    bytes: u64,
    segments: u64,
    /// From the first segment's delivery to the handoff's completion.
    receive: Duration,
    /// Wall-clock time of the completion, microseconds since the Unix epoch (comparable across
    /// the two processes of one host).
    complete_unix_us: u64,
    /// Every generated token, the prefill side's first one included.
    tokens: Vec<u32>,
}

fn join_tokens(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_tokens(s: &str) -> anyhow::Result<Vec<u32>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|t| t.parse().with_context(|| format!("token id {t:?}")))
        .collect()
}

fn parse_handoff(s: Option<&str>) -> anyhow::Result<HandoffId> {
    let s = s.context("missing handoff id")?;
    Ok(HandoffId(
        s.parse().with_context(|| format!("handoff id {s:?}"))?,
    ))
}

fn parse_field<T: FromStr>(s: Option<&str>, what: &str) -> anyhow::Result<T>
where
    T::Err: Into<anyhow::Error>,
{
    let s = s.with_context(|| format!("missing {what}"))?;
    s.parse::<T>()
        .map_err(Into::into)
        .with_context(|| format!("{what} {s:?}"))
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Push {
                transport,
                handoff,
                max_tokens,
                prompt,
            } => write!(
                f,
                "push {transport} {} {max_tokens} {}",
                handoff.0,
                join_tokens(prompt)
            ),
            Request::First { handoff, token } => write!(f, "first {} {token}", handoff.0),
            Request::Pull {
                transport,
                handoff,
                max_tokens,
                first,
                prompt,
            } => write!(
                f,
                "pull {transport} {} {max_tokens} {first} {}",
                handoff.0,
                join_tokens(prompt)
            ),
        }
    }
}

impl FromStr for Request {
    type Err = anyhow::Error;
    fn from_str(line: &str) -> anyhow::Result<Self> {
        let mut w = line.split_whitespace();
        let request = match w.next() {
            Some("push") => Request::Push {
                transport: parse_field(w.next(), "transport")?,
                handoff: parse_handoff(w.next())?,
                max_tokens: parse_field(w.next(), "max tokens")?,
                prompt: parse_tokens(w.next().context("missing prompt")?)?,
            },
            Some("first") => Request::First {
                handoff: parse_handoff(w.next())?,
                token: parse_field(w.next(), "token")?,
            },
            Some("pull") => Request::Pull {
                transport: parse_field(w.next(), "transport")?,
                handoff: parse_handoff(w.next())?,
                max_tokens: parse_field(w.next(), "max tokens")?,
                first: parse_field(w.next(), "first token")?,
                prompt: parse_tokens(w.next().context("missing prompt")?)?,
            },
            _ => bail!("unknown request {line:?}"),
        };
        if w.next().is_some() {
            bail!("trailing fields in request {line:?}");
        }
        Ok(request)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Endpoint(Endpoint::Tcp(addr)) => write!(f, "endpoint tcp {addr}"),
            Reply::Endpoint(Endpoint::Shm(path)) => write!(f, "endpoint shm {}", path.display()),
            Reply::Ready => f.write_str("ready"),
            Reply::Expecting(h) => write!(f, "expecting {}", h.0),
            Reply::Send(h) => write!(f, "send {}", h.0),
            Reply::Done(r) => write!(
                f,
                "done {} bytes={} segments={} receive_us={} complete_unix_us={} tokens={}",
                r.handoff.0,
                r.bytes,
                r.segments,
                r.receive.as_micros(),
                r.complete_unix_us,
                join_tokens(&r.tokens)
            ),
        }
    }
}

impl FromStr for Reply {
    type Err = anyhow::Error;
    fn from_str(line: &str) -> anyhow::Result<Self> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Ok(match word {
            "endpoint" => match rest.split_once(' ') {
                Some(("tcp", addr)) => Reply::Endpoint(Endpoint::Tcp(
                    addr.parse::<SocketAddr>()
                        .with_context(|| format!("tcp endpoint {addr:?}"))?,
                )),
                // The rest of the line, spaces included, is the socket path.
                Some(("shm", path)) if !path.is_empty() => {
                    Reply::Endpoint(Endpoint::Shm(PathBuf::from(path)))
                }
                _ => bail!("unknown endpoint {rest:?}"),
            },
            "ready" if rest.is_empty() => Reply::Ready,
            "expecting" => Reply::Expecting(parse_handoff(Some(rest))?),
            "send" => Reply::Send(parse_handoff(Some(rest))?),
            "done" => {
                let mut w = rest.split_whitespace();
                let handoff = parse_handoff(w.next())?;
                let mut field = |key: &str| -> anyhow::Result<&str> {
                    let kv = w.next().with_context(|| format!("missing {key}="))?;
                    kv.strip_prefix(key)
                        .and_then(|v| v.strip_prefix('='))
                        .with_context(|| format!("expected {key}=, got {kv:?}"))
                };
                let bytes = parse_field(Some(field("bytes")?), "bytes")?;
                let segments = parse_field(Some(field("segments")?), "segments")?;
                let receive_us = parse_field(Some(field("receive_us")?), "receive_us")?;
                let complete_unix_us =
                    parse_field(Some(field("complete_unix_us")?), "complete_unix_us")?;
                let tokens = parse_tokens(field("tokens")?)?;
                Reply::Done(Received {
                    handoff,
                    bytes,
                    segments,
                    receive: Duration::from_micros(receive_us),
                    complete_unix_us,
                    tokens,
                })
            }
            _ => bail!("unknown reply {line:?}"),
        })
    }
}

/// Microseconds since the Unix epoch, for timestamps compared across processes.
fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The settings every engine of the demo shares; only the role differs, so that the prefill
/// side computes the prompt exactly as the single-process reference does.
fn engine_config(model: &Path, role: Role) -> EngineConfig {
    EngineConfig::new(model, role)
}

fn params(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_new_tokens: max_tokens,
        ..SamplingParams::default()
    }
}

const DEMO_TEXT: &str = "The printing press changed Europe within a single lifetime. Before \
    Gutenberg combined movable metal type, oil-based ink and a screw press around 1450, a book \
    was copied by hand over months and cost as much as a house. Fifty years later, presses were \
    running in more than two hundred cities, and millions of books had been printed. Ideas that \
    once travelled as slowly as a scribe could write now crossed the continent in weeks, and \
    scholars could compare identical copies of the same text for the first time. ";

/// A prompt of exactly `n` tokens: the model's encoding of [`DEMO_TEXT`], repeated.
fn demo_prompt(tokenizer: &Tokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    let base = tokenizer.encode(DEMO_TEXT, false)?;
    if base.is_empty() {
        bail!("the tokenizer encodes the demo text as no tokens");
    }
    Ok(base.iter().copied().cycle().take(n).collect())
}

/// Prefill and decode in one engine: the tokens every disaggregated run must equal.
fn single_process(
    model: &Path,
    prompt: &[u32],
    params: &SamplingParams,
) -> anyhow::Result<Vec<u32>> {
    let engine = Engine::load(engine_config(model, Role::Colocated))?;
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    let mut batcher = Batcher::new(engine, eos);
    batcher.submit(GenerateRequest {
        id: SeqId(0),
        prompt: prompt.to_vec(),
        params: params.clone(),
    })?;
    drain(&mut batcher, Vec::new())
}

/// Steps the batcher until it is idle, appending every generated token to `tokens`.
fn drain(batcher: &mut Batcher, mut tokens: Vec<u32>) -> anyhow::Result<Vec<u32>> {
    while !batcher.is_idle() {
        for event in batcher.step()? {
            match event {
                Event::Token { token, .. } => tokens.push(token.id),
                Event::Failed { seq, error } => bail!("{seq} failed: {error}"),
            }
        }
    }
    Ok(tokens)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run(args: KvDemoArgs) -> anyhow::Result<()> {
    let model = crate::model_path::resolve(args.model.clone())?;
    if args.decode_side {
        return decode_side(&model, args.transport);
    }
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    // Started first, so its model load overlaps the reference run.
    let mut decode = DecodeProcess::spawn(&model, args.transport)?;

    let mut prefill = Engine::load(engine_config(&model, Role::Prefill))?;
    let tokenizer = prefill.tokenizer().clone();
    let prompt = demo_prompt(&tokenizer, args.prompt_tokens)?;
    let room = prefill.max_context().saturating_sub(prompt.len());
    if args.max_tokens as usize > room {
        bail!(
            "{} prompt tokens and {} new ones exceed the model's {}-token context",
            prompt.len(),
            args.max_tokens,
            prefill.max_context()
        );
    }
    let params = params(args.max_tokens);
    let expected = single_process(&model, &prompt, &params)?;

    let mut endpoints = Vec::new();
    loop {
        match decode.reply()? {
            Reply::Endpoint(e) => endpoints.push(e),
            Reply::Ready => break,
            other => bail!("decode side: expected an endpoint, got {other:?}"),
        }
    }

    let layers = prefill.model_config().num_layers;
    let layer_bytes = prefill.kv_layer_bytes(prompt.len());
    let kv_bytes = (layers * layer_bytes) as u64;
    println!(
        "baton kv-demo: {} ({} layers), prompt {} tokens, {} new tokens, greedy",
        model.display(),
        layers,
        prompt.len(),
        args.max_tokens
    );
    println!(
        "kv of the prompt: {layers} layers x {layer_bytes} B = {kv_bytes} B ({} kv, block {} tokens)",
        prefill.kv_dtype().name(),
        prefill.block_size()
    );
    println!("decode side: pid {}", decode.child.id());
    for e in &endpoints {
        println!("  receives on {e}");
    }
    println!(
        "single-process reference: {} tokens {:?}",
        expected.len(),
        expected
    );

    let rt = runtime()?;
    let mut failures = Vec::new();
    let mut next_handoff = 1;
    for transport in args.transport.transports() {
        let endpoint = endpoints
            .iter()
            .find(|e| {
                matches!(
                    (transport, e),
                    (Transport::Tcp, Endpoint::Tcp(_)) | (Transport::Shm, Endpoint::Shm(_))
                )
            })
            .with_context(|| format!("decode side offers no {transport} endpoint"))?;
        let link = rt
            .block_on(Link::connect(
                endpoint,
                prefill.descriptor().clone(),
                &LinkConfig::default(),
            ))
            .with_context(|| format!("connect to {endpoint}"))?;
        let link = Arc::new(link);
        for shape in args.shape.shapes() {
            let handoff = HandoffId(next_handoff);
            next_handoff += 1;
            let run = DemoRun {
                transport,
                handoff,
                prompt: &prompt,
                params: &params,
            };
            let outcome = match shape {
                Shape::Push => run.push(&mut prefill, &rt, &link, &mut decode)?,
                Shape::Pull => run.pull(&mut prefill, &rt, &link, &mut decode)?,
            };
            let problems = outcome.report(
                &format!("{transport} {shape}"),
                kv_bytes,
                &expected,
                &tokenizer,
            );
            failures.extend(
                problems
                    .into_iter()
                    .map(|p| format!("{transport} {shape}: {p}")),
            );
        }
        println!(
            "{transport} link: {} frame bytes sent in total",
            link.stats().snapshot().bytes_sent
        );
    }
    decode.finish()?;
    if !failures.is_empty() {
        bail!("kv-demo failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// The decode side, a child process of this one, and its control pipes.
struct DecodeProcess {
    child: Child,
    requests: Option<ChildStdin>,
    replies: Lines<BufReader<ChildStdout>>,
    finished: bool,
}

impl DecodeProcess {
    fn spawn(model: &Path, transport: TransportArg) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locate the baton executable")?;
        let mut child = Command::new(exe)
            .arg("kv-demo")
            .arg("--decode-side")
            .arg("--model")
            .arg(model)
            .args(["--transport", transport.as_str()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the decode side")?;
        let requests = child.stdin.take().context("decode side stdin")?;
        let replies = BufReader::new(child.stdout.take().context("decode side stdout")?).lines();
        Ok(Self {
            child,
            requests: Some(requests),
            replies,
            finished: false,
        })
    }

    fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let pipe = self.requests.as_mut().context("decode side stdin closed")?;
        writeln!(pipe, "{request}")
            .and_then(|()| pipe.flush())
            .context("write to the decode side")
    }

    fn reply(&mut self) -> anyhow::Result<Reply> {
        match self.replies.next() {
            Some(line) => line.context("read from the decode side")?.parse(),
            None => {
                let status = self.child.wait()?;
                self.finished = true;
                bail!("the decode side exited ({status}) before replying")
            }
        }
    }

    /// Closes the decode side's stdin, which ends it, and checks that it exited cleanly.
    fn finish(mut self) -> anyhow::Result<()> {
        drop(self.requests.take());
        let status = self.child.wait()?;
        self.finished = true;
        if !status.success() {
            bail!("the decode side exited with {status}");
        }
        Ok(())
    }
}

impl Drop for DecodeProcess {
    fn drop(&mut self) {
        // On an error mid-transfer the child may wait for deliveries that will never come.
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One (transport, shape) run's parameters.
struct DemoRun<'a> {
    transport: Transport,
    handoff: HandoffId,
    prompt: &'a [u32],
    params: &'a SamplingParams,
}

/// What one run measured on both sides.
struct Outcome {
    shape: Shape,
    sent: SendReport,
    /// Prefill compute, and the wall-clock time it ended (push only: the compute overlaps the
    /// transfer).
    compute: Duration,
    compute_end_unix_us: Option<u64>,
    received: Received,
}

impl DemoRun<'_> {
    fn seq(&self) -> SeqId {
        SeqId(self.handoff.0)
    }

    /// The decode side expects the handoff; then each prefill step's layers leave as they are
    /// computed; then the first token follows.
    fn push(
        &self,
        engine: &mut Engine,
        rt: &tokio::runtime::Runtime,
        link: &Arc<Link>,
        decode: &mut DecodeProcess,
    ) -> anyhow::Result<Outcome> {
        decode.send(&Request::Push {
            transport: self.transport,
            handoff: self.handoff,
            max_tokens: self.params.max_new_tokens,
            prompt: self.prompt.to_vec(),
        })?;
        match decode.reply()? {
            Reply::Expecting(h) if h == self.handoff => {}
            other => bail!("decode side: expected `expecting`, got {other:?}"),
        }
        let seq = self.seq();
        engine.add_sequence(seq, self.prompt.to_vec())?;
        let queue = PrefillConfig::new(engine.config().clone()).segment_queue;
        let (tx, rx) = mpsc::channel::<KvSegment>(queue);
        let sender = link.clone();
        let send = rt.spawn(async move { send_all(&sender, rx).await });
        let kv_heads = engine.descriptor().kv_heads.clone();
        let chunk = engine.config().prefill_chunk_tokens;
        let started = Instant::now();
        let mut logits = None;
        let mut broken = false;
        while engine.computed(seq)? < self.prompt.len() {
            let tokens = chunk.min(self.prompt.len() - engine.computed(seq)?);
            let out = engine.step_with_export(
                &[StepItem {
                    seq,
                    tokens,
                    phase: Phase::Prefill,
                }],
                &[seq],
                &mut |_, chunk| {
                    let segment = KvSegment {
                        handoff: self.handoff,
                        kv_heads: kv_heads.clone(),
                        chunk,
                    };
                    // Waits while the transport is behind; a closed channel means it failed,
                    // which the send task reports.
                    if !broken && tx.blocking_send(segment).is_err() {
                        broken = true;
                    }
                    Ok(())
                },
            )?;
            logits = out.into_iter().next().and_then(|o| o.logits);
        }
        let compute = started.elapsed();
        let compute_end_unix_us = unix_us(SystemTime::now());
        drop(tx);
        let logits = logits.context("the prompt's last step gave no logits")?;
        let first = Sampler::new(self.params, self.prompt).sample(&logits).id;
        engine.release(seq);
        let sent = rt.block_on(send)?.context("send the kv")?;
        if broken {
            bail!("the transport stopped taking kv");
        }
        decode.send(&Request::First {
            handoff: self.handoff,
            token: first,
        })?;
        Ok(Outcome {
            shape: Shape::Push,
            sent,
            compute,
            compute_end_unix_us: Some(compute_end_unix_us),
            received: self.done(decode)?,
        })
    }

    /// The prompt is computed and kept; when the decode side asks, every layer is exported in
    /// runs that fit one segment and sent.
    fn pull(
        &self,
        engine: &mut Engine,
        rt: &tokio::runtime::Runtime,
        link: &Arc<Link>,
        decode: &mut DecodeProcess,
    ) -> anyhow::Result<Outcome> {
        let seq = self.seq();
        engine.add_sequence(seq, self.prompt.to_vec())?;
        let chunk = engine.config().prefill_chunk_tokens;
        let started = Instant::now();
        let mut logits = None;
        while engine.computed(seq)? < self.prompt.len() {
            let tokens = chunk.min(self.prompt.len() - engine.computed(seq)?);
            let out = engine.step(&[StepItem {
                seq,
                tokens,
                phase: Phase::Prefill,
            }])?;
            logits = out.into_iter().next().and_then(|o| o.logits);
        }
        let compute = started.elapsed();
        let logits = logits.context("the prompt's last step gave no logits")?;
        let first = Sampler::new(self.params, self.prompt).sample(&logits).id;

        decode.send(&Request::Pull {
            transport: self.transport,
            handoff: self.handoff,
            max_tokens: self.params.max_new_tokens,
            first,
            prompt: self.prompt.to_vec(),
        })?;
        match decode.reply()? {
            Reply::Send(h) if h == self.handoff => {}
            other => bail!("decode side: expected `send`, got {other:?}"),
        }
        let queue = PrefillConfig::new(engine.config().clone()).segment_queue;
        let (tx, rx) = mpsc::channel::<KvSegment>(queue);
        let sender = link.clone();
        let send = rt.spawn(async move { send_all(&sender, rx).await });
        let d = engine.descriptor();
        let kv_heads = d.kv_heads.clone();
        let run = max_blocks_per_segment(d.bytes_per_token_half() * 2 * d.block_size as usize);
        let blocks = engine.blocks_held(seq)?;
        let exported = (|| -> anyhow::Result<()> {
            for layer in 0..engine.model_config().num_layers {
                for first_block in (0..blocks).step_by(run) {
                    let chunk =
                        engine.export(seq, layer, first_block..(first_block + run).min(blocks))?;
                    let segment = KvSegment {
                        handoff: self.handoff,
                        kv_heads: kv_heads.clone(),
                        chunk,
                    };
                    if tx.blocking_send(segment).is_err() {
                        bail!("the transport stopped taking kv");
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        engine.release(seq);
        let sent = rt.block_on(send)?.context("send the kv")?;
        exported?;
        Ok(Outcome {
            shape: Shape::Pull,
            sent,
            compute,
            compute_end_unix_us: None,
            received: self.done(decode)?,
        })
    }

    fn done(&self, decode: &mut DecodeProcess) -> anyhow::Result<Received> {
        match decode.reply()? {
            Reply::Done(r) if r.handoff == self.handoff => Ok(r),
            other => bail!("decode side: expected `done`, got {other:?}"),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Outcome {
    /// Prints the run and returns what is wrong with it.
    fn report(
        &self,
        name: &str,
        kv_bytes: u64,
        expected: &[u32],
        tokenizer: &Tokenizer,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let r = &self.received;
        let s = &self.sent;
        let send_window = s
            .first
            .map_or(Duration::ZERO, |f| s.done.saturating_duration_since(f));
        println!();
        println!("== {name} ({}) ==", r.handoff);
        match self.shape {
            Shape::Push => println!(
                "prefill        {:.2} ms of compute, each layer sent as it was computed",
                ms(self.compute)
            ),
            Shape::Pull => println!(
                "prefill        {:.2} ms of compute, then kept until the decode side asked",
                ms(self.compute)
            ),
        }
        println!(
            "kv sent        {} B in {} segments, {:.2} ms from first to last send",
            s.bytes,
            s.segments,
            ms(send_window)
        );
        println!(
            "kv received    {} B in {} segments, {:.2} ms from first segment to complete",
            r.bytes,
            r.segments,
            ms(r.receive)
        );
        if let Some(end) = self.compute_end_unix_us {
            let exposed = r.complete_unix_us as i64 - end as i64;
            println!(
                "exposed        {:.2} ms from the end of compute to the last segment at the decode side",
                exposed as f64 / 1e3
            );
        }
        for (side, bytes) in [("sent", s.bytes), ("received", r.bytes)] {
            if bytes != kv_bytes {
                problems.push(format!("{bytes} B {side}, expected {kv_bytes}"));
            }
        }
        let text = tokenizer
            .decode(&r.tokens, true)
            .unwrap_or_else(|e| format!("<not decodable: {e}>"));
        println!("tokens         {:?}", r.tokens);
        println!("text           {text:?}");
        if r.tokens == expected {
            println!(
                "MATCH {name}: {} tokens equal the single-process run; {} B of kv moved",
                r.tokens.len(),
                r.bytes
            );
        } else {
            let at = r
                .tokens
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(r.tokens.len().min(expected.len()));
            println!(
                "MISMATCH {name}: tokens differ from the single-process run at index {at} ({} against {} tokens)",
                r.tokens.len(),
                expected.len()
            );
            problems.push(format!("tokens differ at index {at}"));
        }
        problems
    }
}

/// One bound receiver of the decode side and the channel its deliveries arrive on.
struct Receiving {
    transport: Transport,
    receiver: Box<dyn KvReceiver>,
    deliveries: mpsc::Receiver<Delivery>,
}

/// The decode side: binds the receivers, then serves requests from stdin until it closes.
fn decode_side(model: &Path, transports: TransportArg) -> anyhow::Result<()> {
    let rt = runtime()?;
    let engine = Engine::load(engine_config(model, Role::Decode))?;
    let local = engine.descriptor().clone();
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    let mut batcher = Batcher::new(engine, eos);
    let mut out = std::io::stdout().lock();
    let mut reply = |r: Reply| -> anyhow::Result<()> {
        writeln!(out, "{r}")?;
        out.flush()?;
        Ok(())
    };
    let mut receiving = Vec::new();
    for transport in transports.transports() {
        let (receiver, deliveries, endpoint): (Box<dyn KvReceiver>, _, _) = match transport {
            Transport::Tcp => {
                let addr = SocketAddr::from(([127, 0, 0, 1], 0));
                let (r, rx) =
                    rt.block_on(TcpReceiver::bind(addr, local.clone(), TcpConfig::default()))?;
                let endpoint = Endpoint::Tcp(r.local_addr());
                (Box::new(r), rx, endpoint)
            }
            Transport::Shm => {
                let path =
                    std::env::temp_dir().join(format!("baton-kv-demo-{}.sock", std::process::id()));
                let (r, rx) = rt.block_on(ShmReceiver::bind(
                    &path,
                    local.clone(),
                    ShmConfig::default(),
                ))?;
                (Box::new(r), rx, Endpoint::Shm(path))
            }
        };
        reply(Reply::Endpoint(endpoint))?;
        receiving.push(Receiving {
            transport,
            receiver,
            deliveries,
        });
    }
    reply(Reply::Ready)?;

    let mut requests = std::io::stdin().lock().lines();
    while let Some(line) = requests.next() {
        let request: Request = line?.parse()?;
        let (transport, handoff, max_tokens, prompt, pulled_first) = match request {
            Request::Push {
                transport,
                handoff,
                max_tokens,
                prompt,
            } => (transport, handoff, max_tokens, prompt, None),
            Request::Pull {
                transport,
                handoff,
                max_tokens,
                first,
                prompt,
            } => (transport, handoff, max_tokens, prompt, Some(first)),
            Request::First { handoff, .. } => {
                bail!("first token of {handoff}, which is not pushed")
            }
        };
        let r = receiving
            .iter_mut()
            .find(|r| r.transport == transport)
            .with_context(|| format!("no {transport} receiver is bound"))?;
        let seq = SeqId(handoff.0);
        let tokens = prompt.len() as u32;
        batcher.engine_mut().begin_import(seq, prompt)?;
        r.receiver
            .expect(handoff, Expectation::whole_sequence(&local, tokens))?;
        reply(match pulled_first {
            None => Reply::Expecting(handoff),
            Some(_) => Reply::Send(handoff),
        })?;
        let (bytes, segments, receive) =
            import_deliveries(&mut r.deliveries, handoff, batcher.engine_mut(), seq)?;
        let complete_unix_us = unix_us(SystemTime::now());
        batcher.engine_mut().finish_import(seq)?;
        let first = match pulled_first {
            Some(first) => first,
            None => match requests
                .next()
                .context("stdin closed before the first token")??
                .parse()?
            {
                Request::First { handoff: h, token } if h == handoff => token,
                other => bail!("expected the first token of {handoff}, got {other:?}"),
            },
        };
        batcher.resume_imported(seq, params(max_tokens), first)?;
        let tokens = drain(&mut batcher, vec![first])?;
        reply(Reply::Done(Received {
            handoff,
            bytes,
            segments,
            receive,
            complete_unix_us,
            tokens,
        }))?;
    }
    Ok(())
}

/// Imports `handoff`'s segments as they are delivered until it completes; returns the payload
/// bytes, the segments and the time from the first delivery to the completion.
fn import_deliveries(
    deliveries: &mut mpsc::Receiver<Delivery>,
    handoff: HandoffId,
    engine: &mut Engine,
    seq: SeqId,
) -> anyhow::Result<(u64, u64, Duration)> {
    let (mut bytes, mut segments, mut first) = (0, 0, None);
    loop {
        match deliveries.blocking_recv() {
            Some(Delivery::Segment(s)) if s.handoff == handoff => {
                first.get_or_insert_with(Instant::now);
                bytes += s.chunk.data.len() as u64;
                segments += 1;
                engine.import(seq, &s.chunk)?;
            }
            Some(Delivery::Complete(h)) if h == handoff => {
                let receive = first.map_or(Duration::ZERO, |f: Instant| f.elapsed());
                return Ok((bytes, segments, receive));
            }
            Some(Delivery::Segment(s)) => bail!("a segment of {}, expected {handoff}", s.handoff),
            Some(Delivery::Complete(h)) => bail!("{h} completed, expected {handoff}"),
            Some(Delivery::Failed { handoff, error }) => bail!("{handoff} failed: {error}"),
            Some(Delivery::Rejected { handoff, error }) => {
                bail!("a frame of {handoff:?} was rejected: {error}")
            }
            None => bail!("the receiver stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_lines() {
        let requests = [
            Request::Push {
                transport: Transport::Tcp,
                handoff: HandoffId(7),
                max_tokens: 8,
                prompt: vec![1, 2, 3],
            },
            Request::First {
                handoff: HandoffId(7),
                token: 42,
            },
            Request::Pull {
                transport: Transport::Shm,
                handoff: HandoffId(8),
                max_tokens: 1,
                first: 9,
                prompt: vec![5],
            },
        ];
        for r in requests {
            assert_eq!(r.to_string().parse::<Request>().expect("parses"), r);
        }
    }

    #[test]
    fn replies_round_trip_through_their_lines() {
        let replies = [
            Reply::Endpoint(Endpoint::Tcp("127.0.0.1:4000".parse().expect("addr"))),
            Reply::Endpoint(Endpoint::Shm(PathBuf::from("/tmp/a dir/x.sock"))),
            Reply::Ready,
            Reply::Expecting(HandoffId(3)),
            Reply::Send(HandoffId(4)),
            Reply::Done(Received {
                handoff: HandoffId(5),
                bytes: 2_949_120,
                segments: 30,
                receive: Duration::from_micros(1234),
                complete_unix_us: 1_700_000_000_000_000,
                tokens: vec![10, 20, 30],
            }),
        ];
        for r in replies {
            assert_eq!(r.to_string().parse::<Reply>().expect("parses"), r);
        }
    }

    #[test]
    fn malformed_control_lines_are_refused() {
        for line in [
            "",
            "push udp 1 8 1,2",
            "first x 3",
            "pull tcp 1 8 2 1,2 extra",
        ] {
            assert!(line.parse::<Request>().is_err(), "{line:?}");
        }
        for line in [
            "endpoint tcp nowhere",
            "done 1 bytes=3",
            "ready now",
            "hello",
        ] {
            assert!(line.parse::<Reply>().is_err(), "{line:?}");
        }
    }
}

//! `baton-lab groups`: what splitting the model over tensor- and pipeline-parallel ranks costs
//! and saves on this machine (issue 21). A 2-core CPU cannot run a group faster than one
//! process; the figures say by how much it is slower, how much memory a rank holds, and what
//! moving KV between differently split groups moves.
//!
//! - Memory: each rank of each layout loaded in its own process (this binary re-run with
//!   `--rank-memory`), its resident set after loading (VmRSS) and its peak (VmHWM), against the
//!   whole model in one process.
//! - Speed: TTFT (one prompt's prefill) and TPOT (greedy decode steps) of each layout, ranks as
//!   threads with one core's pool each ([`LocalGroup`]), against the whole model in one engine
//!   (the same process, both cores), alternated per repeat.
//! - Rank processes: the same layouts as `baton rank` processes (each its own rayon pool over
//!   both cores) driven over their links from this process ([`RemoteGroup`]), TTFT and TPOT
//!   against the whole engine here, alternated, and each rank's resident memory after the run.
//! - Transfer: a prompt's KV moved from each prefill layout to each decode layout of the
//!   issue's table by the transfer plan (each source rank's copies into each destination rank's
//!   pool, memcpy in this process), bytes per rank and copy time against 1:1.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_engine::local_group::LocalGroup;
use baton_engine::{Engine, EngineConfig, Phase, Role, SeqId, Shard, StepItem, StepOutput};
use baton_group::RemoteGroup;
use baton_kv_transfer::memory::SeqBlocks;
use baton_kv_transfer::plan::plan;

#[derive(clap::Args)]
pub struct GroupsArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt tokens prefilled (TTFT) and moved (transfer).
    #[arg(long, default_value_t = 256)]
    prompt: usize,
    /// Decode steps timed for TPOT.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Each figure is the median of this many runs.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the rank-process measurements (they need the `baton` binary: beside this one, or
    /// `$BATON_EXE`).
    #[arg(long)]
    no_processes: bool,
    /// Internal: load one rank (`TP,RANK,FIRST..END`) and print its memory.
    #[arg(long, hide = true)]
    rank_memory: Option<String>,
}

/// A group's shape: `tp` ranks per stage, the stages' layer ranges.
#[derive(Clone)]
struct Layout {
    name: &'static str,
    tp: usize,
    stages: Vec<Range<usize>>,
}

/// `layers` cut into `n` contiguous stages.
fn stages(layers: usize, n: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|i| layers * i / n..layers * (i + 1) / n)
        .collect()
}

fn layouts(layers: usize) -> Vec<Layout> {
    let split = |n: usize| stages(layers, n);
    vec![
        Layout {
            name: "tp1 pp1",
            tp: 1,
            stages: split(1),
        },
        Layout {
            name: "tp3",
            tp: 3,
            stages: split(1),
        },
        Layout {
            name: "pp2",
            tp: 1,
            stages: split(2),
        },
        Layout {
            name: "pp3",
            tp: 1,
            stages: split(3),
        },
        Layout {
            name: "tp3 x pp2",
            tp: 3,
            stages: split(2),
        },
    ]
}

fn config(model: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(model, Role::Colocated);
    c.kv_cache_bytes = 64 << 20;
    c
}

pub fn run(args: GroupsArgs) -> anyhow::Result<()> {
    let model = baton::model_path::resolve(args.model.clone())?;
    if let Some(spec) = &args.rank_memory {
        return rank_memory(&model, spec);
    }
    let whole = Engine::load(config(&model))?;
    let layers = whole.model_config().num_layers;
    drop(whole);
    let all = layouts(layers);
    memory(&all)?;
    speed(&model, &all, &args)?;
    if !args.no_processes {
        processes(&model, &all, &args)?;
    }
    transfer(&model, layers, &args)?;
    Ok(())
}

/// The child: loads one rank and prints `rss_kib hwm_kib`.
fn rank_memory(model: &std::path::Path, spec: &str) -> anyhow::Result<()> {
    let bad = || format!("--rank-memory {spec:?}: expected TP,RANK,FIRST..END");
    let parts: Vec<&str> = spec.split(',').collect();
    let [tp, rank, layers] = parts[..] else {
        bail!(bad());
    };
    let (first, end) = layers.split_once("..").with_context(bad)?;
    let mut c = config(model);
    c.shard = Shard {
        tp_rank: rank.parse().with_context(bad)?,
        tp_size: tp.parse().with_context(bad)?,
        layers: Some(first.parse().with_context(bad)?..end.parse().with_context(bad)?),
    };
    // The group's collective only maps its segment: a rank loads without the others.
    let collective = if c.shard.tp_size > 1 {
        let path =
            std::env::temp_dir().join(format!("baton-lab-rank-memory-{}", std::process::id()));
        let g = baton_collective::ShmGroup::open(
            &path,
            c.shard.tp_rank,
            c.shard.tp_size,
            1 << 20,
            Duration::from_secs(1),
        )?;
        let _ = std::fs::remove_file(&path);
        Some(std::sync::Arc::new(g) as std::sync::Arc<dyn baton_collective::Collective>)
    } else {
        None
    };
    let engine = Engine::load_rank(c, collective)?;
    let (rss, hwm) = proc_memory()?;
    println!("{rss} {hwm}");
    drop(engine);
    Ok(())
}

fn proc_memory() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("/proc/self/status has no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn memory(all: &[Layout]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    println!("memory per rank (own process each; kv pool 64 MiB reserved, untouched)");
    println!(
        "{:<10} {:>5} {:>8} {:>10} {:>10} {:>8}",
        "layout", "rank", "layers", "rss MiB", "peak MiB", "of whole"
    );
    let mut whole_rss = 0.0;
    for l in all {
        for (s, layers) in l.stages.iter().enumerate() {
            for r in 0..l.tp {
                let out = std::process::Command::new(&exe)
                    .args([
                        "groups",
                        "--rank-memory",
                        &format!("{},{r},{}..{}", l.tp, layers.start, layers.end),
                    ])
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "rank {r} of {}: {}",
                        l.name,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let v: Vec<f64> = text
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let [rss, hwm] = v[..] else {
                    bail!("rank {r} of {} printed {text:?}", l.name);
                };
                let (rss, hwm) = (rss / 1024.0, hwm / 1024.0);
                if l.tp == 1 && l.stages.len() == 1 {
                    whole_rss = rss;
                }
                println!(
                    "{:<10} {:>5} {:>8} {:>10.1} {:>10.1} {:>8.2}",
                    l.name,
                    format!("{s}.{r}"),
                    format!("{}..{}", layers.start, layers.end),
                    rss,
                    hwm,
                    rss / whole_rss
                );
            }
        }
    }
    Ok(())
}

fn prompt_tokens(n: usize) -> Vec<u32> {
    // Ordinary token ids (the vocabulary's first thousands are common words and pieces).
    (0..n).map(|i| 300 + (i * 7919 % 5000) as u32).collect()
}

fn logits(out: Vec<StepOutput>) -> anyhow::Result<Vec<f32>> {
    out.into_iter()
        .next()
        .and_then(|o| o.logits)
        .context("no logits")
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Something that prefills and decodes one sequence: the whole engine or a group.
trait Runner {
    fn add(&mut self, id: SeqId, tokens: &[u32]) -> anyhow::Result<()>;
    fn step(&mut self, item: StepItem) -> anyhow::Result<Vec<f32>>;
    fn push(&mut self, id: SeqId, token: u32) -> anyhow::Result<()>;
    fn release(&mut self, id: SeqId) -> anyhow::Result<()>;
}

impl Runner for Engine {
    fn add(&mut self, id: SeqId, tokens: &[u32]) -> anyhow::Result<()> {
        Ok(self.add_sequence(id, tokens.to_vec())?)
    }
    fn step(&mut self, item: StepItem) -> anyhow::Result<Vec<f32>> {
        logits(Engine::step(self, &[item])?)
    }
    fn push(&mut self, id: SeqId, token: u32) -> anyhow::Result<()> {
        Ok(self.push_token(id, token)?)
    }
    fn release(&mut self, id: SeqId) -> anyhow::Result<()> {
        Engine::release(self, id);
        Ok(())
    }
}

/// A group drives one sequence the same way whether its ranks are threads or processes.
macro_rules! group_runner {
    ($group:ty) => {
        impl Runner for $group {
            fn add(&mut self, id: SeqId, tokens: &[u32]) -> anyhow::Result<()> {
                Ok(self.add_sequence(id, tokens)?)
            }
            fn step(&mut self, item: StepItem) -> anyhow::Result<Vec<f32>> {
                logits(<$group>::step(self, &[item])?)
            }
            fn push(&mut self, id: SeqId, token: u32) -> anyhow::Result<()> {
                Ok(self.push_token(id, token)?)
            }
            fn release(&mut self, id: SeqId) -> anyhow::Result<()> {
                Ok(<$group>::release(self, id)?)
            }
        }
    };
}

group_runner!(RemoteGroup);
group_runner!(LocalGroup);

/// TTFT (the prompt's prefill in 512-token chunks) and mean TPOT over `decode` greedy steps.
fn time_one(
    runner: &mut dyn Runner,
    id: SeqId,
    prompt: &[u32],
    decode: usize,
) -> anyhow::Result<(Duration, Duration)> {
    runner.add(id, prompt)?;
    let started = Instant::now();
    let mut done = 0;
    let mut last = Vec::new();
    while done < prompt.len() {
        let n = (prompt.len() - done).min(512);
        last = runner.step(StepItem {
            seq: id,
            tokens: n,
            phase: Phase::Prefill,
        })?;
        done += n;
    }
    let ttft = started.elapsed();
    let started = Instant::now();
    let mut next = argmax(&last);
    for _ in 0..decode {
        runner.push(id, next)?;
        next = argmax(&runner.step(StepItem {
            seq: id,
            tokens: 1,
            phase: Phase::Decode,
        })?);
    }
    let tpot = started.elapsed() / decode.max(1) as u32;
    runner.release(id)?;
    Ok((ttft, tpot))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn speed(model: &std::path::Path, all: &[Layout], args: &GroupsArgs) -> anyhow::Result<()> {
    let prompt = prompt_tokens(args.prompt);
    println!();
    println!(
        "speed: {}-token prompt, {} decode steps, median of {} (each layout alternated with the whole engine)",
        args.prompt, args.decode, args.repeats
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "layout", "ttft ms", "whole ms", "tpot ms", "whole ms", "ttft x", "tpot x"
    );
    let mut whole = Engine::load(config(model))?;
    let mut id = 0;
    for l in all {
        let mut group = LocalGroup::start(&config(model), l.tp, &l.stages)?;
        let (mut gt, mut gp, mut wt, mut wp) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.repeats {
            id += 1;
            let (t, p) = time_one(&mut whole, SeqId(id), &prompt, args.decode)?;
            wt.push(t);
            wp.push(p);
            let (t, p) = time_one(&mut group, SeqId(id), &prompt, args.decode)?;
            gt.push(t);
            gp.push(p);
        }
        let (gt, gp, wt, wp) = (median(gt), median(gp), median(wt), median(wp));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.2} {:>10.2} {:>8.2} {:>8.2}",
            l.name,
            ms(gt),
            ms(wt),
            ms(gp),
            ms(wp),
            ms(gt) / ms(wt),
            ms(gp) / ms(wp)
        );
    }
    Ok(())
}

/// Rank processes this experiment started, killed when it is done with them.
struct Ranks(Vec<std::process::Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no VmRSS"))
}

fn processes(model: &std::path::Path, all: &[Layout], args: &GroupsArgs) -> anyhow::Result<()> {
    let exe = baton::up::baton_exe()?;
    let prompt = prompt_tokens(args.prompt);
    println!();
    println!(
        "rank processes (`baton rank`, driven over TCP from here): {}-token prompt, {} decode steps, median of {}, alternated with the whole engine in this process",
        args.prompt, args.decode, args.repeats
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}  rss MiB per rank",
        "layout", "ttft ms", "whole ms", "tpot ms", "whole ms", "ttft x", "tpot x"
    );
    let mut whole = Engine::load(config(model))?;
    let engine_json = serde_json::to_string(&config(model))?;
    let secret = format!("baton-lab-groups-{}", std::process::id());
    let mut id = 1000;
    for l in all.iter().filter(|l| l.tp * l.stages.len() > 1) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let mut ranks = Ranks(Vec::new());
        let mut segments = Vec::new();
        for (s, layers) in l.stages.iter().enumerate() {
            let segment = format!("/dev/shm/baton-lab-groups-{}-{s}", std::process::id());
            let _ = std::fs::remove_file(&segment);
            segments.push(segment.clone());
            for r in 0..l.tp {
                let mut cmd = std::process::Command::new(&exe);
                cmd.env(baton_group::SECRET_ENV, &secret)
                    .args(["rank", "--group-addr", &addr])
                    .args(["--rank", &(s * l.tp + r).to_string()])
                    .args(["--tp", &l.tp.to_string()])
                    .args(["--layers", &format!("{}..{}", layers.start, layers.end)])
                    .args(["--role", "colocated", "--engine-json", &engine_json]);
                if l.tp > 1 {
                    cmd.args(["--collective", &segment]);
                }
                ranks.0.push(cmd.spawn()?);
            }
        }
        let mut group = RemoteGroup::accept(
            &listener,
            &secret,
            l.tp,
            &l.stages,
            Duration::from_secs(120),
            Duration::from_secs(600),
        )?;
        let (mut gt, mut gp, mut wt, mut wp) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.repeats {
            id += 1;
            let (t, p) = time_one(&mut whole, SeqId(id), &prompt, args.decode)?;
            wt.push(t);
            wp.push(p);
            let (t, p) = time_one(&mut group, SeqId(id), &prompt, args.decode)?;
            gt.push(t);
            gp.push(p);
        }
        let rss = ranks
            .0
            .iter()
            .map(|c| rss_kib(c.id()).map(|k| format!("{:.0}", k as f64 / 1024.0)))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join("/");
        drop(group);
        drop(ranks);
        for s in segments {
            let _ = std::fs::remove_file(s);
        }
        let (gt, gp, wt, wp) = (median(gt), median(gp), median(wt), median(wp));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.2} {:>10.2} {:>8.2} {:>8.2}  {}",
            l.name,
            ms(gt),
            ms(wt),
            ms(gp),
            ms(wp),
            ms(gt) / ms(wt),
            ms(gp) / ms(wp),
            rss
        );
    }
    Ok(())
}

fn transfer(model: &std::path::Path, layers: usize, args: &GroupsArgs) -> anyhow::Result<()> {
    let one = |tp: usize, pp: usize| Layout {
        name: "",
        tp,
        stages: stages(layers, pp),
    };
    let pairs: Vec<(&str, Layout, Layout)> = vec![
        ("tp1 -> tp1", one(1, 1), one(1, 1)),
        ("tp1 -> tp3", one(1, 1), one(3, 1)),
        ("tp3 -> tp1", one(3, 1), one(1, 1)),
        ("pp2 -> tp1", one(1, 2), one(1, 1)),
        ("tp1 -> pp2", one(1, 1), one(1, 2)),
        ("tp3 -> pp2", one(3, 1), one(1, 2)),
        ("tp3xpp2 -> tp1", one(3, 2), one(1, 1)),
    ];
    let prompt = prompt_tokens(args.prompt);
    println!();
    println!(
        "transfer: a {}-token prompt's KV, plan copies between rank pools (memcpy in one process), median of {}",
        args.prompt, args.repeats
    );
    println!(
        "{:<15} {:>7} {:>10} {:>10} {:>8}  bytes per source rank -> per destination rank",
        "pair", "copies", "MiB", "copy ms", "vs 1:1"
    );
    let mut base_ms = 0.0;
    for (name, p, d) in pairs {
        let c = config(model);
        let prefill = LocalGroup::start(&c, p.tp, &p.stages)?;
        let decode = LocalGroup::start(&c, d.tp, &d.stages)?;
        let id = SeqId(1);
        prefill.add_sequence(id, &prompt)?;
        let mut done = 0;
        while done < prompt.len() {
            let n = (prompt.len() - done).min(512);
            prefill.step(&[StepItem {
                seq: id,
                tokens: n,
                phase: Phase::Prefill,
            }])?;
            done += n;
        }
        let src_blocks = prefill.block_ids(id)?;
        let planned = plan(
            &prefill.descriptors(),
            &decode.descriptors(),
            0..prompt.len().div_ceil(c.block_size) as u32,
        )?;
        let mut times = Vec::new();
        let mut per = (vec![0u64; src_blocks.len()], Vec::new(), 0usize);
        for r in 0..args.repeats {
            let dst_blocks = decode.reserve(SeqId(100 + r as u64), prompt.len())?;
            let sources: Vec<SeqBlocks> = prefill
                .ranks()
                .iter()
                .zip(&src_blocks)
                .map(|(rank, blocks)| SeqBlocks {
                    pool: rank.pool(),
                    blocks,
                })
                .collect();
            let destinations: Vec<SeqBlocks> = decode
                .ranks()
                .iter()
                .zip(&dst_blocks)
                .map(|(rank, blocks)| SeqBlocks {
                    pool: rank.pool(),
                    blocks,
                })
                .collect();
            let mut sent = vec![0u64; sources.len()];
            let mut received = vec![0u64; destinations.len()];
            let mut copies = 0;
            let started = Instant::now();
            for rc in planned.byte_copies(prompt.len() as u32, &sources, &destinations) {
                let (from, to) = (
                    prefill.ranks()[rc.source].region(),
                    decode.ranks()[rc.destination].region(),
                );
                let (Some(src), Some(dst)) = (from.host(), to.host()) else {
                    bail!("rank pools are not host memory");
                };
                for c in &rc.copies {
                    // SAFETY: plan copies lie inside both pools (the plan and the pools'
                    // layouts say so), in blocks held by this sequence on each side; nothing
                    // else writes them meanwhile.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr().add(c.src as usize),
                            dst.as_ptr().add(c.dst as usize),
                            c.len as usize,
                        );
                    }
                }
                copies += rc.copies.len();
                sent[rc.source] += rc.bytes();
                received[rc.destination] += rc.bytes();
            }
            times.push(started.elapsed());
            per = (sent, received, copies);
            decode.release(SeqId(100 + r as u64))?;
        }
        prefill.release(id)?;
        let ms = median(times).as_secs_f64() * 1e3;
        if base_ms == 0.0 {
            base_ms = ms;
        }
        let total: u64 = per.0.iter().sum();
        let kib = |v: &[u64]| {
            v.iter()
                .map(|b| format!("{}", b / 1024))
                .collect::<Vec<_>>()
                .join("/")
        };
        println!(
            "{:<15} {:>7} {:>10.2} {:>10.3} {:>8.2}  KiB {} -> {}",
            name,
            per.2,
            total as f64 / (1 << 20) as f64,
            ms,
            ms / base_ms,
            kib(&per.0),
            kib(&per.1)
        );
    }
    Ok(())
}

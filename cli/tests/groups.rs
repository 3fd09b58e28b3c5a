//! Worker groups as processes (issue 21): `baton rank` processes, each holding its shard, driven
//! over their links by a [`RemoteGroup`] in this test. A tensor-parallel group of three ranks on
//! one host and a pipeline of two stages on two network-namespace hosts (the LAN pooling case:
//! a model's layers split over machines) compute what the whole model computes in one engine;
//! a rank with the wrong secret or the wrong shard is refused by name while the group forms
//! with the right one; a rank killed mid-run fails the next step at once (its link closes) or
//! within the collective's time-out, never hangs it. Needs root for the namespaces.

mod common;

use std::net::TcpListener;
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_core::ErrorClass;
use baton_engine::{Engine, EngineConfig, Phase, Role, SeqId, StepItem, StepOutput};
use baton_group::RemoteGroup;
use common::lan::Lan;
use common::{Proc, model};

const SECRET: &str = "a-test-group-secret-0123456789";
const JOIN: Duration = Duration::from_secs(120);
const OP: Duration = Duration::from_secs(60);
const DECODE_STEPS: usize = 8;
/// SmolLM2's 30 layers as one stage.
const ALL_LAYERS: [Range<usize>; 1] = [Range { start: 0, end: 30 }];
/// The engine's reference tests' bound on quantized logits (engine/tests/reference.rs).
const LOGIT_BOUND: f32 = 3.0;
/// "Once upon a time, in a small village by the mountains, there lived"
const PROMPT: &[u32] = &[
    6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28, 665, 4161,
];

/// Starts `baton rank` (through `prefix`, e.g. a namespace's `ip netns exec`) with `secret`.
fn rank(prefix: &[String], secret: &str, args: &[String]) -> Proc {
    let mut with_env = prefix.to_vec();
    with_env.extend(["env".into(), format!("BATON_GROUP_SECRET={secret}")]);
    let mut all = vec!["rank".to_string(), "--model".into(), model()];
    all.extend(args.iter().cloned());
    all.extend(["--kv-cache-mib".into(), "32".into()]);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    Proc::start_with(&with_env, &refs, 0)
}

fn rank_args(addr: &str, r: usize, tp: usize, layers: &Range<usize>) -> Vec<String> {
    vec![
        "--group-addr".into(),
        addr.into(),
        "--rank".into(),
        r.to_string(),
        "--tp".into(),
        tp.to_string(),
        "--layers".into(),
        format!("{}..{}", layers.start, layers.end),
    ]
}

fn segment(name: &str) -> String {
    format!("/dev/shm/baton-test-group-{name}-{}", std::process::id())
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

/// Prefills and decodes `PROMPT` on the group and on the whole model with the reference's
/// greedy tokens; returns the largest logit difference, and whether every step was
/// bit-identical. Every rank's pool is whole again after.
fn compare(group: &mut RemoteGroup) -> anyhow::Result<(f32, bool)> {
    let mut config = EngineConfig::new(model(), Role::Decode);
    config.kv_cache_bytes = 32 << 20;
    let mut whole = Engine::load(config)?;
    let fingerprint = whole.descriptor().fingerprint;
    if group
        .descriptors()
        .iter()
        .any(|d| d.fingerprint != fingerprint)
    {
        bail!("a rank's fingerprint is not the whole model's");
    }
    let id = SeqId(7);
    whole.add_sequence(id, PROMPT.to_vec())?;
    group.add_sequence(id, PROMPT)?;
    let mut item = StepItem {
        seq: id,
        tokens: PROMPT.len(),
        phase: Phase::Prefill,
    };
    let (mut worst, mut exact) = (0f32, true);
    for step in 0..=DECODE_STEPS {
        let want = logits(whole.step(&[item])?)?;
        let got = logits(group.step(&[item])?)?;
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff);
        exact &= want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        if diff >= LOGIT_BOUND {
            bail!("step {step}: logits differ by {diff}");
        }
        let next = argmax(&want);
        whole.push_token(id, next)?;
        group.push_token(id, next)?;
        item = StepItem {
            seq: id,
            tokens: 1,
            phase: Phase::Decode,
        };
    }
    group.release(id)?;
    for (r, (free, total)) in group.pools()?.into_iter().enumerate() {
        if free != total {
            bail!("rank {r} holds {} blocks after release", total - free);
        }
    }
    Ok((worst, exact))
}

#[test]
fn three_tensor_parallel_rank_processes_track_the_whole_model() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let seg = segment("tp3");
    let _ = std::fs::remove_file(&seg);
    let _ranks: Vec<Proc> = (0..3)
        .map(|r| {
            let mut args = rank_args(&addr, r, 3, &(0..30));
            args.extend(["--collective".into(), seg.clone()]);
            rank(&[], SECRET, &args)
        })
        .collect();
    let mut group = RemoteGroup::accept(&listener, SECRET, 3, &ALL_LAYERS, JOIN, OP)?;
    let (worst, _) = compare(&mut group)?;
    eprintln!("tp3 processes: worst logit difference {worst}");
    drop(group);
    let _ = std::fs::remove_file(&seg);
    Ok(())
}

#[test]
fn pipeline_stages_on_two_hosts_compute_the_whole_models_bits() -> anyhow::Result<()> {
    let lan = Lan::new(2);
    let listener = TcpListener::bind(format!("{}:0", lan.addr(0)))?;
    let addr = listener.local_addr()?.to_string();
    let stages = [0..15, 15..30];
    let _ranks: Vec<Proc> = stages
        .iter()
        .enumerate()
        .map(|(s, layers)| rank(&lan.exec(s + 1), SECRET, &rank_args(&addr, s, 1, layers)))
        .collect();
    let mut group = RemoteGroup::accept(&listener, SECRET, 1, &stages, JOIN, OP)?;
    let (worst, exact) = compare(&mut group)?;
    assert!(exact, "pipeline stages on two hosts differ by {worst}");
    Ok(())
}

#[test]
fn ranks_that_do_not_fit_are_refused_and_the_group_forms_without_them() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let stages = [0..15, 15..30];
    // An impostor without the secret, a rank 1 holding the first stage's layers, then the
    // right ranks.
    let mut impostor = rank(
        &[],
        "not-the-group-secret-at-all",
        &rank_args(&addr, 0, 1, &(0..15)),
    );
    let mut misfit = rank(&[], SECRET, &rank_args(&addr, 1, 1, &(0..15)));
    let refused = |p: &mut Proc, why: &str| -> anyhow::Result<()> {
        let status = p.wait_exit(JOIN);
        let said = p.stderr().join("\n");
        if status.success() || !said.contains("refused") || !said.contains(why) {
            bail!("expected a refusal naming {why:?}, got {status}: {said}");
        }
        Ok(())
    };
    let waiting = std::thread::spawn(move || -> anyhow::Result<RemoteGroup> {
        Ok(RemoteGroup::accept(
            &listener, SECRET, 1, &stages, JOIN, OP,
        )?)
    });
    refused(&mut impostor, "wrong group secret")?;
    refused(&mut misfit, "holds layers 0..15, its stage runs 15..30")?;
    let _ranks = [
        rank(&[], SECRET, &rank_args(&addr, 0, 1, &(0..15))),
        rank(&[], SECRET, &rank_args(&addr, 1, 1, &(15..30))),
    ];
    let mut group = waiting
        .join()
        .map_err(|_| anyhow::anyhow!("accept panicked"))??;
    let (_, exact) = compare(&mut group)?;
    assert!(exact);
    Ok(())
}

#[test]
fn a_killed_rank_fails_the_step_instead_of_hanging_it() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let seg = segment("kill");
    let _ = std::fs::remove_file(&seg);
    let mut ranks: Vec<Proc> = (0..3)
        .map(|r| {
            let mut args = rank_args(&addr, r, 3, &(0..30));
            args.extend([
                "--collective".into(),
                seg.clone(),
                "--collective-timeout-s".into(),
                "2".into(),
            ]);
            rank(&[], SECRET, &args)
        })
        .collect();
    let mut group = RemoteGroup::accept(&listener, SECRET, 3, &ALL_LAYERS, JOIN, OP)?;
    let id = SeqId(1);
    group.add_sequence(id, PROMPT)?;
    let prefill = StepItem {
        seq: id,
        tokens: PROMPT.len(),
        phase: Phase::Prefill,
    };
    logits(group.step(&[prefill])?)?;
    group.push_token(id, 42)?;
    ranks[2].kill();
    let started = std::time::Instant::now();
    let err = match group.step(&[StepItem {
        seq: id,
        tokens: 1,
        phase: Phase::Decode,
    }]) {
        Ok(_) => bail!("a step with a dead rank succeeded"),
        Err(e) => e,
    };
    // The survivors wait 2 s for the dead rank in their all-reduce, then fail; the dead rank's
    // link has closed. Either way the group says so well within the operation time-out.
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    assert!(started.elapsed() < OP / 2, "took {:?}", started.elapsed());
    // The survivors' collective is broken: they exit on their own.
    for p in &mut ranks[..2] {
        p.wait_exit(Duration::from_secs(30));
    }
    let _ = std::fs::remove_file(&seg);
    Ok(())
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The fields after the command's closing parenthesis: state, then the parent's id.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_decode_worker_whose_rank_dies_exits_for_its_supervisor() -> anyhow::Result<()> {
    let mut worker = Proc::start(
        &[
            "decode",
            "--model",
            &model(),
            "--tp",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--kv-cache-mib",
            "32",
            "--set",
            "decode.metrics=false",
        ],
        1,
    );
    // It listens before its model loads: the ranks have joined once it says it serves.
    assert!(
        worker.wait_stderr(Duration::from_secs(120), |l| l
            .contains("decode worker serving")),
        "the worker's group formed"
    );
    let ranks = children_of(worker.child.id());
    assert_eq!(
        ranks.len(),
        2,
        "the worker is rank 0 and started ranks 1 and 2"
    );
    common::signal_pid(ranks[1], libc::SIGKILL);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(70), "{status}");
    assert!(
        worker
            .stderr()
            .iter()
            .any(|l| l.contains("a rank of this worker's group exited")),
        "the worker says why it exits"
    );
    Ok(())
}

#[test]
fn a_group_address_beyond_this_host_needs_explicit_consent() -> anyhow::Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "decode",
            "--model",
            &model(),
            "--tp",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--set",
            "decode.metrics=false",
            "--set",
            "decode.group.listen=0.0.0.0:0",
        ])
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("group.listen") && said.contains("insecure_remote"),
        "{said}"
    );
    Ok(())
}

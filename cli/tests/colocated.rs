//! `baton up --colocated`, the aggregated baseline: one process prefills and decodes every
//! request (no prefill worker), the coordinator says so in the placement, and the greedy output
//! equals `baton generate --local`, the single-process reference. The worker runs pinned
//! (`--decode-cpus 0`), as the disaggregation experiment runs its workers.

mod common;

use std::process::Command;

use baton_proto::v1::{self, inference_client::InferenceClient};
use common::{Cluster, STOP_BOUND, channel};

const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: u32 = 12;

/// Token ids `baton generate --local --verbose` printed on stderr ("ids [1, 2, ...]").
fn local_reference_ids() -> Vec<u32> {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "generate",
            "--local",
            "--verbose",
            "--max-tokens",
            &MAX_TOKENS.to_string(),
            PROMPT,
        ])
        .output()
        .expect("run baton generate --local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "baton generate --local: {stderr}");
    let list = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ids "))
        .unwrap_or_else(|| panic!("no ids line in: {stderr}"));
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|t| t.trim().parse().expect("token id"))
        .collect()
}

/// A greedy request through the coordinator: its token ids and placement.
fn generate(rt: &tokio::runtime::Runtime, grpc: std::net::SocketAddr) -> (Vec<u32>, v1::Placement) {
    rt.block_on(async {
        let mut client = InferenceClient::new(channel(grpc));
        let mut stream = client
            .generate(v1::GenerateRequest {
                input: Some(v1::generate_request::Input::Prompt(PROMPT.into())),
                sampling: Some(v1::SamplingParams {
                    temperature: Some(0.0),
                    max_tokens: Some(MAX_TOKENS),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("generate")
            .into_inner();
        let mut ids = Vec::new();
        let mut placement = None;
        while let Some(msg) = stream.message().await.expect("stream") {
            ids.extend(msg.token_ids);
            if let Some(finish) = msg.finish {
                placement = finish.placement;
            }
        }
        (
            ids,
            placement.expect("the last message carries the placement"),
        )
    })
}

/// `baton up --colocated --decode-tp/--decode-pp`: the worker is a group of rank processes
/// (issue 21), one worker to the coordinator. Pipeline stages compute the single process's bits,
/// so the greedy output is the same; tensor parallelism sums in another order, so its output is
/// compared token by token and the first difference reported (the engine's tests bound its
/// logits).
#[test]
fn up_colocated_with_worker_groups_serves_like_one_process() {
    let reference = local_reference_ids();
    for (flag, n) in [("--decode-pp", "2"), ("--decode-tp", "3")] {
        let mut cluster = Cluster::start(&["--colocated", flag, n]);
        let (http, grpc) = cluster.endpoints();
        cluster.wait_ready(http);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (ids, placement) = generate(&rt, grpc);
        drop(rt);
        assert_eq!(placement.decode_worker, "colocated-0");
        assert_eq!(ids.len(), MAX_TOKENS as usize, "{flag} {n}");
        if flag == "--decode-pp" {
            assert_eq!(ids, reference, "a pipeline group == one process");
        } else {
            let same = ids
                .iter()
                .zip(&reference)
                .take_while(|(a, b)| a == b)
                .count();
            eprintln!(
                "{flag} {n}: the first {same} of {MAX_TOKENS} greedy tokens equal one process's"
            );
        }
        // The rank processes are the worker's children: `baton up` stopping it stops them.
        let status = cluster.terminate(STOP_BOUND).expect("baton up stops");
        assert!(status.success(), "baton up exited with {status}");
    }
}

#[test]
fn up_colocated_serves_aggregated_and_matches_one_process() {
    let mut cluster = Cluster::start(&["--colocated", "--decode-cpus", "0"]);
    let (http, grpc) = cluster.endpoints();
    cluster.wait_ready(http);
    let children = cluster.children();
    assert_eq!(
        children.len(),
        2,
        "--colocated runs one worker and the coordinator"
    );
    let allowed_cpus = |pid: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string()
    };
    let ours = allowed_cpus("self");
    for pid in children {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let role = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let allowed = allowed_cpus(&pid.to_string());
        match role.as_str() {
            "decode" => assert_eq!(allowed, "0", "the worker runs on CPU 0 alone"),
            // The coordinator was not pinned: it keeps the set `up` (and this test) had.
            _ => assert_eq!(allowed, ours, "{role} should not be pinned"),
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (ids, placement) = generate(&rt, grpc);
    assert_eq!(placement.mode, "aggregated");
    assert_eq!(placement.decode_worker, "colocated-0");
    assert!(placement.prefill_worker.is_empty(), "{placement:?}");
    assert_eq!(placement.kv_bytes_received, 0, "no KV moved");

    // Forcing disaggregation has nowhere to go.
    let forced = rt.block_on(async {
        InferenceClient::new(channel(grpc))
            .generate(v1::GenerateRequest {
                input: Some(v1::generate_request::Input::Prompt(PROMPT.into())),
                pd_mode: v1::PdMode::Force as i32,
                ..Default::default()
            })
            .await
    });
    assert_eq!(
        forced.expect_err("no prefill worker").code(),
        tonic::Code::Unavailable
    );
    // Closes the client's connections (a current-thread runtime polls them only inside
    // block_on): the coordinator's graceful shutdown waits for open connections.
    drop(rt);

    assert_eq!(
        ids,
        local_reference_ids(),
        "colocated output == one process"
    );
    let status = cluster.terminate(STOP_BOUND).expect("baton up stops");
    assert!(status.success(), "baton up exited with {status}");
}

#[test]
fn up_colocated_refuses_prefill_workers() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["up", "--colocated", "--prefill", "1"])
        .output()
        .expect("run baton up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--colocated runs no prefill workers"),
        "{stderr}"
    );
}

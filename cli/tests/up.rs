//! `baton up` supervises its children: a worker killed with SIGKILL is restarted on its address
//! and rejoins (the coordinator lists it routable, its KV link opens again, and it serves a
//! disaggregated request), requests succeed while it is away, a killed coordinator comes back
//! on its ports; a child that keeps dying stops the cluster with one line that names it; and a
//! restart backoff too short for the coordinator to see a worker gone is refused.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_proto::v1::{self, inference_client::InferenceClient};
use common::{Cluster, START_BOUND, STOP_BOUND, channel, get, signal_pid};

/// Between two looks at a condition no event announces (the coordinator's view of a worker).
const POLL: Duration = Duration::from_millis(100);

/// A worker's restart waits this long: long enough that a test sees the cluster without it.
const BACKOFF: &str = "2s";

/// The pid of the child of `up` named `name` (`decode-1`, `coordinator`), from its command line.
fn child_pid(cluster: &Cluster, name: &str) -> i32 {
    cluster
        .children()
        .into_iter()
        .find(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            match name {
                "coordinator" => args.get(1).is_some_and(|a| a == "coordinator"),
                _ => args
                    .windows(2)
                    .any(|w| w[0] == "--worker-id" && w[1] == name),
            }
        })
        .unwrap_or_else(|| panic!("no child of baton up named {name}"))
}

async fn cluster_status(grpc: SocketAddr) -> v1::ClusterStatusResponse {
    InferenceClient::new(channel(grpc))
        .cluster_status(v1::ClusterStatusRequest {})
        .await
        .expect("cluster status")
        .into_inner()
}

/// The worker at `address`, as the coordinator lists it (while it is away the coordinator
/// names it by its address).
fn at<'a>(status: &'a v1::ClusterStatusResponse, address: &str) -> &'a v1::WorkerStatus {
    status
        .workers
        .iter()
        .find(|w| w.address == address)
        .unwrap_or_else(|| panic!("no worker at {address}: {status:?}"))
}

/// Routable under its own name, with its KV link to `prefill-0` open.
fn rejoined(status: &v1::ClusterStatusResponse, address: &str, name: &str) -> bool {
    let w = at(status, address);
    w.worker_id == name
        && w.state == "routable"
        && status
            .links
            .iter()
            .any(|l| l.prefill_worker == "prefill-0" && l.decode_worker == name && l.open)
}

/// Waits until the coordinator's status satisfies `done`, for at most `bound`.
fn await_status(
    rt: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
    grpc: SocketAddr,
    bound: Duration,
    what: &str,
    done: impl Fn(&v1::ClusterStatusResponse) -> bool,
) {
    let deadline = Instant::now() + bound;
    loop {
        let status = rt.block_on(cluster_status(grpc));
        if done(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {bound:?}; status {status:?}; output:\n{}",
            cluster.log_text()
        );
        rt.block_on(async { tokio::time::sleep(POLL).await });
    }
}

/// Reads `up`'s output until a line contains every one of `parts`, for at most `bound`.
fn await_line(cluster: &mut Cluster, parts: &[&str], bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match cluster.next_line(left) {
            Some(line) if parts.iter().all(|p| line.contains(p)) => return line,
            Some(_) => {}
            None => panic!(
                "baton up printed no line with {parts:?} within {bound:?}; output:\n{}",
                cluster.log_text()
            ),
        }
    }
}

/// One disaggregated request (prefill-0, then a decode worker); its placement.
async fn generate(grpc: SocketAddr) -> Result<v1::Placement, tonic::Status> {
    let mut stream = InferenceClient::new(channel(grpc))
        .generate(v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Prompt(
                "The capital of France is".into(),
            )),
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(4),
                ..Default::default()
            }),
            pd_mode: v1::PdMode::Force as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut placement = None;
    while let Some(msg) = stream.message().await? {
        if let Some(finish) = msg.finish {
            placement = finish.placement;
        }
    }
    Ok(placement.expect("the last message carries the placement"))
}

#[test]
fn a_killed_worker_is_restarted_and_rejoins_while_the_rest_serves() {
    let mut cluster = Cluster::start(&[
        "--prefill",
        "1",
        "--decode",
        "2",
        "--restart-backoff",
        BACKOFF,
    ]);
    let (http, grpc) = cluster.endpoints();
    cluster.wait_ready(http);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Ready is one routable worker of each kind; the test starts from all three.
    let names = ["prefill-0", "decode-0", "decode-1"];
    await_status(
        &rt,
        &mut cluster,
        grpc,
        START_BOUND,
        "every worker routable",
        |s| {
            names.iter().all(|name| {
                s.workers
                    .iter()
                    .any(|w| w.worker_id == *name && w.state == "routable")
            })
        },
    );
    let status = rt.block_on(cluster_status(grpc));
    let address = |name: &str| {
        let w = status.workers.iter().find(|w| w.worker_id == name);
        w.unwrap_or_else(|| panic!("no {name}: {status:?}"))
            .address
            .clone()
    };
    let (decode0, decode1) = (address("decode-0"), address("decode-1"));

    let killed = child_pid(&cluster, "decode-1");
    signal_pid(killed, libc::SIGKILL);
    await_line(
        &mut cluster,
        &[
            &format!("decode-1 (pid {killed}) died: signal: 9 (SIGKILL)"),
            &format!("restart 1 in {BACKOFF}"),
        ],
        STOP_BOUND,
    );
    // Its health watch broke when it died: the coordinator stops routing there at once.
    await_status(&rt, &mut cluster, grpc, STOP_BOUND, "decode-1 out", |s| {
        at(s, &decode1).state != "routable"
    });
    // Requests succeed while it is away, and until it is back: routable under its name, with
    // the KV link from prefill-0 open again.
    let deadline = Instant::now() + START_BOUND;
    let mut served_while_away = 0;
    loop {
        let placed = rt.block_on(generate(grpc));
        let placed = placed.unwrap_or_else(|e| {
            panic!(
                "a request while decode-1 restarts failed: {e:?}; output:\n{}",
                cluster.log_text()
            )
        });
        if rejoined(&rt.block_on(cluster_status(grpc)), &decode1, "decode-1") {
            break;
        }
        if placed.decode_worker == "decode-0" {
            served_while_away += 1;
        }
        assert!(
            Instant::now() < deadline,
            "decode-1 did not rejoin within {START_BOUND:?}; output:\n{}",
            cluster.log_text()
        );
    }
    assert!(
        served_while_away > 0,
        "no request ran while decode-1 was away"
    );
    let restarted = await_line(
        &mut cluster,
        &["restarted decode-1 (pid", "restart 1)"],
        STOP_BOUND,
    );
    assert!(
        !restarted.contains(&format!("pid {killed},")),
        "{restarted}"
    );

    // With decode-0 away, the restarted decode-1 takes the KV and the decoding.
    signal_pid(child_pid(&cluster, "decode-0"), libc::SIGKILL);
    await_status(&rt, &mut cluster, grpc, STOP_BOUND, "decode-0 out", |s| {
        at(s, &decode0).state != "routable"
    });
    let placed = rt
        .block_on(generate(grpc))
        .expect("a request with decode-0 away");
    assert_eq!(placed.prefill_worker, "prefill-0");
    assert_eq!(placed.decode_worker, "decode-1", "{placed:?}");
    assert!(
        placed.kv_bytes_received > 0,
        "the KV moved to decode-1: {placed:?}"
    );

    // A killed coordinator comes back on its ports, finds the workers (decode-0 back too) and
    // serves.
    let coordinator = child_pid(&cluster, "coordinator");
    signal_pid(coordinator, libc::SIGKILL);
    await_line(&mut cluster, &["restarted coordinator (pid"], STOP_BOUND);
    let deadline = Instant::now() + START_BOUND;
    while !matches!(get(http, "/ready"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the restarted coordinator was not ready within {START_BOUND:?}; output:\n{}",
            cluster.log_text()
        );
        rt.block_on(async { tokio::time::sleep(POLL).await });
    }
    await_status(
        &rt,
        &mut cluster,
        grpc,
        START_BOUND,
        "every worker back",
        |s| rejoined(s, &decode0, "decode-0") && rejoined(s, &decode1, "decode-1"),
    );
    rt.block_on(generate(grpc))
        .expect("a request through the restarted coordinator");
    // Closes the client's connections (a current-thread runtime polls them only inside
    // block_on): the coordinator's graceful shutdown waits for open connections.
    drop(rt);

    let status = cluster.terminate(STOP_BOUND);
    let log = cluster.log_text();
    let status = status.unwrap_or_else(|| panic!("baton up did not stop; output:\n{log}"));
    assert!(
        status.success(),
        "baton up exited with {status}; output:\n{log}"
    );
}

#[test]
fn a_child_that_keeps_dying_stops_the_cluster_with_one_line_naming_it() {
    // The coordinator's HTTP port is taken: it exits at once, every time.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let mut up = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["up", "--prefill", "0", "--decode", "1"])
        .args(["--grpc", "127.0.0.1:0", "--kv-cache-mib", "128"])
        .args([
            "--set",
            &format!("coordinator.http_listen=127.0.0.1:{port}"),
        ])
        // The decode worker is told to stop while it may still be loading the model; a short
        // drain keeps the wait for it short.
        .args([
            "--set",
            "decode.drain_timeout=1s",
            "--set",
            "prefill.drain_timeout=1s",
        ])
        .args(["--restart-limit", "3"])
        // An error returned from main would print a stack backtrace.
        .env("RUST_BACKTRACE", "1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start baton up");
    let mut stdout = up.stdout.take().expect("stdout");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let stderr = up.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            lines.push(line);
        }
        let _ = tx.send(lines);
    });
    // Its stderr closes when it exits.
    let lines = rx.recv_timeout(START_BOUND).unwrap_or_else(|_| {
        let _ = up.kill();
        panic!("baton up did not exit within {START_BOUND:?}")
    });
    let status = up.wait().expect("wait for baton up");
    drop(taken);

    assert_eq!(status.code(), Some(1), "baton up exited with {status}");
    let deaths: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("baton up: coordinator (pid "))
        .collect();
    assert_eq!(deaths.len(), 3, "three deaths, each one line: {deaths:#?}");
    assert!(deaths[0].ends_with("; restart 1 in 500ms"), "{}", deaths[0]);
    assert!(deaths[1].ends_with("; restart 2 in 1s"), "{}", deaths[1]);
    let last = lines.last().expect("baton up printed something");
    assert_eq!(last, deaths[2], "the crash loop is the last line");
    for part in [
        "died: exit status: 1",
        &format!("bind 127.0.0.1:{port}: Address already in use"),
        "3 deaths within 120s is a crash loop: stopped the cluster",
    ] {
        assert!(last.contains(part), "{part:?} not in {last:?}");
    }
}

#[test]
fn a_restart_backoff_shorter_than_two_coordinator_polls_is_refused_before_any_child_starts() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["up", "--restart-backoff", "100ms"])
        .args(["--set", "coordinator.load_poll_interval=250ms"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run baton up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "--restart-backoff 100ms is shorter than two of the coordinator's load polls"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("baton up: started"), "{stderr}");
}

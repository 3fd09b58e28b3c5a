//! Coordinator high availability, with real processes: three coordinators in one raft group
//! (`[coordinator.replica]`, its peers over mutual TLS) sharing the cloud budget ledger, a real etcd through which they
//! find the decode worker, and a second baton as the cloud. Under a steady load of local and
//! cloud requests through two coordinators, the third, the raft leader, is SIGKILLed: requests
//! keep succeeding (errors counted: none), a new leader is elected (the time is printed and
//! bounded), the ledger afterwards equals the sum of the settled requests' costs with no
//! reservation lost or doubled, and the killed coordinator, restarted, catches up. Then an
//! operator drains the worker through one coordinator and restores it through another: every
//! coordinator follows both decisions.
//!
//! Needs `etcd` on PATH (scripts/test.sh installs Debian's `etcd-server`).

mod common;
#[path = "../../discovery/tests/common/etcd_server.rs"]
#[allow(dead_code)] // Restarts are for discovery's own tests.
mod etcd_server;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, Proc, baton_json, get, model, post, wait_for, worker};
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

/// A reply's bound (a cloud request waits out an election, at most the proposal time-out).
const REPLY_LIMIT: Duration = Duration::from_secs(60);
/// How long the group may take to elect a new leader after a kill; raft's own bound is the
/// election time-out (300-600 ms here) plus a vote round, so this is generous for a loaded CI.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);
const STOP_BOUND: Duration = Duration::from_secs(30);

/// One request of the load: which coordinator, local or cloud, when it was sent and answered,
/// and what it cost (cloud) or why it failed.
#[derive(Debug, Clone)]
struct Outcome {
    coordinator: usize,
    cloud: bool,
    sent: Instant,
    done: Instant,
    result: Result<f64, String>,
}

/// A free loopback port (closed again: the coordinator binds it moments later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-ha-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn chat(model: &str, content: &str, max_tokens: u32) -> String {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string()
}

fn baton_budget(grpc: SocketAddr) -> Option<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["budget", "--coordinator", &grpc.to_string(), "--json"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn leader(budget: &Value) -> Option<u64> {
    budget["replica"]["leader"].as_u64()
}

/// Every request's outcome, and a signal for each new one.
type Outcomes = Arc<(Mutex<Vec<Outcome>>, Condvar)>;

/// Waits on each coordinator's grpc.health.v1 Watch (the readiness /ready reports) until it
/// says `want`.
fn all_health(rt: &tokio::runtime::Runtime, members: &[Member], want: ServingStatus) {
    for m in members {
        rt.block_on(common::await_health(m.grpc(), "baton.v1.Inference", want));
    }
}

/// One coordinator of the group: its config file and its process.
struct Member {
    node_id: u64,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Member {
    fn start(&mut self, model: &str, discovery: &[String]) {
        let mut flags: Vec<&str> = vec!["--config", self.config.to_str().expect("utf-8")];
        flags.extend(discovery.iter().map(String::as_str));
        self.proc = Some(common::coordinator(model, &[], &[], &flags));
    }

    fn grpc(&self) -> SocketAddr {
        self.proc.as_ref().expect("running").addrs[0]
    }

    fn http(&self) -> SocketAddr {
        self.proc.as_ref().expect("running").addrs[1]
    }
}

/// Coordinator `node_id`'s config: its place in the group, the cloud and its budget, and the
/// mutual TLS `baton certs` wrote (to the workers, and between the coordinators' replicas).
fn write_config(
    dir: &Path,
    certs: &Path,
    node_id: u64,
    ports: &[u16],
    cloud_http: SocketAddr,
    cloud_model: &str,
) -> PathBuf {
    let members: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let tls = format!(
        "[coordinator.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n",
        certs.join("ca.pem").display().to_string(),
        certs.join("coordinator.pem").display().to_string(),
        certs.join("coordinator.key").display().to_string(),
    );
    let text = format!(
        "{tls}[coordinator.replica]\n\
         node_id = {node_id}\n\
         listen = \"127.0.0.1:{}\"\n\
         members = [{}]\n\
         data = {:?}\n\n\
         [coordinator.cloud.budget]\n\
         caps = [{{ period = \"day\", cap_usd = 50.0 }}]\n\n\
         [[coordinator.cloud.endpoints]]\n\
         name = \"baton-cloud\"\n\
         base_url = \"http://{cloud_http}/v1\"\n\
         models = {{ \"cloud-smol\" = {cloud_model:?} }}\n\
         input_usd_per_mtok = 3.0\n\
         output_usd_per_mtok = 15.0\n",
        ports[node_id as usize],
        members.join(", "),
        dir.join(format!("coordinator-{node_id}.redb"))
            .display()
            .to_string(),
    );
    let path = dir.join(format!("coordinator-{node_id}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Sends requests to `http` until `stop`, alternating local and cloud, recording each.
fn load(
    coordinator: usize,
    http: SocketAddr,
    local_model: String,
    stop: Arc<AtomicBool>,
    outcomes: Outcomes,
) {
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let cloud = i.is_multiple_of(2);
        let model = if cloud { "cloud-smol" } else { &local_model };
        let body = chat(model, &format!("Count to {}.", i % 7), 4);
        let sent = Instant::now();
        let result = match post(http, "/v1/chat/completions", &body, REPLY_LIMIT) {
            Ok((200, _, text)) => serde_json::from_str::<Value>(&text)
                .map_err(|e| format!("{e}: {text}"))
                .map(|v| v["baton"]["cost_usd"].as_f64().unwrap_or(0.0)),
            Ok((status, _, text)) => Err(format!("{status}: {text}")),
            Err(e) => Err(e.to_string()),
        };
        let (list, recorded) = &*outcomes;
        list.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Outcome {
                coordinator,
                cloud,
                sent,
                done: Instant::now(),
                result,
            });
        recorded.notify_all();
        i += 1;
    }
}

#[test]
fn the_raft_leader_killed_under_load_loses_no_request_and_no_dollar() {
    let dir = scratch();
    let model = model();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = rt.block_on(etcd_server::EtcdServer::start());

    // The cluster key etcd adverts are signed with, as `baton certs` makes it.
    let certs = dir.join("certs");
    common::certs(&certs);
    let discovery: Vec<String> = [
        "--discovery",
        "etcd",
        "--etcd-endpoint",
        &etcd.endpoint(),
        "--cluster-key-file",
        certs.join("cluster.key").to_str().expect("utf-8"),
        "--cluster",
        &format!("ha{}", std::process::id()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // The cloud: another baton. The local cluster: one decode worker, found through etcd.
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let (status, body) = get(cloud_http, "/v1/models").expect("GET /v1/models");
    assert_eq!(status, 200, "{body}");
    let cloud_model = serde_json::from_str::<Value>(&body).expect("json")["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    // The worker serves its gRPC over mutual TLS, as the coordinators do among themselves.
    let tls_config = certs.join("tls.toml").display().to_string();
    let worker_args: Vec<&str> = discovery
        .iter()
        .map(String::as_str)
        .chain(["--config", tls_config.as_str()])
        .collect();
    let _decode = worker("decode", &model, &worker_args);

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut members: Vec<Member> = (0..3)
        .map(|node_id| Member {
            node_id,
            config: write_config(&dir, &certs, node_id, &ports, cloud_http, &cloud_model),
            proc: None,
        })
        .collect();
    for m in &mut members {
        m.start(&model, &discovery);
    }
    // Ready (grpc.health, as /ready): each found the decode worker.
    all_health(&rt, &members, ServingStatus::Serving);
    let first_leader = wait_for(Duration::from_secs(30), || {
        let seen: Vec<Option<u64>> = members
            .iter()
            .map(|m| baton_budget(m.grpc()).and_then(|b| leader(&b)))
            .collect();
        seen[0].filter(|_| seen.iter().all(|l| *l == seen[0]))
    })
    .expect("the three coordinators agree on a leader");
    let (status, body) = get(members[0].http(), "/v1/models").expect("models");
    assert_eq!(status, 200);
    let local_model = serde_json::from_str::<Value>(&body).expect("json")["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();

    // Steady load through the two followers.
    let killed = first_leader as usize;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != killed).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Outcomes = Arc::default();
    let threads: Vec<_> = survivors
        .iter()
        .flat_map(|&i| [i, i])
        .map(|i| {
            let (http, local, stop, outcomes) = (
                members[i].http(),
                local_model.clone(),
                stop.clone(),
                outcomes.clone(),
            );
            std::thread::spawn(move || load(i, http, local, stop, outcomes))
        })
        .collect();
    // Waits (woken by each recorded outcome) until `count` cloud requests sent after `after`
    // have succeeded.
    let cloud_successes = |after: Option<Instant>, count: usize| {
        let (list, recorded) = &*outcomes;
        let list = list.lock().unwrap_or_else(|p| p.into_inner());
        let (list, waited) = recorded
            .wait_timeout_while(list, Duration::from_secs(60), |list| {
                list.iter()
                    .filter(|o| o.cloud && o.result.is_ok() && after.is_none_or(|t| o.sent > t))
                    .count()
                    < count
            })
            .unwrap_or_else(|p| p.into_inner());
        drop(list);
        !waited.timed_out()
    };
    assert!(
        cloud_successes(None, 6),
        "cloud requests succeed before the kill"
    );

    // SIGKILL the leader.
    let kill_at = Instant::now();
    members[killed].proc.as_mut().expect("running").kill();
    let new_leader = wait_for(FAILOVER_BOUND, || {
        survivors
            .iter()
            .find_map(|&i| leader(&baton_budget(members[i].grpc())?).filter(|l| *l != first_leader))
    })
    .unwrap_or_else(|| panic!("no new leader within {FAILOVER_BOUND:?} of the kill"));
    let elected_after = kill_at.elapsed();
    // The first budget decision of the new leader: the ledger's (settled, open) counts, read
    // once the new leader is known, change with the next reservation or settlement it commits
    // (polled through `baton budget` processes, a few hundred ms each under this load: an upper
    // bound).
    let signature = |b: &Value| {
        (
            b["windows"][0]["settled"].as_u64(),
            b["windows"][0]["open"].as_u64(),
        )
    };
    let survivor = members[survivors[0]].grpc();
    let baseline = signature(&baton_budget(survivor).expect("budget"));
    wait_for(FAILOVER_BOUND, || {
        (signature(&baton_budget(survivor)?) != baseline).then_some(())
    })
    .expect("a budget decision after the new leader");
    let decided_after = kill_at.elapsed();
    assert!(
        cloud_successes(Some(kill_at), 6),
        "cloud requests sent after the kill succeed"
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let outcomes = outcomes.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let first_cloud_after = outcomes
        .iter()
        .filter(|o| o.cloud && o.result.is_ok() && o.sent >= kill_at)
        .map(|o| o.done - kill_at)
        .min()
        .expect("a cloud request after the kill");
    let mut before: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.cloud && o.done < kill_at)
        .map(|o| o.done - o.sent)
        .collect();
    before.sort();
    let p50_before = before.get(before.len() / 2).copied().unwrap_or_default();
    let slowest_after = outcomes
        .iter()
        .filter(|o| o.cloud && o.done >= kill_at)
        .map(|o| o.done - o.sent)
        .max()
        .unwrap_or_default();
    eprintln!(
        "HA: requests={} cloud={} failed={} leader_killed={first_leader} new_leader={new_leader} \
         elected_ms={} first_decision_ms={} first_cloud_sent_after_kill_answered_ms={} \
         cloud_p50_before_ms={} cloud_slowest_after_kill_ms={}",
        outcomes.len(),
        outcomes.iter().filter(|o| o.cloud).count(),
        failed.len(),
        elected_after.as_millis(),
        decided_after.as_millis(),
        first_cloud_after.as_millis(),
        p50_before.as_millis(),
        slowest_after.as_millis(),
    );
    assert!(failed.is_empty(), "requests failed: {failed:#?}");
    assert!(outcomes.iter().all(|o| survivors.contains(&o.coordinator)));

    // The ledger: every successful cloud request settled once, at the cost its reply showed.
    let settled: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.cloud)
        .filter_map(|o| o.result.clone().ok())
        .collect();
    let expected: f64 = settled.iter().sum();
    let grpc = members[survivors[0]].grpc();
    let budget = baton_budget(grpc).expect("budget");
    let window = &budget["windows"][0];
    assert_eq!(budget["open"].as_array().map(Vec::len), Some(0), "{budget}");
    assert_eq!(
        window["settled"].as_u64(),
        Some(settled.len() as u64),
        "{budget}"
    );
    let spent = window["spent_nanodollars"].as_u64().expect("spent") as f64 / 1e9;
    assert!(
        (spent - expected).abs() < 1e-9 * settled.len() as f64 + 1e-9,
        "the ledger's ${spent} vs the replies' ${expected}: {budget}"
    );
    // Both survivors hold the same ledger.
    let other = members[survivors[1]].grpc();
    wait_for(Duration::from_secs(10), || {
        (baton_budget(other)?["windows"] == budget["windows"]).then_some(())
    })
    .expect("the other survivor applied the same ledger");

    // The metrics say who leads: 1 on the new leader, 0 on the other survivor.
    for &i in &survivors {
        let (status, page) = get(members[i].http(), "/metrics").expect("scrape");
        assert_eq!(status, 200);
        let leads = members[i].node_id == new_leader;
        let want = format!("baton_replica_leader {}", u8::from(leads));
        assert!(page.lines().any(|l| l == want), "{want} not in:\n{page}");
        assert!(page.lines().any(|l| l == "baton_replica_leader_known 1"));
    }

    // The killed coordinator, restarted on its database, catches up.
    members[killed].start(&model, &discovery);
    let back = members[killed].grpc();
    wait_for(Duration::from_secs(30), || {
        let b = baton_budget(back)?;
        (b["windows"] == budget["windows"] && leader(&b) == Some(new_leader)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the restarted coordinator did not catch up: {:?} vs {budget}",
            baton_budget(back)
        )
    });

    // An operator drains the decode worker through one coordinator: every coordinator, the
    // restarted one included, stops placing work there (not ready, as /ready's 503: no
    // routable decode worker); restored through another, they all place again.
    let worker_id =
        baton_json(&["status", "--coordinator", &back.to_string()])["workers"][0]["worker_id"]
            .as_str()
            .expect("the decode worker's id")
            .to_string();
    let decide = |verb: &str, via: SocketAddr| {
        let out = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["worker", verb, &worker_id, "--reason", "ha test"])
            .args(["--coordinator", &via.to_string()])
            .output()
            .expect("baton worker");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // All ready first (the restarted one too), so "not ready" below is the drain's doing.
    all_health(&rt, &members, ServingStatus::Serving);
    let said = decide("drain", members[survivors[0]].grpc());
    assert!(said.contains("drained"), "{said}");
    all_health(&rt, &members, ServingStatus::NotServing);
    let status = baton_json(&["status", "--coordinator", &back.to_string()]);
    assert_eq!(status["workers"][0]["state"], "draining", "{status}");
    let said = decide("restore", members[survivors[1]].grpc());
    assert!(said.contains("restored"), "{said}");
    all_health(&rt, &members, ServingStatus::Serving);

    for m in &mut members {
        if let Some(p) = m.proc.as_mut() {
            p.signal(libc::SIGTERM);
            p.wait_exit(STOP_BOUND);
        }
    }
    assert!(cloud.terminate(STOP_BOUND).is_some());
    drop(etcd);
}

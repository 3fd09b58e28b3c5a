//! The etcd backend against a real etcd (started per test by [`common::etcd_server`]): joins
//! and withdrawals, lease expiry of a killed worker, a watch that outlives an etcd restart (and
//! one that finds its history compacted away, beside a worker whose lease expired meanwhile),
//! and refusals of what a foreign writer puts under the prefix.
//!
//! Every test has its own etcd and cluster name; waits are for events, each bounded.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_core::{Fingerprint, WorkerId};
use baton_discovery::etcd::{EtcdBackend, worker_key};
use baton_discovery::{
    Advert, Backend, ClusterKey, Error, EtcdConfig, Members, Membership, Refusal, Role, Source,
};
use common::etcd_server::EtcdServer;

const SECRET: &[u8] = b"etcd-test-cluster-key-0123456789";

/// Bound on anything that should happen at once (a join, a withdrawal's leave).
const PROMPT: Duration = Duration::from_secs(10);

/// The announcer child of `a_killed_worker_leaves_when_its_lease_expires` reads its orders
/// from these.
const CHILD_ENDPOINT: &str = "BATON_TEST_ETCD_ANNOUNCER_ENDPOINT";
const CHILD_CLUSTER: &str = "BATON_TEST_ETCD_ANNOUNCER_CLUSTER";
const CHILD_LEASE: Duration = Duration::from_secs(2);

fn key() -> ClusterKey {
    ClusterKey::new(SECRET).expect("key")
}

fn backend(endpoint: String, cluster: &str, lease_ttl: Duration) -> EtcdBackend {
    EtcdBackend::new(
        cluster.into(),
        key(),
        EtcdConfig {
            endpoints: vec![endpoint],
            lease_ttl,
        },
    )
}

fn advert(cluster: &str, id: &str, role: Role, host: Option<&str>, grpc_port: u16) -> Advert {
    Advert {
        cluster: cluster.into(),
        worker_id: WorkerId::parse(id).expect("id"),
        role,
        fingerprint: Fingerprint([9; 32]),
        host_id: "test-host".into(),
        grpc_port,
        event_port: 0,
        host: host.map(Into::into),
        issued_ms: baton_discovery::advert::now_ms(),
    }
}

fn id(s: &str) -> WorkerId {
    WorkerId::parse(s).expect("id")
}

/// The next change, within `within`.
async fn next(members: &mut Members, within: Duration) -> Membership {
    match tokio::time::timeout(within, members.next()).await {
        Ok(Some(change)) => change,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no membership change within {within:?}"),
    }
}

/// The next `n` changes, in the order they came.
async fn next_n(members: &mut Members, n: usize, within: Duration) -> Vec<Membership> {
    let deadline = Instant::now() + within;
    let mut changes = Vec::with_capacity(n);
    while changes.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        changes.push(next(members, left).await);
    }
    changes
}

fn joined(change: &Membership, worker: &str) -> bool {
    matches!(change, Membership::Joined(m) if m.id == id(worker))
}

fn left(change: &Membership, worker: &str) -> bool {
    matches!(change, Membership::Left { id: gone, source: Source::Etcd } if *gone == id(worker))
}

fn value(advert: &Advert, key: &ClusterKey) -> String {
    advert
        .to_pairs(key)
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
}

#[tokio::test]
async fn an_announced_worker_joins_and_a_withdrawn_one_leaves_at_once() {
    let server = EtcdServer::start().await;
    let cluster = "join-withdraw";
    // A lease far longer than the test: a prompt leave can only be the withdrawal's revoke.
    let etcd = backend(server.endpoint(), cluster, Duration::from_secs(60));

    // Announced before the watch starts: found by the listing.
    let prefill = etcd
        .announce(advert(
            cluster,
            "prefill-1",
            Role::Prefill,
            Some("10.1.2.3"),
            7100,
        ))
        .await
        .expect("announce prefill-1");
    let mut members = etcd.watch().await.expect("watch");
    let Membership::Joined(member) = next(&mut members, PROMPT).await else {
        panic!("prefill-1 did not join first");
    };
    assert_eq!(member.id, id("prefill-1"));
    assert_eq!(member.role, Role::Prefill);
    assert_eq!(member.address, "10.1.2.3:7100");
    assert_eq!(member.source, Source::Etcd);

    // Announced while watching: found by the watch, IPv6 literal bracketed.
    let decode = etcd
        .announce(advert(
            cluster,
            "decode-1",
            Role::Decode,
            Some("fd00::2"),
            7200,
        ))
        .await
        .expect("announce decode-1");
    let Membership::Joined(member) = next(&mut members, PROMPT).await else {
        panic!("decode-1 did not join");
    };
    assert_eq!(member.id, id("decode-1"));
    assert_eq!(member.role, Role::Decode);
    assert_eq!(member.address, "[fd00::2]:7200");

    let started = Instant::now();
    prefill.withdraw().await;
    let change = next(&mut members, Duration::from_secs(5)).await;
    assert!(left(&change, "prefill-1"), "{change:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    decode.withdraw().await;
    let change = next(&mut members, Duration::from_secs(5)).await;
    assert!(left(&change, "decode-1"), "{change:?}");
}

/// Not a test of its own: `a_killed_worker_leaves_when_its_lease_expires` runs this in a child
/// process (the test binary again, `--exact`), which announces and blocks until killed.
#[tokio::test]
async fn announcer_process() {
    let (Ok(endpoint), Ok(cluster)) = (std::env::var(CHILD_ENDPOINT), std::env::var(CHILD_CLUSTER))
    else {
        return;
    };
    let etcd = backend(endpoint, &cluster, CHILD_LEASE);
    let _announced = etcd
        .announce(advert(
            &cluster,
            "doomed-1",
            Role::Decode,
            Some("10.9.9.9"),
            7300,
        ))
        .await
        .expect("announce in the child");
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_killed_worker_leaves_when_its_lease_expires() {
    let server = EtcdServer::start().await;
    let cluster = "killed-worker";
    let etcd = backend(server.endpoint(), cluster, Duration::from_secs(10));
    let mut members = etcd.watch().await.expect("watch");

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "announcer_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENDPOINT, server.endpoint())
        .env(CHILD_CLUSTER, cluster)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the announcer child");
    let change = tokio::time::timeout(Duration::from_secs(30), members.next()).await;
    if !matches!(&change, Ok(Some(c)) if joined(c, "doomed-1")) {
        let _ = child.kill();
        let output = child.wait_with_output().expect("child output");
        panic!(
            "the child's worker did not join ({change:?}); its stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // SIGKILL: no withdrawal, no drop; only the lease says it is gone.
    child.kill().expect("SIGKILL the child");
    let killed = Instant::now();
    child.wait().expect("reap the child");
    let slack = Duration::from_secs(5);
    let change = next(&mut members, CHILD_LEASE + slack).await;
    assert!(left(&change, "doomed-1"), "{change:?}");
    assert!(
        killed.elapsed() <= CHILD_LEASE + slack,
        "left {:?} after the kill",
        killed.elapsed()
    );
}

#[tokio::test]
async fn the_watch_resumes_across_an_etcd_restart() {
    let mut server = EtcdServer::start().await;
    let cluster = "etcd-restart";
    let etcd = backend(server.endpoint(), cluster, Duration::from_secs(10));
    let mut members = etcd.watch().await.expect("watch");

    // One member written by hand (no lease), one announced (its lease kept alive by its thread).
    let mut client = server.client().await;
    let by_hand = advert(cluster, "by-hand", Role::Prefill, Some("10.0.0.7"), 7400);
    client
        .put(
            worker_key(cluster, &by_hand.worker_id),
            value(&by_hand, &key()),
            None,
        )
        .await
        .expect("put by hand");
    let announced = etcd
        .announce(advert(
            cluster,
            "survivor",
            Role::Decode,
            Some("10.0.0.8"),
            7500,
        ))
        .await
        .expect("announce survivor");
    let changes = next_n(&mut members, 2, PROMPT).await;
    assert!(joined(&changes[0], "by-hand"), "{changes:?}");
    assert!(joined(&changes[1], "survivor"), "{changes:?}");

    server.kill();
    server.restart().await;

    // While the watcher reconnects: a deletion, then a compaction past it, so that a watcher
    // still away must list again to learn of it.
    let mut client = server.client().await;
    let deleted = client
        .delete(worker_key(cluster, &by_hand.worker_id), None)
        .await
        .expect("delete by hand");
    let revision = deleted.header().expect("header").revision();
    client.compact(revision, None).await.expect("compact");

    let _late = etcd
        .announce(advert(
            cluster,
            "late-1",
            Role::Decode,
            Some("10.0.0.9"),
            7600,
        ))
        .await
        .expect("announce after the restart");
    // A watch that resumed sees them in order; one that listed again reports the join first.
    let changes = next_n(&mut members, 2, Duration::from_secs(20)).await;
    assert!(
        changes.iter().any(|c| left(c, "by-hand")) && changes.iter().any(|c| joined(c, "late-1")),
        "{changes:?}"
    );

    // The announced worker's lease survived the restart: it leaves only when withdrawn.
    announced.withdraw().await;
    let change = next(&mut members, PROMPT).await;
    assert!(left(&change, "survivor"), "{change:?}");
}

#[tokio::test]
async fn a_watch_that_missed_a_compaction_lists_again_and_a_lost_lease_is_granted_again() {
    let mut server = EtcdServer::start().await;
    let cluster = "compacted";
    // The shortest lease etcd grants: it expires while the workers cannot reach etcd.
    let lease_ttl = Duration::from_secs(2);
    let etcd = backend(server.endpoint(), cluster, lease_ttl);
    let mut members = etcd.watch().await.expect("watch");

    let mut client = server.client().await;
    let by_hand = advert(cluster, "by-hand", Role::Prefill, Some("10.0.0.7"), 7400);
    let by_hand_at = worker_key(cluster, &by_hand.worker_id);
    client
        .put(by_hand_at.clone(), value(&by_hand, &key()), None)
        .await
        .expect("put by hand");
    let _leased = etcd
        .announce(advert(
            cluster,
            "leased",
            Role::Decode,
            Some("10.0.0.8"),
            7500,
        ))
        .await
        .expect("announce leased");
    let changes = next_n(&mut members, 2, PROMPT).await;
    assert!(
        joined(&changes[0], "by-hand") && joined(&changes[1], "leased"),
        "{changes:?}"
    );

    // Out of the workers' and the watcher's reach: the lease expires, a key is deleted, and
    // the history of both is compacted away.
    let hidden = server.restart_out_of_reach().await;
    let mut client = etcd_client::Client::connect([hidden], None)
        .await
        .expect("client");
    let leased_at = worker_key(cluster, &id("leased"));
    let mut expiry = client
        .watch(leased_at.clone(), None)
        .await
        .expect("watch the leased key");
    let deleted = tokio::time::timeout(lease_ttl + Duration::from_secs(10), async {
        loop {
            let response = expiry.message().await.expect("watch").expect("stream open");
            if response
                .events()
                .iter()
                .any(|e| e.kv().is_some_and(|kv| kv.create_revision() == 0))
            {
                break;
            }
        }
    })
    .await;
    assert!(deleted.is_ok(), "the lease did not expire while unrenewed");
    let deleted = client
        .delete(by_hand_at, None)
        .await
        .expect("delete by hand");
    let revision = deleted.header().expect("header").revision();
    client.compact(revision, None).await.expect("compact");
    drop((expiry, client));

    server.restart().await;

    // The watcher cannot replay the deletion (compacted): only a listing tells it. The
    // worker's lease is gone: it must grant another and put its advert again.
    let mut present: BTreeMap<WorkerId, bool> = BTreeMap::new();
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match members.next().await.expect("watch open") {
                Membership::Joined(m) | Membership::Changed(m) => present.insert(m.id, true),
                Membership::Left { id, .. } => present.insert(id, false),
                refused @ Membership::Refused { .. } => panic!("{refused:?}"),
            };
            if present.get(&id("by-hand")) == Some(&false)
                && present.get(&id("leased")) != Some(&false)
            {
                break;
            }
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "no resync or no re-announcement: {present:?}"
    );
    let mut client = server.client().await;
    let listing = client.get(leased_at, None).await.expect("get");
    let [kv] = listing.kvs() else {
        panic!("the leased worker's key is missing after the restart");
    };
    assert_ne!(kv.lease(), 0, "put again under a new lease");
}

#[tokio::test]
async fn foreign_and_garbage_values_are_refused_and_never_join() {
    let server = EtcdServer::start().await;
    let cluster = "refusals";
    let etcd = backend(server.endpoint(), cluster, Duration::from_secs(10));
    let mut client = server.client().await;

    // Signed with another cluster's key, before the watch: refused from the listing.
    let foreign_key = ClusterKey::new(b"some-other-cluster-key-987654321").expect("key");
    let foreign = advert(cluster, "foreign-1", Role::Prefill, Some("10.6.6.6"), 7700);
    let foreign_at = worker_key(cluster, &foreign.worker_id);
    client
        .put(foreign_at.clone(), value(&foreign, &foreign_key), None)
        .await
        .expect("put foreign");
    let mut members = etcd.watch().await.expect("watch");
    let change = next(&mut members, PROMPT).await;
    assert_eq!(
        change,
        Membership::Refused {
            from: foreign_at,
            source: Source::Etcd,
            reason: Refusal::BadSignature,
        }
    );

    // Signed with this cluster's key but for another cluster (whose adverts live under
    // another prefix): refused where it was put.
    let neighbour = advert(
        "refusals-n",
        "neighbour-1",
        Role::Decode,
        Some("10.5.5.5"),
        7750,
    );
    let neighbour_at = worker_key(cluster, &neighbour.worker_id);
    client
        .put(neighbour_at.clone(), value(&neighbour, &key()), None)
        .await
        .expect("put neighbour");
    let change = next(&mut members, PROMPT).await;
    assert_eq!(
        change,
        Membership::Refused {
            from: neighbour_at,
            source: Source::Etcd,
            reason: Refusal::ForeignCluster("refusals-n".into()),
        }
    );

    // Garbage while watching: refused once, however often it is written.
    let garbage_at = worker_key(cluster, &id("garbage-1"));
    let garbage: Vec<u8> = vec![0xff, 0xfe, 0x00, b'=', 0x80];
    for _ in 0..2 {
        client
            .put(garbage_at.clone(), garbage.clone(), None)
            .await
            .expect("put garbage");
    }
    let change = next(&mut members, PROMPT).await;
    let refused_garbage = matches!(
        &change,
        Membership::Refused { from, source: Source::Etcd, reason: Refusal::Malformed(_) }
            if *from == garbage_at
    );
    assert!(refused_garbage, "{change:?}");

    // Too long to parse, though it starts like an advert.
    let huge_at = worker_key(cluster, &id("huge-1"));
    let mut pairs: BTreeMap<String, String> =
        advert(cluster, "huge-1", Role::Decode, Some("h"), 1).to_pairs(&key());
    pairs.insert("pad".into(), "x".repeat(5000));
    let huge: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    client
        .put(huge_at.clone(), huge, None)
        .await
        .expect("put huge");
    let change = next(&mut members, PROMPT).await;
    let refused_huge = matches!(
        &change,
        Membership::Refused { from, reason: Refusal::Malformed(m), .. }
            if *from == huge_at && m.contains("limit")
    );
    assert!(refused_huge, "{change:?}");

    // The next change is a real worker's join: no refused value became a member, and the
    // repeated garbage was not reported again.
    let _real = etcd
        .announce(advert(
            cluster,
            "real-1",
            Role::Decode,
            Some("10.0.0.1"),
            7800,
        ))
        .await
        .expect("announce real-1");
    let change = next(&mut members, PROMPT).await;
    assert!(joined(&change, "real-1"), "{change:?}");
}

#[tokio::test]
async fn announcing_without_a_host_is_refused_naming_advertise_host() {
    // Refused before anything connects: no etcd needed.
    let etcd = backend(
        "http://127.0.0.1:9".into(),
        "no-host",
        Duration::from_secs(10),
    );
    let result = etcd
        .announce(advert("no-host", "hostless-1", Role::Prefill, None, 7900))
        .await;
    match result {
        Err(e @ Error::InvalidConfig { field, .. }) => {
            assert_eq!(field, "discovery.advertise_host");
            assert!(e.to_string().contains("discovery.advertise_host"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("an advert without a host was announced"),
    }
}

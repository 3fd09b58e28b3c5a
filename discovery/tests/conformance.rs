//! One suite every announcing discovery backend runs (mDNS, etcd): an announced worker joins
//! with the fields it advertised, a withdrawn one leaves, an advert signed with another key or
//! for another cluster is refused and never joins. Real daemons and a real etcd server; each
//! case uses its own cluster name, so cases running at once (and other tests' adverts on the
//! LAN) are only foreign to it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use baton_core::{Fingerprint, WorkerId};
use baton_discovery::advert::now_ms;
use baton_discovery::etcd::EtcdBackend;
use baton_discovery::mdns::MdnsBackend;
use baton_discovery::{
    Advert, Backend, ClusterKey, EtcdConfig, Members, Membership, Refusal, Role,
};
use common::etcd_server::EtcdServer;

/// mDNS announces within a second or so; etcd at once. Generous for a loaded machine.
const WITHIN: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn cluster() -> String {
    format!(
        "conf{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn key(secret: &str) -> ClusterKey {
    ClusterKey::new(secret.as_bytes()).expect("key")
}

fn advert(cluster: &str, id: &str, port: u16) -> Advert {
    Advert {
        cluster: cluster.into(),
        worker_id: WorkerId::parse(id).expect("id"),
        role: Role::Decode,
        fingerprint: Fingerprint([9; 32]),
        host_id: "host-a".into(),
        grpc_port: port,
        event_port: 0,
        host: Some("127.0.0.1".into()),
        issued_ms: now_ms(),
    }
}

/// Makes a backend of one kind for (cluster, key).
type Make<'a> = &'a dyn Fn(&str, ClusterKey) -> Arc<dyn Backend>;

/// The next change about `id` (other workers' changes are skipped), within [`WITHIN`].
async fn next_about(members: &mut Members, id: &str) -> Membership {
    tokio::time::timeout(WITHIN, async {
        loop {
            let change = members.next().await.expect("the watch ended");
            let about = match &change {
                Membership::Joined(m) | Membership::Changed(m) => m.id.to_string() == id,
                Membership::Left { id: left, .. } => left.to_string() == id,
                Membership::Refused { from, .. } => from.contains(id),
            };
            if about {
                return change;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no change about {id} within {WITHIN:?}"))
}

async fn an_announced_worker_joins_and_a_withdrawn_one_leaves(make: Make<'_>) {
    let cluster = cluster();
    let secret = "conformance-suite-key-0123456789";
    let watcher = make(&cluster, key(secret));
    let mut members = watcher.watch().await.expect("watch");
    let announcer = make(&cluster, key(secret));
    let sent = advert(&cluster, "decode-conf-1", 40001);
    let announcement = announcer.announce(sent.clone()).await.expect("announce");
    match next_about(&mut members, "decode-conf-1").await {
        Membership::Joined(m) => {
            assert_eq!(m.role, Role::Decode);
            assert_eq!(m.address, "127.0.0.1:40001");
            assert_eq!(m.advert.as_ref(), Some(&sent));
        }
        other => panic!("expected a join, got {other:?}"),
    }
    announcement.withdraw().await;
    match next_about(&mut members, "decode-conf-1").await {
        Membership::Left { id, .. } => assert_eq!(id.to_string(), "decode-conf-1"),
        other => panic!("expected a leave, got {other:?}"),
    }
}

/// `shared_medium`: every cluster's adverts reach every reader (mDNS), so another cluster's
/// must be refused; under etcd each cluster has its own prefix and a reader never sees them
/// (`tests/etcd.rs` writes one into the prefix by hand).
async fn adverts_of_another_key_or_cluster_are_refused(make: Make<'_>, shared_medium: bool) {
    let cluster = cluster();
    let watcher = make(&cluster, key("the-right-key-0123456789abcdef"));
    let mut members = watcher.watch().await.expect("watch");
    let forger = make(&cluster, key("a-wrong-key-0123456789abcdef"));
    let _forged = forger
        .announce(advert(&cluster, "decode-forged", 40002))
        .await
        .expect("announce");
    match next_about(&mut members, "decode-forged").await {
        Membership::Refused { reason, .. } => assert_eq!(reason, Refusal::BadSignature),
        other => panic!("a forged advert must be refused, got {other:?}"),
    }
    if !shared_medium {
        return;
    }
    // Same key, another cluster name: signed correctly, still not ours.
    let neighbour_cluster = format!("{cluster}-n");
    let neighbour = make(&neighbour_cluster, key("the-right-key-0123456789abcdef"));
    let _theirs = neighbour
        .announce(advert(&neighbour_cluster, "decode-neighbour", 40003))
        .await
        .expect("announce");
    match next_about(&mut members, "decode-neighbour").await {
        Membership::Refused { reason, .. } => {
            assert_eq!(reason, Refusal::ForeignCluster(neighbour_cluster))
        }
        other => panic!("another cluster's advert must be refused, got {other:?}"),
    }
}

fn mdns(cluster: &str, key: ClusterKey) -> Arc<dyn Backend> {
    Arc::new(MdnsBackend::new(cluster.into(), key, None).expect("mdns daemon"))
}

fn etcd(endpoint: String) -> impl Fn(&str, ClusterKey) -> Arc<dyn Backend> {
    move |cluster, key| {
        Arc::new(EtcdBackend::new(
            cluster.into(),
            key,
            EtcdConfig {
                endpoints: vec![endpoint.clone()],
                lease_ttl: Duration::from_secs(5),
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_announced_workers_join_and_leave() {
    an_announced_worker_joins_and_a_withdrawn_one_leaves(&mdns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_refuses_foreign_adverts() {
    adverts_of_another_key_or_cluster_are_refused(&mdns, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_announced_workers_join_and_leave() {
    let server = EtcdServer::start().await;
    an_announced_worker_joins_and_a_withdrawn_one_leaves(&etcd(server.endpoint())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_refuses_foreign_adverts() {
    let server = EtcdServer::start().await;
    adverts_of_another_key_or_cluster_are_refused(&etcd(server.endpoint()), false).await;
}

#[tokio::test]
async fn static_lists_every_configured_worker_and_announces_nothing() {
    let backend = baton_discovery::static_list::StaticBackend::new(
        &["127.0.0.1:7001".into()],
        &["127.0.0.1:7002".into(), "127.0.0.1:7002".into()],
    )
    .expect("static");
    let mut members = backend.watch().await.expect("watch");
    let mut seen = Vec::new();
    for _ in 0..2 {
        match members.next().await.expect("member") {
            Membership::Joined(m) => seen.push((m.role, m.address)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            (Role::Prefill, "127.0.0.1:7001".to_string()),
            (Role::Decode, "127.0.0.1:7002".to_string())
        ],
        "a repeated address is one member"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), members.next())
            .await
            .is_err(),
        "a static list never changes"
    );
    let err = baton_discovery::static_list::StaticBackend::new(&["a b".into()], &[])
        .err()
        .expect("a bad address is refused");
    assert!(err.to_string().contains("prefill_workers"), "{err}");
}

//! Who the coordinator admits: a worker serving another model than the cluster's is listed as
//! refused with the reason, never routed to, and the cluster is not ready on it.

use std::time::{Duration, Instant};

use baton_coordinator::{HandoffShape, TransportChoice};
use baton_e2e::{Coordinator, LIMIT, Workers, http_get, prompt_of};
use baton_proto::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_another_model_are_refused_and_say_why() {
    let workers = Workers::start(64).await;
    let coordinator = Coordinator::spawn(&workers, HandoffShape::Push, TransportChoice::Tcp, |c| {
        c.model_fingerprint = Some("ab".repeat(32));
    })
    .await;
    let start = Instant::now();
    let listed = loop {
        let listed = coordinator
            .client()
            .cluster_status(v1::ClusterStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .workers;
        if listed.len() == 2 && listed.iter().all(|w| w.state == "refused") {
            break listed;
        }
        assert!(start.elapsed() < LIMIT, "not refused: {listed:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for w in &listed {
        assert!(
            w.refusal.contains("this cluster serves abababab"),
            "the reason names both models: {w:?}"
        );
        assert_eq!(w.discovered_via, "static");
    }
    let (code, _) = http_get(coordinator.http, "/ready").await;
    assert_eq!(code, 503, "no admitted worker: not ready");
    let err = coordinator
        .generate(&prompt_of(40, 1), 4, v1::PdMode::Auto)
        .await
        .expect_err("nowhere to run");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

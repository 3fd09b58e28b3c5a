//! The worker's side of the event plane: after each engine turn that changed its load (at most
//! every [`MIN_INTERVAL`]) and at least every [`HEARTBEAT`], the worker publishes its load
//! report with the KV events since its previous message, signed with the cluster key, on a
//! ZeroMQ PUB socket. Coordinators that subscribe stop polling `Load` while messages flow
//! (see the coordinator's `workers.rs`).
//!
//! engine thread --snapshot (watch)--> [publisher task] --PUB WorkerEvent--> coordinators

use std::net::SocketAddr;
use std::time::Duration;

use baton_discovery::ClusterKey;
use baton_discovery::events::EventPublisher;
use baton_proto::v1::{LoadReport, LoadRequest, WorkerEvent};
use prost::Message;
use tokio::sync::watch;

/// Least time between two messages: a busy engine publishes a snapshot per step, and a
/// coordinator needs a few per second, not hundreds.
pub const MIN_INTERVAL: Duration = Duration::from_millis(25);

/// Most time between two messages: an idle worker still says it is alive (a coordinator that
/// hears nothing for three of these polls it instead).
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A running publisher; the task ends when this drops.
pub struct Events {
    pub port: u16,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds a publisher on `host` (any port) and publishes `report`'s answers, each time
/// `changes` sees a new snapshot and on the heartbeat, until `changes` closes (the engine
/// thread ended). `report` builds the load report for a KV cursor, as the `Load` RPC does.
pub async fn publish<S: Send + Sync + 'static>(
    host: std::net::IpAddr,
    key: ClusterKey,
    worker_id: String,
    mut changes: watch::Receiver<S>,
    report: impl Fn(&LoadRequest) -> Option<LoadReport> + Send + 'static,
) -> Result<Events, baton_discovery::Error> {
    let mut publisher = EventPublisher::bind(SocketAddr::new(host, 0), key).await?;
    let port = publisher.port();
    let task = tokio::spawn(async move {
        // The publisher's own cursor into its KV log: each message carries what changed since
        // the previous one (the first, the whole set).
        let (mut epoch, mut after) = (u64::MAX, 0u64);
        let mut seq = 0u64;
        let mut failing = false;
        loop {
            let request = LoadRequest {
                kv_events: true,
                kv_events_epoch: epoch,
                kv_events_after: after,
            };
            let Some(load) = report(&request) else { return };
            if let Some(kv) = &load.kv_events {
                (epoch, after) = (kv.epoch, kv.next);
            }
            seq += 1;
            let event = WorkerEvent {
                worker_id: worker_id.clone(),
                epoch,
                seq,
                sent_ms: baton_discovery::advert::now_ms(),
                load: Some(load),
            };
            match publisher.publish(event.encode_to_vec()).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "event publish failed; coordinators poll instead");
                }
                Err(_) => {}
            }
            tokio::time::sleep(MIN_INTERVAL).await;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    });
    Ok(Events {
        port,
        _task: AbortOnDrop(task),
    })
}

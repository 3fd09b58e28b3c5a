//! Making a worker known to the cluster: after its model is loaded and its listener bound, a
//! worker starts its event publisher (where a cluster key signs it), announces a signed advert
//! through the discovery backend its config names ([`join`]), and withdraws it when its drain
//! starts (so coordinators stop placing work here before the health watch would tell them).

use std::net::SocketAddr;

use std::future::Future;

use baton_discovery::{Advert, Announcement, BackendKind, DiscoveryConfig, Role, advert::now_ms};
use baton_proto::v1::{LoadReport, LoadRequest, WorkerInfo};
use tokio::sync::watch;

use crate::events::Events;

/// What joining the cluster left running: the event publisher (until dropped) and the advert
/// (until withdrawn by [`Joined::leave_after`]'s future, or dropped).
pub struct Joined {
    _events: Option<Events>,
    announcement: Option<Announcement>,
}

impl Joined {
    /// `shutdown`, then the advert's withdrawal: the drain begins with a goodbye, so
    /// coordinators stop placing work here at once. The event publisher runs on (it reports
    /// the drain) until this drops.
    pub fn leave_after(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = ()> + Send {
        let announcement = self.announcement.take();
        async move {
            shutdown.await;
            if let Some(announcement) = announcement {
                announcement.withdraw().await;
            }
        }
    }
}

/// Joins the cluster `config` names: with a cluster key, starts the event publisher on the
/// gRPC listener's address (its port goes into `info.event_port`), publishing `report`'s answers
/// as `snapshots` change; then announces `info` ([`announce`]).
pub async fn join<S: Send + Sync + 'static>(
    config: &DiscoveryConfig,
    role: Role,
    info: &mut WorkerInfo,
    host_id: &str,
    listen: SocketAddr,
    snapshots: watch::Receiver<S>,
    report: impl Fn(&LoadRequest) -> Option<LoadReport> + Send + 'static,
) -> Result<Joined, baton_discovery::Error> {
    let events = match config.key()? {
        Some(key) => {
            let events =
                crate::events::publish(listen.ip(), key, info.worker_id.clone(), snapshots, report)
                    .await?;
            info.event_port = u32::from(events.port);
            Some(events)
        }
        None => None,
    };
    let announcement = announce(config, role, info, host_id, listen).await?;
    Ok(Joined {
        _events: events,
        announcement,
    })
}

/// Announces `info` under `config`'s backend; `None` under `static` discovery (the
/// coordinator's config names this worker). `listen` is the bound gRPC address.
pub async fn announce(
    config: &DiscoveryConfig,
    role: Role,
    info: &WorkerInfo,
    host_id: &str,
    listen: SocketAddr,
) -> Result<Option<Announcement>, baton_discovery::Error> {
    if config.backend == BackendKind::Static {
        return Ok(None);
    }
    let invalid = |field: &'static str, reason: String| baton_discovery::Error::InvalidConfig {
        field,
        reason,
    };
    let fingerprint = info
        .layout
        .as_ref()
        .and_then(|l| <[u8; 32]>::try_from(l.fingerprint.as_slice()).ok())
        .map(baton_core::Fingerprint)
        .ok_or_else(|| invalid("layout", "the engine reported no model fingerprint".into()))?;
    let worker_id = baton_core::WorkerId::parse(&info.worker_id)
        .map_err(|reason| invalid("worker_id", reason))?;
    if listen.ip().is_loopback() && config.advertise_host.is_none() {
        tracing::warn!(%listen, "announcing a worker that listens on loopback: only this machine can reach it (listen on 0.0.0.0 or an interface address for a LAN)");
    }
    // etcd carries no source address: the advert names where to dial.
    let host = config.advertise_host.clone().or_else(|| {
        (config.backend == BackendKind::Etcd && !listen.ip().is_unspecified())
            .then(|| listen.ip().to_string())
    });
    let advert = Advert {
        cluster: config.cluster.clone(),
        worker_id,
        role,
        fingerprint,
        host_id: host_id.to_string(),
        grpc_port: listen.port(),
        event_port: u16::try_from(info.event_port).unwrap_or(0),
        host,
        issued_ms: now_ms(),
    };
    let backend = baton_discovery::open(config, &[], &[])?;
    let announcement = backend.announce(advert).await?;
    tracing::info!(backend = backend.name(), cluster = %config.cluster, "worker announced");
    Ok(Some(announcement))
}

/// The machine's id (`/etc/machine-id`), else its host name: equal ids mean shared memory
/// between the two workers is possible.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

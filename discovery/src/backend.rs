//! The one interface every discovery backend implements: a coordinator watches membership, a
//! worker announces itself. A backend is chosen by name from config ([`open`]).

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::advert::{Advert, ClusterKey};
use crate::config::{BackendKind, DiscoveryConfig};
use crate::error::{Error, Result};
use crate::membership::Membership;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bound of a watch's event queue: a coordinator that stops reading slows the backend's task,
/// never grows memory.
pub const WATCH_QUEUE: usize = 256;

/// A discovery backend.
pub trait Backend: Send + Sync {
    /// Its name in logs and metrics (`static`, `mdns`, `etcd`).
    fn name(&self) -> &'static str;

    /// Starts following the cluster's members: first everyone present, then every change.
    fn watch(&self) -> BoxFuture<'_, Result<Members>>;

    /// Makes `advert` known until the returned [`Announcement`] is withdrawn or dropped (a
    /// process that dies without either leaves when its lease or liveness says so).
    fn announce(&self, advert: Advert) -> BoxFuture<'_, Result<Announcement>>;
}

/// A stream of membership changes; dropping it stops the watch.
pub struct Members {
    rx: mpsc::Receiver<Membership>,
    _keep: Box<dyn Any + Send>,
}

impl Members {
    /// `keep` lives as long as the stream (the backend's task guard, a daemon handle).
    pub fn new(rx: mpsc::Receiver<Membership>, keep: impl Any + Send) -> Self {
        Self {
            rx,
            _keep: Box::new(keep),
        }
    }

    /// The next change; `None` once the backend stopped for good.
    pub async fn next(&mut self) -> Option<Membership> {
        self.rx.recv().await
    }
}

/// A worker's advert, kept alive by the backend until withdrawn or dropped.
pub struct Announcement {
    withdraw: Option<BoxFuture<'static, ()>>,
    _keep: Box<dyn Any + Send>,
}

impl Announcement {
    /// `withdraw` says goodbye (an mDNS goodbye, an etcd lease revoke); `keep` holds the
    /// backend's state alive while the advert stands.
    pub fn new(withdraw: Option<BoxFuture<'static, ()>>, keep: impl Any + Send) -> Self {
        Self {
            withdraw,
            _keep: Box::new(keep),
        }
    }

    /// Takes the advert back and waits (boundedly) until the backend said so to the network,
    /// so a draining worker leaves the coordinators' view at once.
    pub async fn withdraw(mut self) {
        if let Some(withdraw) = self.withdraw.take() {
            withdraw.await;
        }
    }
}

/// Aborts a spawned task when dropped: a backend's task lives exactly as long as the
/// [`Members`] or [`Announcement`] that owns it.
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The backend `config` names. `prefill` and `decode` are the static addresses (the
/// coordinator's lists); other backends ignore them.
pub fn open(
    config: &DiscoveryConfig,
    prefill: &[String],
    decode: &[String],
) -> Result<Arc<dyn Backend>> {
    config.validate()?;
    let key = || -> Result<ClusterKey> {
        config.key()?.ok_or_else(|| Error::InvalidConfig {
            field: "discovery.cluster_key_file",
            reason: "required by this backend".into(),
        })
    };
    Ok(match config.backend {
        BackendKind::Static => Arc::new(crate::static_list::StaticBackend::new(prefill, decode)?),
        BackendKind::Mdns => Arc::new(crate::mdns::MdnsBackend::new(
            config.cluster.clone(),
            key()?,
            config.advertise_host.clone(),
        )?),
        BackendKind::Etcd => Arc::new(crate::etcd::EtcdBackend::new(
            config.cluster.clone(),
            key()?,
            config.etcd.clone(),
        )),
    })
}

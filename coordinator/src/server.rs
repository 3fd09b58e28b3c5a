//! The coordinator process: shared state, the discovery task that feeds the worker registry,
//! the link-and-readiness task, and both frontends (gRPC on one listener, OpenAI HTTP on
//! another), stopped together by one shutdown signal.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_discovery::Backend;
use baton_text::Tokenizer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::workers::{EventCounters, EventPlane, Registry, RegistryConfig};

/// What every request handler shares.
pub struct Inner {
    pub config: CoordinatorConfig,
    pub model_name: String,
    pub tokenizer: Tokenizer,
    pub registry: Registry,
    pub admission: Arc<Semaphore>,
    pub metrics: Metrics,
    /// The client APIs' keys.
    pub auth: crate::auth::Auth,
    /// Cloud upstreams and their budget ledger, when configured.
    pub cloud: Option<crate::cloud::Cloud>,
    /// The coordinators' raft group: the budget ledger, operators' decisions about workers.
    pub replica: Arc<baton_replica::Replica>,
    /// Local requests waiting for their first token, and how fast first tokens come.
    queue: std::sync::Mutex<crate::placement::QueueModel>,
    next_handoff: AtomicU64,
}

impl Inner {
    /// Loads the tokenizer and sets up an empty registry (discovery fills it once serving);
    /// `replica` is the coordinators' raft group. `config` was validated by [`serve`].
    fn new(config: CoordinatorConfig, replica: Arc<baton_replica::Replica>) -> Result<Self> {
        let tokenizer = Tokenizer::load(&config.model)?;
        let model_name = config
            .model_name
            .clone()
            .unwrap_or_else(|| baton_text::model_name(&config.model));
        // With a cluster key, workers that publish events are followed through them (the
        // counters are served either way, at zero without one).
        let counters = EventCounters::default();
        let metrics = Metrics::new();
        metrics.register_events(&counters);
        let events = config
            .discovery
            .key()
            .map_err(discovery_error)?
            .map(|key| EventPlane { key, counters });
        let registry = Registry::new(RegistryConfig {
            poll_interval: config.load_poll_interval,
            leave_after: config.discovery.leave_after,
            fingerprint: config.model_fingerprint()?,
            events,
            tls: config
                .tls
                .as_ref()
                .map(crate::workers::WorkerTls::load)
                .transpose()?,
        });
        // Handoff ids only need to be unique among live handoffs of the workers this
        // coordinator talks to; a random start keeps two coordinators (or a restart) apart.
        let start = rand::random::<u64>() >> 1;
        let cloud = if config.cloud.endpoints.is_empty() {
            None
        } else {
            let budget = crate::budget::Budget::new(replica.clone(), config.cloud.budget.clone());
            metrics.register_ledger(budget.clone());
            Some(crate::cloud::Cloud::open(&config.cloud, budget)?)
        };
        let remote = [config.grpc_listen, config.http_listen]
            .iter()
            .any(|a| !a.ip().is_loopback());
        if remote && config.auth.keys.is_empty() {
            tracing::warn!(
                grpc = %config.grpc_listen,
                http = %config.http_listen,
                "the client APIs are served without API keys beyond this host (auth.insecure_remote)"
            );
        }
        Ok(Self {
            auth: crate::auth::Auth::new(&config.auth),
            cloud,
            replica,
            queue: std::sync::Mutex::new(crate::placement::QueueModel::default()),
            admission: Arc::new(Semaphore::new(config.max_inflight)),
            config,
            model_name,
            tokenizer,
            registry,
            metrics,
            next_handoff: AtomicU64::new(start),
        })
    }

    pub fn queue_model(&self) -> std::sync::MutexGuard<'_, crate::placement::QueueModel> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn next_handoff(&self) -> u64 {
        self.next_handoff.fetch_add(1, Ordering::Relaxed)
    }

    /// The smallest context any known decode worker serves (what a request may use).
    pub fn max_context(&self) -> usize {
        self.registry
            .all()
            .iter()
            .filter(|w| w.refusal().is_none())
            .filter_map(|w| w.info())
            .map(|i| i.max_context as usize)
            .min()
            .unwrap_or(0)
    }

    pub fn block_size(&self) -> usize {
        self.registry
            .decode()
            .iter()
            .filter(|w| w.refusal().is_none())
            .filter_map(|w| w.info())
            .map(|i| i.block_size as usize)
            .max()
            .unwrap_or(16)
    }

    pub fn ready(&self) -> bool {
        self.registry.ready()
    }

    /// Opens KV links for new pairs and refreshes the cluster gauges (each worker polls its
    /// own load).
    async fn tend(&self) {
        // Operators' decisions, as the group applied them, onto the workers they name.
        {
            let state = self.replica.state();
            let state = state.borrow();
            for w in self.registry.all() {
                w.set_operator(state.decision(&w.id().0).cloned());
            }
        }
        self.registry.link_pairs().await;
        let (mut used, mut total, mut waiting) = (0u64, 0u64, 0i64);
        for w in self.registry.decode().iter().filter(|w| w.healthy()) {
            let l = w.load();
            used += u64::from(l.total_blocks.saturating_sub(l.free_blocks));
            total += u64::from(l.total_blocks);
            waiting += i64::from(l.waiting);
        }
        for w in self.registry.prefill().iter().filter(|w| w.healthy()) {
            waiting += i64::from(w.load().running);
        }
        let usage = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        self.metrics.set_worker_state(usage, waiting);
        let workers = self.registry.all();
        self.metrics
            .set_workers(&workers, self.registry.leave_after());
        for w in &workers {
            self.metrics
                .set_worker_cached_blocks(&w.id().0, w.role.as_str(), w.cached_blocks());
        }
    }
}

/// Binds both listeners from the config and serves until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let grpc = bind(config.grpc_listen).await?;
    let http = bind(config.http_listen).await?;
    serve(config, grpc, http, shutdown).await
}

fn discovery_error(e: baton_discovery::Error) -> Error {
    match e {
        baton_discovery::Error::InvalidConfig { field, reason } => Error::InvalidConfig {
            field: field.into(),
            reason,
        },
        other => Error::Internal(other.to_string()),
    }
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("bind {addr}: {e}")))
}

/// Serves on already bound listeners (tests bind 127.0.0.1:0 and keep them).
pub async fn serve(
    config: CoordinatorConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let interval = config.load_poll_interval;
    config.validate()?;
    let replica_config = config.replica()?;
    if replica_config.data.as_os_str().is_empty() {
        tracing::info!(
            "operators' decisions about workers are kept in memory (no replica.data nor \
             cloud.budget.ledger): they end with this coordinator"
        );
    }
    let replica = baton_replica::Replica::start(replica_config)
        .await
        .map_err(|e| Error::Internal(format!("the coordinators' raft group: {e}")))?;
    let inner = match Inner::new(config, replica.clone()) {
        Ok(inner) => Arc::new(inner),
        Err(e) => {
            replica.shutdown().await;
            return Err(e);
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Membership: the configured lists, then whatever the discovery backend reports, applied
    // by one task for the life of the server.
    let statics = baton_discovery::static_list::StaticBackend::new(
        &inner.config.prefill_workers,
        &inner.config.decode_workers,
    )
    .map_err(discovery_error)?;
    let mut feeds = vec![statics.watch().await.map_err(discovery_error)?];
    if inner.config.discovery.backend != baton_discovery::BackendKind::Static {
        let backend =
            baton_discovery::open(&inner.config.discovery, &[], &[]).map_err(discovery_error)?;
        feeds.push(backend.watch().await.map_err(discovery_error)?);
        tracing::info!(backend = backend.name(), cluster = %inner.config.discovery.cluster, "discovering workers");
    }
    let membership = {
        let inner = inner.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(baton_discovery::backend::WATCH_QUEUE);
            for mut feed in feeds {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(change) = feed.next().await {
                        if tx.send(change).await.is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            while let Some(change) = rx.recv().await {
                if let Some(label) = inner.registry.apply(change) {
                    inner.metrics.advert_refused(label);
                }
            }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    crate::grpc::report_readiness(&health, false).await;
    let poller = {
        let inner = inner.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut was_ready = false;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    r = stop.wait_for(|s| *s) => { drop(r); true }
                };
                if stopping {
                    return;
                }
                inner.tend().await;
                let ready = inner.ready();
                if ready != was_ready {
                    crate::grpc::report_readiness(&health, ready).await;
                    tracing::info!(ready, "cluster readiness changed");
                    was_ready = ready;
                }
            }
        })
    };

    tracing::info!(
        grpc = %grpc.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        http = %http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        model = %inner.model_name,
        "coordinator serving"
    );
    let grpc_server = crate::grpc::serve(
        inner.clone(),
        grpc,
        health_service,
        stopped(stop_rx.clone()),
    );
    let http_server = crate::http::serve(inner.clone(), http, stopped(stop_rx.clone()));
    let (g, h) = tokio::join!(grpc_server, http_server);
    poller.abort();
    membership.abort();
    // Streams that ended with the servers may still be closing their reservations.
    replica.shutdown().await;
    g?;
    h
}

//! The workers the coordinator routes to: their clients, what they said about themselves
//! (`Info`), their last load report, and health. Membership comes from discovery (the static
//! lists of the config, mDNS adverts, etcd keys): [`Registry::apply`] adds a worker when it
//! joins and removes it when it leaves, while requests are served. Each worker has its own
//! poll task (a dead or partitioned worker never delays the others' polls) and a health watch;
//! both end when it leaves. When a prefill and a decode worker are both known and healthy, the
//! prefill worker is told to open its KV connection to the decode worker then, not on the first
//! request; the link is forgotten when either leaves.
//!
//! Admission: a worker serves only the cluster's model. The expected model is the configured
//! fingerprint, else the first worker admitted; a worker whose fingerprint or block size
//! differs, or whose `Info` contradicts its advert, is refused: listed, never routed to.
//!
//! A worker that starts draining (SIGTERM) turns its grpc.health.v1 status to NOT_SERVING; a
//! health watch per worker sees that at once and placement skips the worker from then on.
//! A discovered worker that answers nothing for `leave_after` is shown as silent (its KV links
//! close); it comes back if it answers again, and goes when discovery says it left.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use baton_core::{BlockHash, Fingerprint, KvIndex, block_hashes, reusable_blocks};
use baton_discovery::{Member, Membership, Source};
use baton_proto::v1::{
    self, ConnectRequest, DisconnectRequest, InfoRequest, LoadReport, LoadRequest, WorkerInfo,
    decode_worker_client::DecodeWorkerClient, prefill_worker_client::PrefillWorkerClient,
};
use baton_telemetry::TraceContext;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::error::{Error, Result};
use crate::placement::{Candidate, LinkCost, LinkEstimate, PrefillRate};

/// A worker's name: its configured gRPC address until it reports its own id (a discovered
/// worker is named by its advert from the start).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a worker does: the role its advert (or the configured list) names.
pub use baton_discovery::Role as WorkerRole;

tokio::task_local! {
    /// The deadline of the request this task is serving, when its client set one.
    pub static DEADLINE: Option<tokio::time::Instant>;
}

/// What every call to a worker carries: the current span's W3C trace context (so the worker's
/// spans join the request's trace) and, inside a [`DEADLINE`] scope, the time left as
/// `grpc-timeout` (so the worker stops working for a client that has given up).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outgoing;

impl tonic::service::Interceptor for Outgoing {
    fn call(
        &mut self,
        request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let mut request = TraceContext.call(request)?;
        if let Ok(Some(deadline)) = DEADLINE.try_with(|d| *d) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            request.set_timeout(left.max(Duration::from_millis(1)));
        }
        Ok(request)
    }
}

/// One worker as the coordinator sees it.
pub struct Worker {
    /// Its name in the membership: the advert's worker id, or the configured address.
    pub key: baton_core::WorkerId,
    pub role: WorkerRole,
    pub address: String,
    /// How it was found.
    pub source: Source,
    /// What it advertised (discovered workers).
    advert: Option<baton_discovery::Advert>,
    /// The model every worker must serve, shared by the registry.
    expected: Arc<Mutex<Option<Expected>>>,
    /// Why it is not admitted, when it is not.
    refused: Mutex<Option<String>>,
    /// Since when it has failed every call.
    silent_since: Mutex<Option<Instant>>,
    /// Its poll and health-watch tasks, aborted when it leaves.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    channel: Channel,
    info: Mutex<Option<WorkerInfo>>,
    load: Mutex<LoadReport>,
    healthy: AtomicBool,
    /// The worker said it is draining (health NOT_SERVING, or its load report): no new work.
    draining: AtomicBool,
    /// An operator's standing decision (drain, refuse), as the coordinators' group applied it.
    operator: Mutex<Option<baton_replica::Decision>>,
    /// Requests placed here and not finished.
    placed: AtomicU32,
    /// Their prompt tokens still to compute (prefill workers: until the first token).
    placed_tokens: AtomicU64,
    /// The blocks its prefix cache holds, from the KV events of its load reports.
    kv_index: Mutex<KvIndex>,
    /// Its last event-plane message: (epoch, sequence number, sent at in Unix ms).
    last_event: Mutex<Option<(u64, u64, u64)>>,
    /// Its prefill compute as measured (prefill workers).
    prefill_rate: Mutex<PrefillRate>,
    /// True once it left the cluster or stayed silent for `leave_after`: the requests
    /// streaming from it fail then instead of waiting on a peer that may never answer.
    lost: tokio::sync::watch::Sender<bool>,
}

/// The model and block size every worker of the cluster must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub fingerprint: Fingerprint,
    /// `None` while set from config only: the first admitted worker's becomes the rule.
    pub block_size: Option<u32>,
}

impl Worker {
    fn new(
        member: Member,
        expected: Arc<Mutex<Option<Expected>>>,
        tls: Option<&WorkerTls>,
    ) -> Result<Self> {
        let role = member.role;
        let address = member.address;
        let field = match role {
            WorkerRole::Prefill => "prefill_workers",
            WorkerRole::Decode => "decode_workers",
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{address}")).map_err(|e| {
            Error::InvalidConfig {
                field: field.into(),
                reason: format!("{address:?}: {e}"),
            }
        })?;
        if let Some(tls) = tls {
            let config = match role {
                WorkerRole::Prefill => &tls.prefill,
                WorkerRole::Decode => &tls.decode,
            };
            endpoint = endpoint
                .tls_config(config.clone())
                .map_err(|e| Error::InvalidConfig {
                    field: "tls".into(),
                    reason: e.to_string(),
                })?;
        }
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            key: member.id,
            role,
            address,
            source: member.source,
            advert: member.advert,
            expected,
            refused: Mutex::new(None),
            silent_since: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            channel,
            info: Mutex::new(None),
            load: Mutex::new(LoadReport::default()),
            healthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            operator: Mutex::new(None),
            placed: AtomicU32::new(0),
            placed_tokens: AtomicU64::new(0),
            kv_index: Mutex::new(KvIndex::default()),
            last_event: Mutex::new(None),
            prefill_rate: Mutex::new(PrefillRate::default()),
            lost: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn id(&self) -> WorkerId {
        // A discovered worker's advert named it; its Info (checked against the advert) says
        // the same, and the name stays while it is silent.
        if self.advert.is_some() {
            return WorkerId(self.key.to_string());
        }
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        WorkerId(
            info.as_ref()
                .map_or_else(|| self.address.clone(), |i| i.worker_id.clone()),
        )
    }

    pub fn info(&self) -> Option<WorkerInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn load(&self) -> LoadReport {
        self.load.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Healthy, admitted and not draining: new requests may be placed here.
    pub fn routable(&self) -> bool {
        self.healthy() && !self.draining() && self.refusal().is_none()
    }

    /// Why it is not admitted (another model, an `Info` that contradicts its advert, an
    /// operator's refusal).
    pub fn refusal(&self) -> Option<String> {
        let own = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        own.or_else(|| {
            self.operator()
                .filter(|d| d.kind == baton_replica::DecisionKind::Refused)
                .map(|d| format!("refused by an operator: {}", d.reason))
        })
    }

    fn operator(&self) -> Option<baton_replica::Decision> {
        self.operator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the operator's decision about this worker (from the replicated state); a change
    /// is logged.
    pub fn set_operator(&self, decision: Option<baton_replica::Decision>) {
        let mut current = self.operator.lock().unwrap_or_else(|p| p.into_inner());
        if *current == decision {
            return;
        }
        match &decision {
            Some(d) => {
                tracing::warn!(worker = %self.address, role = self.role.as_str(), decision = ?d.kind, reason = %d.reason, by = d.by_node, "an operator's decision: no new work goes to this worker")
            }
            None => {
                tracing::info!(worker = %self.address, role = self.role.as_str(), "an operator restored this worker")
            }
        }
        *current = decision;
    }

    /// Discovered, and silent for at least `leave_after`: out of placement and KV links
    /// until it answers again.
    pub fn silent_for(&self, leave_after: Duration) -> Option<Duration> {
        let since = (*self.silent_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        let silent = since.elapsed();
        (silent >= leave_after).then_some(silent)
    }

    /// Its host id: advertised, else from its KV endpoints (empty while unknown).
    pub fn host_id(&self) -> String {
        if let Some(a) = &self.advert {
            return a.host_id.clone();
        }
        self.info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|i| i.kv_endpoints.first().map(|e| e.host_id.clone()))
            .unwrap_or_default()
    }

    /// A `Prefill` call that computed `tokens` prompt tokens took `took` (queueing included:
    /// what a request placed here waits).
    pub fn observe_prefill(&self, tokens: usize, took: Duration) {
        self.prefill_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(tokens, took.as_secs_f64());
    }

    /// The worker drains (it said so), or an operator drained it.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
            || self
                .operator()
                .is_some_and(|d| d.kind == baton_replica::DecisionKind::Drained)
    }

    /// Calls carry the current span's trace context and the request's deadline (see
    /// [`Outgoing`]).
    pub fn prefill_client(&self) -> PrefillWorkerClient<InterceptedService<Channel, Outgoing>> {
        PrefillWorkerClient::with_interceptor(self.channel.clone(), Outgoing)
    }

    pub fn decode_client(&self) -> DecodeWorkerClient<InterceptedService<Channel, Outgoing>> {
        DecodeWorkerClient::with_interceptor(self.channel.clone(), Outgoing)
    }

    fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            if draining {
                tracing::info!(worker = %self.address, role = self.role.as_str(), "worker draining; no new work goes there");
            } else {
                tracing::info!(worker = %self.address, role = self.role.as_str(), "worker serving again");
            }
        }
    }

    /// Follows the worker's grpc.health.v1 status until aborted: NOT_SERVING marks it draining
    /// the moment the worker says so, without waiting for the next load poll; a watch that
    /// breaks marks it unhealthy. A broken watch is opened again after `retry`.
    pub async fn watch_health(self: Arc<Self>, retry: Duration) {
        let service = match self.role {
            WorkerRole::Prefill => "baton.v1.PrefillWorker",
            WorkerRole::Decode => "baton.v1.DecodeWorker",
        };
        let mut attempts = tokio::time::interval(retry);
        attempts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            attempts.tick().await;
            let watched = HealthClient::new(self.channel.clone())
                .watch(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if let Ok(stream) = watched {
                let mut stream = stream.into_inner();
                while let Ok(Some(status)) = stream.message().await {
                    match ServingStatus::try_from(status.status) {
                        Ok(ServingStatus::NotServing) => self.set_draining(true),
                        Ok(ServingStatus::Serving) => self.set_draining(false),
                        _ => {}
                    }
                }
                // The watch broke: the process died or stopped serving. Out of placement at
                // once (a worker followed through events is not polled to find out); its next
                // answer or event brings it back.
                self.mark_unhealthy();
            }
        }
    }

    /// Marks a request placed here, with `tokens` of prompt to compute, until the guard drops.
    pub fn place(self: &Arc<Self>, tokens: u64) -> Placed {
        self.placed.fetch_add(1, Ordering::Relaxed);
        self.placed_tokens.fetch_add(tokens, Ordering::Relaxed);
        Placed(self.clone(), tokens)
    }

    /// Of `prompt`, the tokens (whole blocks, never the last token's) whose KV this worker
    /// last reported caching; 0 before it said who it is. `names` memoizes the prompt's block
    /// names per (fingerprint, block size), so workers of one model share the work.
    pub fn cached_prefix(&self, prompt: &[u32], names: &mut PromptNames) -> (u32, u32) {
        // Read in place: this runs for every worker on every request.
        let naming = self.info.lock().ok().and_then(|info| {
            let info = info.as_ref()?;
            let fp = <[u8; 32]>::try_from(info.layout.as_ref()?.fingerprint.as_slice()).ok()?;
            Some((Fingerprint(fp), info.block_size as usize))
        });
        let Some((fingerprint, bs)) = naming.filter(|(_, bs)| *bs > 0) else {
            return (0, 0);
        };
        let hashes = names.get(fingerprint, bs, prompt);
        let blocks = self
            .kv_index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cached_prefix(hashes);
        ((blocks * bs) as u32, blocks as u32)
    }

    /// Blocks in its prefix cache, as last reported.
    pub fn cached_blocks(&self) -> usize {
        self.kv_index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// A call failed as if the worker were gone: stop routing to it until a poll succeeds.
    pub fn mark_unhealthy(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.address, role = self.role.as_str(), "worker unhealthy");
        }
    }

    fn candidate(&self, needed_blocks: u32, prompt: &[u32], names: &mut PromptNames) -> Candidate {
        let load = self.load();
        let (cached_tokens, cached_blocks) = self.cached_prefix(prompt, names);
        Candidate {
            healthy: self.routable() && self.info.lock().is_ok_and(|i| i.is_some()),
            queued: load.running + load.waiting,
            placed: self.placed.load(Ordering::Relaxed),
            placed_tokens: self.placed_tokens.load(Ordering::Relaxed),
            free_blocks: load.free_blocks,
            needed_blocks,
            cached_tokens,
            cached_blocks,
        }
    }

    async fn poll(&self) -> bool {
        let known = self.info().is_some();
        let result = async {
            if !known {
                let info = match self.role {
                    WorkerRole::Prefill => self.prefill_client().info(InfoRequest {}).await,
                    WorkerRole::Decode => self.decode_client().info(InfoRequest {}).await,
                }?
                .into_inner();
                match self.admit(&info) {
                    Ok(()) => {
                        tracing::info!(worker = %info.worker_id, address = %self.address, role = self.role.as_str(), via = self.source.as_str(), "worker admitted");
                        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    Err(reason) => {
                        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                        if refused.as_deref() != Some(reason.as_str()) {
                            tracing::warn!(worker = %info.worker_id, address = %self.address, role = self.role.as_str(), %reason, "worker refused");
                        }
                        *refused = Some(reason);
                    }
                }
                *self.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            }
            let (epoch, after) = self
                .kv_index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .cursor();
            let request = LoadRequest {
                kv_events: true,
                kv_events_epoch: epoch,
                kv_events_after: after,
            };
            let mut load = match self.role {
                WorkerRole::Prefill => self.prefill_client().load(request).await,
                WorkerRole::Decode => self.decode_client().load(request).await,
            }?
            .into_inner();
            self.set_draining(load.draining);
            self.apply_kv_events(load.kv_events.take(), load.total_blocks);
            *self.load.lock().unwrap_or_else(|p| p.into_inner()) = load;
            Ok::<_, tonic::Status>(())
        };
        // A worker that stopped answering (SIGSTOP, a dead host whose connection still looks
        // open) fails the poll instead of holding it forever, so it leaves placement.
        let result = tokio::time::timeout(POLL_TIMEOUT, result)
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer to a poll within {POLL_TIMEOUT:?}"
                )))
            });
        match result {
            Ok(()) => {
                *self.silent_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(worker = %self.address, role = self.role.as_str(), "worker healthy");
                }
                true
            }
            Err(status) => {
                self.silent_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(Instant::now);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(worker = %self.address, role = self.role.as_str(), error = %status.message(), "worker unhealthy");
                }
                // A restarted worker may come back with another id or layout: ask again, and
                // learn its cache afresh.
                *self.info.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.kv_index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                false
            }
        }
    }
}

/// What one event-plane message did.
enum Applied {
    Yes {
        gap: bool,
    },
    /// Not applied: unreadable, another worker's, too old, or already seen.
    Stale,
    /// Its load applied, its KV events did not continue this coordinator's cursor.
    NeedsResync,
}

/// The longest a poll (`Info`, `Load`) may take. Both are answered from what the worker last
/// published, never behind an engine step, so only a worker that stopped answering takes this
/// long.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a peer may take to close its KV link to a departed worker.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a worker channel's TCP connect may take (tonic bounds the connect only, not a
/// TLS handshake after it; a poll's own time-out bounds that), as long as a poll's answer.
const CONNECT_TIMEOUT: Duration = POLL_TIMEOUT;

/// HTTP/2 keep-alive on worker channels: a ping this often, with or without calls open, and the
/// connection closed when one goes unanswered for [`KEEP_ALIVE_TIMEOUT`]. Polls take a silent
/// worker out of placement and fail its streams ([`POLL_TIMEOUT`], then `leave_after`); this
/// bounds how long the channel keeps a dead connection (without it, until TCP stops
/// retransmitting: many minutes), so calls on it fail and the next ones go out on a fresh
/// connection once the worker is reachable again. Interval plus timeout (15 s) is above the
/// default `leave_after` (5 s), so the polls, which log why, act first.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keep-alive ping may go unanswered. The worker's HTTP/2 layer answers it, never
/// behind an engine step, so this is above [`POLL_TIMEOUT`]: a worker that answers its polls in
/// time never loses its connection to a ping.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A coordinator hears nothing from a publishing worker this long (three of its heartbeats)
/// and polls it instead.
const EVENT_SILENCE: Duration = Duration::from_millis(1500);

/// An event older than this is a replay.
const EVENT_MAX_AGE: Duration = Duration::from_secs(60);

/// The event plane as the registry's workers use it: the key messages are signed with, and
/// what happened to them.
#[derive(Debug, Clone)]
pub struct EventPlane {
    pub key: baton_discovery::ClusterKey,
    pub counters: EventCounters,
}

/// Counters of the event plane (registered in the coordinator's metrics).
#[derive(Debug, Clone)]
pub struct EventCounters {
    pub received: prometheus_client::metrics::counter::Counter,
    pub refused: prometheus_client::metrics::counter::Counter,
    pub gaps: prometheus_client::metrics::counter::Counter,
    pub resyncs: prometheus_client::metrics::counter::Counter,
    pub silences: prometheus_client::metrics::counter::Counter,
    pub unreachable: prometheus_client::metrics::counter::Counter,
    /// From a message's send time to its application, seconds (one clock per LAN host:
    /// skew between hosts shows here).
    pub lag: prometheus_client::metrics::histogram::Histogram,
}

impl Default for EventCounters {
    fn default() -> Self {
        Self {
            received: Default::default(),
            refused: Default::default(),
            gaps: Default::default(),
            resyncs: Default::default(),
            silences: Default::default(),
            unreachable: Default::default(),
            // 0.1 ms to about 6.5 s.
            lag: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17),
            ),
        }
    }
}

impl Worker {
    /// Applies KV events the worker pushed; `false` when they do not continue this
    /// coordinator's cursor (the caller asks with its cursor instead).
    fn apply_pushed_kv_events(&self, events: &v1::KvEvents, total_blocks: u32) -> bool {
        let mut index = self.kv_index.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(events) = baton_proto::convert::kv_events_from_proto(events) else {
            index.clear();
            return false;
        };
        if !index.apply_pushed(&events) {
            return false;
        }
        if index.len() > total_blocks as usize {
            index.clear();
            return false;
        }
        true
    }
}

impl Worker {
    /// Checks a worker's `Info` against its advert and the cluster's model; the first worker
    /// admitted sets the model when config named none.
    fn admit(&self, info: &WorkerInfo) -> std::result::Result<(), String> {
        let fingerprint = info
            .layout
            .as_ref()
            .and_then(|l| <[u8; 32]>::try_from(l.fingerprint.as_slice()).ok())
            .map(Fingerprint)
            .ok_or("its Info carries no model fingerprint")?;
        if let Some(advert) = &self.advert {
            if info.worker_id != advert.worker_id.to_string() {
                return Err(format!(
                    "its address now answers as worker {:?}, not the advertised {}",
                    info.worker_id, advert.worker_id
                ));
            }
            if fingerprint != advert.fingerprint {
                return Err(format!(
                    "its Info names model {fingerprint}, its advert {}",
                    advert.fingerprint
                ));
            }
        }
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        let rule = expected.get_or_insert(Expected {
            fingerprint,
            block_size: None,
        });
        if rule.fingerprint != fingerprint {
            return Err(format!(
                "it serves model {fingerprint}; this cluster serves {}",
                rule.fingerprint
            ));
        }
        match rule.block_size {
            Some(bs) if bs != info.block_size => Err(format!(
                "its KV blocks hold {} tokens; this cluster's hold {bs}",
                info.block_size
            )),
            _ => {
                rule.block_size = Some(info.block_size);
                Ok(())
            }
        }
    }

    /// Follows the worker until aborted (it left): its event-plane messages where it publishes
    /// them and this coordinator holds the cluster key, else a `Load` poll every `interval`.
    /// A poll or a subscription that hangs (a partitioned host) holds up only this worker.
    /// Silent for `leave_after`, it is lost: the requests streaming from it fail.
    async fn poll_loop(
        self: Arc<Self>,
        interval: Duration,
        leave_after: Duration,
        events: Option<EventPlane>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.poll().await {
                if self.silent_for(leave_after).is_some() && !*self.lost.borrow() {
                    tracing::warn!(worker = %self.key, address = %self.address, silent_s = leave_after.as_secs_f64(), "worker silent: out of placement, its streams fail");
                    self.lost.send_replace(true);
                }
                continue;
            }
            self.lost.send_replace(false);
            if let (Some(plane), Some(endpoint)) = (&events, self.event_endpoint()) {
                self.follow_events(plane, &endpoint).await;
            }
        }
    }

    /// Where its event publisher listens: its gRPC host and the port its `Info` names.
    fn event_endpoint(&self) -> Option<String> {
        let port = self.info()?.event_port;
        let (host, _) = self.address.rsplit_once(':')?;
        (port != 0).then(|| format!("{host}:{port}"))
    }

    /// Applies the worker's messages until they stop (silent for [`EVENT_SILENCE`], or the
    /// connection failed); a gap in its KV events is filled with one `Load` call. Returns for
    /// the caller to poll (and come back).
    async fn follow_events(&self, plane: &EventPlane, endpoint: &str) {
        let subscribed = tokio::time::timeout(
            EVENT_SILENCE,
            baton_discovery::events::EventSubscriber::connect(endpoint, plane.key.clone()),
        )
        .await;
        let Ok(Ok(mut subscriber)) = subscribed else {
            plane.counters.unreachable.inc();
            return;
        };
        loop {
            match tokio::time::timeout(EVENT_SILENCE, subscriber.next()).await {
                Err(_) => {
                    plane.counters.silences.inc();
                    return;
                }
                Ok(Err(_)) => return,
                Ok(Ok(Err(refusal))) => {
                    plane.counters.refused.inc();
                    tracing::debug!(worker = %self.key, %refusal, "event ignored");
                }
                Ok(Ok(Ok(payload))) => match self.apply_event(&payload) {
                    Applied::Yes { gap } => {
                        plane.counters.received.inc();
                        plane.counters.lag.observe(self.event_lag());
                        if gap {
                            plane.counters.gaps.inc();
                        }
                    }
                    Applied::Stale => {
                        plane.counters.refused.inc();
                    }
                    Applied::NeedsResync => {
                        plane.counters.received.inc();
                        plane.counters.resyncs.inc();
                        if !self.poll().await {
                            return;
                        }
                    }
                },
            }
        }
    }

    /// Seconds since the last applied message was sent.
    fn event_lag(&self) -> f64 {
        let sent = self
            .last_event
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |(_, _, sent)| sent);
        baton_discovery::advert::now_ms().saturating_sub(sent) as f64 / 1000.0
    }

    /// Applies one verified message: its load, and its KV events where they continue this
    /// coordinator's cursor.
    fn apply_event(&self, payload: &[u8]) -> Applied {
        use prost::Message;
        let Ok(event) = v1::WorkerEvent::decode(payload) else {
            return Applied::Stale;
        };
        // Read in place: this runs for every message.
        let named = self
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|i| i.worker_id == event.worker_id);
        let old = baton_discovery::advert::now_ms().saturating_sub(event.sent_ms)
            > EVENT_MAX_AGE.as_millis() as u64;
        let Some(mut load) = event.load.filter(|_| named && !old) else {
            return Applied::Stale;
        };
        let gap = {
            let mut last = self.last_event.lock().unwrap_or_else(|p| p.into_inner());
            let gap = match *last {
                Some((epoch, seq, _)) if epoch == event.epoch && event.seq <= seq => {
                    return Applied::Stale;
                }
                Some((epoch, seq, _)) => epoch == event.epoch && event.seq != seq + 1,
                None => false,
            };
            *last = Some((event.epoch, event.seq, event.sent_ms));
            gap
        };
        self.set_draining(load.draining);
        let continuous = match load.kv_events.take() {
            None => true,
            Some(events) => self.apply_pushed_kv_events(&events, load.total_blocks),
        };
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = load;
        *self.silent_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(worker = %self.address, role = self.role.as_str(), "worker healthy");
        }
        if continuous {
            Applied::Yes { gap }
        } else {
            Applied::NeedsResync
        }
    }

    /// Resolves once it is lost (left, or silent for `leave_after`); see [`Worker::lost`].
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.lost.subscribe();
        async move {
            // A dropped sender (the worker itself gone) is lost too.
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }

    /// Ends its tasks (it left); requests streaming from it fail.
    fn stop(&self) {
        self.lost.send_replace(true);
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Applies a load report's KV events; events this coordinator cannot read (a block name
    /// of the wrong size) drop what it knew, so the next poll asks for the whole set.
    /// A worker cannot cache more blocks than its pool holds (`total_blocks`): an index that
    /// grows past that is dropped too, so a confused worker cannot grow this process's memory.
    fn apply_kv_events(&self, events: Option<v1::KvEvents>, total_blocks: u32) {
        let Some(events) = events else { return };
        let mut index = self.kv_index.lock().unwrap_or_else(|p| p.into_inner());
        match baton_proto::convert::kv_events_from_proto(&events) {
            Ok(events) => {
                index.apply(&events);
                if index.len() > total_blocks as usize {
                    tracing::warn!(worker = %self.address, cached = index.len(), total_blocks, "kv events name more blocks than the worker's pool holds; ignoring its cache until it reports again");
                    index.clear();
                }
            }
            Err(e) => {
                tracing::warn!(worker = %self.address, error = %e, "unreadable kv events; asking for the whole set");
                index.clear();
            }
        }
    }
}

/// A prompt's block names, computed once per (model fingerprint, block size) among the
/// workers one placement looks at.
#[derive(Debug, Default)]
pub struct PromptNames(HashMap<(Fingerprint, usize), Vec<BlockHash>>);

impl PromptNames {
    /// Names of the prompt's full blocks before its last token's block: the prefix a worker
    /// can reuse (it always computes the last token to sample from it).
    fn get(&mut self, fingerprint: Fingerprint, block_size: usize, prompt: &[u32]) -> &[BlockHash] {
        self.0.entry((fingerprint, block_size)).or_insert_with(|| {
            let usable = reusable_blocks(prompt.len(), block_size) * block_size;
            block_hashes(&fingerprint, block_size, &prompt[..usable])
        })
    }
}

/// Counts a request (and its prompt tokens) against a worker while it runs there.
pub struct Placed(Arc<Worker>, u64);

impl Placed {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.placed.fetch_sub(1, Ordering::Relaxed);
        self.0.placed_tokens.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A worker's state in one word (status and metrics): `refused`, `silent` (discovered and
/// silent for `leave_after`), `unhealthy`, `draining` or `routable`.
pub fn state(w: &Worker, leave_after: Duration) -> &'static str {
    if w.refusal().is_some() {
        "refused"
    } else if w.source != Source::Static && w.silent_for(leave_after).is_some() {
        "silent"
    } else if !w.healthy() {
        "unhealthy"
    } else if w.draining() {
        "draining"
    } else {
        "routable"
    }
}

/// A decode worker's KV endpoint as a prefill worker can dial it: a TCP listener bound to
/// every interface (0.0.0.0, ::) reports that address, so the host the coordinator reaches the
/// worker's gRPC service at stands in.
fn reachable(endpoint: &v1::KvEndpoint, worker_address: &str) -> v1::KvEndpoint {
    let mut endpoint = endpoint.clone();
    if endpoint.transport != v1::Transport::Tcp as i32 {
        return endpoint;
    }
    let (Ok(kv), Some((host, _))) = (
        endpoint.address.parse::<std::net::SocketAddr>(),
        worker_address.rsplit_once(':'),
    ) else {
        return endpoint;
    };
    if kv.ip().is_unspecified() {
        endpoint.address = format!("{host}:{}", kv.port());
    }
    endpoint
}

/// A handoff's blocks with their endpoints made reachable (see [`reachable`]): the worker that
/// holds them is dialled at `worker_address`.
pub fn reachable_blocks(mut blocks: v1::KvBlocks, worker_address: &str) -> v1::KvBlocks {
    for endpoint in &mut blocks.endpoints {
        *endpoint = reachable(endpoint, worker_address);
    }
    blocks
}

/// How the registry polls and when a silent worker leaves placement.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub poll_interval: Duration,
    pub leave_after: Duration,
    /// The model every worker must serve; `None`: the first admitted worker's.
    pub fingerprint: Option<Fingerprint>,
    /// The event plane, where a cluster key is configured: workers that publish are followed
    /// through their messages instead of polls.
    pub events: Option<EventPlane>,
    /// Mutual TLS to the workers: the coordinator's identity, and each role's certificate
    /// checked against the cluster CA.
    pub tls: Option<WorkerTls>,
}

/// The client side of mutual TLS, per worker role.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    pub prefill: tonic::transport::ClientTlsConfig,
    pub decode: tonic::transport::ClientTlsConfig,
}

impl WorkerTls {
    pub fn load(files: &baton_core::tls::TlsFiles) -> Result<Self> {
        let config = |role| {
            baton_proto::tls::client_config(files, role).map_err(|e| Error::InvalidConfig {
                field: e.field.into(),
                reason: e.reason,
            })
        };
        Ok(Self {
            prefill: config("prefill")?,
            decode: config("decode")?,
        })
    }
}

/// Every worker, by membership id. One owner: membership changes come through [`apply`]
/// (the discovery task), reads take a snapshot.
///
/// [`apply`]: Registry::apply
pub struct Registry {
    config: RegistryConfig,
    workers: RwLock<Vec<Arc<Worker>>>,
    expected: Arc<Mutex<Option<Expected>>>,
    /// (prefill, decode) pairs whose KV link is open, and whether it is shared memory.
    links: Mutex<HashMap<(baton_core::WorkerId, baton_core::WorkerId), bool>>,
    /// Refusals already logged, by (source, what); bounded.
    refusals_logged: Mutex<HashSet<(String, &'static str)>>,
    /// Each (prefill, decode) pair's KV link as its transfers showed it, by worker names.
    link_estimates: Mutex<HashMap<(String, String), LinkEstimate>>,
}

/// Most distinct refusals logged one by one; past it they are only counted.
const MAX_LOGGED_REFUSALS: usize = 1024;

impl Registry {
    pub fn new(config: RegistryConfig) -> Self {
        let expected = config.fingerprint.map(|fingerprint| Expected {
            fingerprint,
            block_size: None,
        });
        Self {
            config,
            workers: RwLock::new(Vec::new()),
            expected: Arc::new(Mutex::new(expected)),
            links: Mutex::new(HashMap::new()),
            refusals_logged: Mutex::new(HashSet::new()),
            link_estimates: Mutex::new(HashMap::new()),
        }
    }

    /// Every worker now known.
    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn prefill(&self) -> Vec<Arc<Worker>> {
        self.of(WorkerRole::Prefill)
    }

    pub fn decode(&self) -> Vec<Arc<Worker>> {
        self.of(WorkerRole::Decode)
    }

    fn of(&self, role: WorkerRole) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|w| w.role == role)
            .cloned()
            .collect()
    }

    pub fn leave_after(&self) -> Duration {
        self.config.leave_after
    }

    /// Applies one membership change. Returns the refusal's label when it was one (for the
    /// caller's metric).
    pub fn apply(&self, change: Membership) -> Option<&'static str> {
        match change {
            Membership::Joined(member) | Membership::Changed(member) => {
                self.join(member);
                None
            }
            Membership::Left { id, source } => {
                self.leave(&id, source.as_str());
                None
            }
            Membership::Refused {
                from,
                source,
                reason,
            } => {
                let label = reason.label();
                let mut logged = self
                    .refusals_logged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if logged.len() < MAX_LOGGED_REFUSALS && logged.insert((from.clone(), label)) {
                    tracing::warn!(via = source.as_str(), %from, %reason, "advert ignored");
                }
                Some(label)
            }
        }
    }

    /// Adds `member`, or replaces the worker of its id when it moved (another address or
    /// role); the same advert again changes nothing.
    fn join(&self, member: Member) {
        let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = workers.iter().position(|w| w.key == member.id) {
            let old = &workers[i];
            if old.address == member.address
                && old.role == member.role
                && old.advert == member.advert
            {
                return;
            }
            let old = workers.remove(i);
            old.stop();
            self.unlink_worker(&old.key);
        }
        let id = member.id.clone();
        let source = member.source;
        let worker = match Worker::new(member, self.expected.clone(), self.config.tls.as_ref()) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                tracing::warn!(worker = %id, via = source.as_str(), error = %e, "worker not added");
                return;
            }
        };
        tracing::info!(worker = %worker.key, address = %worker.address, role = worker.role.as_str(), via = source.as_str(), "worker joined");
        let interval = self.config.poll_interval;
        let poll = tokio::spawn(worker.clone().poll_loop(
            interval,
            self.config.leave_after,
            self.config.events.clone(),
        ));
        let health = tokio::spawn(worker.clone().watch_health(interval));
        worker
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([poll.abort_handle(), health.abort_handle()]);
        workers.push(worker);
    }

    /// Removes worker `id`: its tasks end and its KV links are forgotten. Requests running
    /// there fail when their calls do.
    fn leave(&self, id: &baton_core::WorkerId, via: &str) {
        let removed = {
            let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
            workers
                .iter()
                .position(|w| &w.key == id)
                .map(|i| workers.remove(i))
        };
        if let Some(worker) = removed {
            worker.stop();
            self.unlink_worker(id);
            tracing::info!(worker = %id, address = %worker.address, role = worker.role.as_str(), via, "worker left");
            self.close_links_to(&worker);
        }
    }

    /// Tells the peers of a departed worker to close the KV links they opened to its agent
    /// (prefill workers dial decode workers' agents to push; decode workers dial prefill
    /// workers' to read pull sources). In the background, each call bounded; a peer that
    /// misses it finds the link broken on its next use, as before.
    fn close_links_to(&self, gone: &Worker) {
        let (Some(info), Ok(runtime)) = (gone.info(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let endpoints: Vec<v1::KvEndpoint> = info
            .kv_endpoints
            .iter()
            .map(|e| reachable(e, &gone.address))
            .collect();
        let peers: Vec<Arc<Worker>> = self
            .all()
            .into_iter()
            .filter(|w| w.role != gone.role)
            .collect();
        if endpoints.is_empty() || peers.is_empty() {
            return;
        }
        let gone = gone.key.clone();
        runtime.spawn(async move {
            for peer in peers {
                for endpoint in &endpoints {
                    let req = DisconnectRequest {
                        endpoint: Some(endpoint.clone()),
                    };
                    let call = async {
                        match peer.role {
                            WorkerRole::Prefill => peer.prefill_client().disconnect_peer(req).await,
                            WorkerRole::Decode => peer.decode_client().disconnect_peer(req).await,
                        }
                    };
                    match tokio::time::timeout(DISCONNECT_TIMEOUT, call).await {
                        Ok(Ok(r)) if r.get_ref().was_connected => {
                            tracing::info!(peer = %peer.key, left = %gone, endpoint = %endpoint.address, "kv link to a departed worker closed");
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(status)) => {
                            tracing::debug!(peer = %peer.key, left = %gone, error = %status.message(), "closing a kv link to a departed worker failed");
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer.key, left = %gone, "closing a kv link to a departed worker timed out");
                        }
                    }
                }
            }
        });
    }

    fn unlink_worker(&self, id: &baton_core::WorkerId) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(p, d), _| p != id && d != id);
    }

    /// The prefill workers and their placement view of `prompt`, index for index.
    pub fn prefill_candidates(
        &self,
        prompt: &[u32],
        names: &mut PromptNames,
    ) -> (Vec<Arc<Worker>>, Vec<Candidate>) {
        let workers = self.prefill();
        let candidates = workers
            .iter()
            .map(|w| w.candidate(0, prompt, names))
            .collect();
        (workers, candidates)
    }

    /// The decode workers and their placement view of `prompt`, index for index.
    pub fn decode_candidates(
        &self,
        needed_blocks: u32,
        prompt: &[u32],
        names: &mut PromptNames,
    ) -> (Vec<Arc<Worker>>, Vec<Candidate>) {
        let workers = self.decode();
        let candidates = workers
            .iter()
            .map(|w| w.candidate(needed_blocks, prompt, names))
            .collect();
        (workers, candidates)
    }

    /// Ready: at least one routable decode worker, and a routable prefill worker when any is
    /// known.
    pub fn ready(&self) -> bool {
        let workers = self.all();
        let any = |role| workers.iter().any(|w| w.role == role && w.routable());
        let has_prefill = workers.iter().any(|w| w.role == WorkerRole::Prefill);
        any(WorkerRole::Decode) && (!has_prefill || any(WorkerRole::Prefill))
    }

    /// Opens KV links for healthy pairs not linked yet, and forgets those of pairs where
    /// either side is unhealthy, refused or silent.
    pub async fn link_pairs(&self) {
        let workers = self.all();
        let usable = |w: &Arc<Worker>| w.healthy() && w.info().is_some() && w.refusal().is_none();
        for p in workers.iter().filter(|w| w.role == WorkerRole::Prefill) {
            for d in workers.iter().filter(|w| w.role == WorkerRole::Decode) {
                let pair = (p.key.clone(), d.key.clone());
                if !(usable(p) && usable(d)) {
                    self.links
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&pair);
                    continue;
                }
                if self
                    .links
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&pair)
                {
                    continue;
                }
                let Some(dinfo) = d.info() else { continue };
                let mut all_ok = true;
                let mut shm_ok = false;
                let p_host = p.host_id();
                let same_host = !p_host.is_empty() && p_host == d.host_id();
                for endpoint in &dinfo.kv_endpoints {
                    let shm = endpoint.transport == v1::Transport::Shm as i32;
                    // Shared memory between hosts that only share a file system (containers,
                    // network namespaces) would connect and be wrong: the host ids decide.
                    if shm && !same_host {
                        continue;
                    }
                    let req = ConnectRequest {
                        endpoint: Some(reachable(endpoint, &d.address)),
                        destination: dinfo.layout.clone(),
                    };
                    let result = p.prefill_client().connect_peer(req).await;
                    shm_ok |= shm && result.is_ok();
                    if let Err(status) = result {
                        // Shared memory only works on one host; TCP must.
                        if !shm {
                            all_ok = false;
                        }
                        tracing::warn!(prefill = %p.address, decode = %d.address, endpoint = %endpoint.address, error = %status.message(), "kv link not opened");
                    }
                }
                // The pair may have left while the calls ran: only a pair still known keeps
                // its link.
                let still_known = {
                    let now = self.workers.read().unwrap_or_else(|e| e.into_inner());
                    now.iter().any(|w| Arc::ptr_eq(w, p)) && now.iter().any(|w| Arc::ptr_eq(w, d))
                };
                if all_ok && still_known {
                    self.links
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(pair, shm_ok);
                    tracing::info!(prefill = %p.address, decode = %d.address, shm = shm_ok, "kv link open");
                }
            }
        }
    }

    /// What moving `lacking` prompt tokens' KV from `prefill` to `decode` is predicted to cost,
    /// against `decode` computing them: the pair's measured link, and the prefill rate measured
    /// on `prefill` (workers of one cluster run one model; the decode worker's own prefill is
    /// not measured apart).
    pub fn link_cost(&self, prefill: &Worker, decode: &Worker, lacking: usize) -> LinkCost {
        let pair = (prefill.id().0, decode.id().0);
        let transfer_s = self
            .link_estimates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pair)
            .and_then(|l| l.predict(lacking, std::time::Instant::now()));
        let prefill_s = prefill
            .prefill_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .predict(lacking);
        LinkCost {
            transfer_s,
            prefill_s,
        }
    }

    /// A finished handoff's transfer between the workers named `prefill` and `decode`.
    pub fn observe_transfer(
        &self,
        prefill: &str,
        decode: &str,
        bytes: u64,
        tokens: u32,
        transfer_s: f64,
        exposed_s: f64,
    ) {
        let mut estimates = self
            .link_estimates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Bounded by the pairs of workers ever seen; a pair whose worker left is dropped.
        if estimates.len() > 4096 {
            estimates.clear();
        }
        estimates
            .entry((prefill.to_string(), decode.to_string()))
            .or_default()
            .observe(
                bytes,
                tokens,
                transfer_s,
                exposed_s,
                std::time::Instant::now(),
            );
    }

    /// Every (prefill, decode) pair of known workers: whether its KV link is open (and shared
    /// memory), and the bandwidth its link-bound transfers measured.
    pub fn link_status(&self) -> Vec<v1::LinkStatus> {
        let workers = self.all();
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let estimates = self
            .link_estimates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        for p in workers.iter().filter(|w| w.role == WorkerRole::Prefill) {
            for d in workers.iter().filter(|w| w.role == WorkerRole::Decode) {
                let shm = links.get(&(p.key.clone(), d.key.clone())).copied();
                let bytes_per_second = estimates
                    .get(&(p.id().0, d.id().0))
                    .and_then(|e| e.bytes_per_s)
                    .filter(|(_, at)| {
                        now.saturating_duration_since(*at) <= crate::placement::LINK_MEMORY
                    })
                    .map(|(rate, _)| rate);
                out.push(v1::LinkStatus {
                    prefill_worker: p.id().0,
                    decode_worker: d.id().0,
                    open: shm.is_some(),
                    shm: shm.unwrap_or(false),
                    bytes_per_second,
                });
            }
        }
        out
    }

    /// Whether this prefill worker holds a shared-memory link to this decode worker.
    pub fn shm_linked(&self, prefill: &Worker, decode: &Worker) -> bool {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(prefill.key.clone(), decode.key.clone()))
            .copied()
            .unwrap_or(false)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for w in self.all() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{KvEvent, KvEventLog};
    use baton_proto::convert::kv_events_to_proto;
    use prost::Message;

    fn worker() -> Worker {
        let member = Member {
            id: baton_core::WorkerId::parse("127.0.0.1:1").expect("id"),
            role: baton_discovery::Role::Decode,
            address: "127.0.0.1:1".into(),
            advert: None,
            source: Source::Static,
        };
        let w = Worker::new(member, Arc::new(Mutex::new(None)), None).expect("worker");
        *w.info.lock().expect("info") = Some(WorkerInfo {
            worker_id: "decode-x".into(),
            total_blocks: 64,
            ..Default::default()
        });
        w
    }

    fn event(id: &str, epoch: u64, seq: u64, age_ms: u64, kv: baton_core::KvEvents) -> Vec<u8> {
        v1::WorkerEvent {
            worker_id: id.into(),
            epoch,
            seq,
            sent_ms: baton_discovery::advert::now_ms() - age_ms,
            load: Some(LoadReport {
                free_blocks: 60,
                total_blocks: 64,
                kv_events: Some(kv_events_to_proto(&kv)),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 16])
    }

    #[tokio::test]
    async fn a_worker_that_leaves_fails_the_streams_waiting_on_it() {
        let w = worker();
        let lost = w.lost();
        tokio::pin!(lost);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut lost)
                .await
                .is_err(),
            "not lost while it is a member"
        );
        w.stop();
        tokio::time::timeout(Duration::from_secs(1), lost)
            .await
            .expect("lost once it left");
    }

    proptest::proptest! {
        /// Whatever bytes a verified-but-confused publisher sends, applying them returns (never
        /// panics) and never admits a message of another worker.
        #[test]
        fn any_event_payload_applies_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let _guard = runtime.enter();
            let w = worker();
            let applied = w.apply_event(&bytes);
            if let Ok(event) = v1::WorkerEvent::decode(bytes.as_slice())
                && event.worker_id != "decode-x"
            {
                proptest::prop_assert!(matches!(applied, Applied::Stale));
            }
        }
    }

    #[tokio::test]
    async fn events_apply_in_order_and_a_gap_asks_for_a_resync() {
        let w = worker();
        let mut log = KvEventLog::new(7, 64);
        log.record([KvEvent::Stored(h(1))]);
        // The first message is the whole set (the publisher starts with no cursor).
        let first = event("decode-x", 7, 1, 0, log.since(u64::MAX, 0));
        assert!(matches!(w.apply_event(&first), Applied::Yes { gap: false }));
        assert_eq!(w.cached_blocks(), 1);
        assert_eq!(w.load().free_blocks, 60);
        assert!(w.healthy(), "an event is a sign of life");

        log.record([KvEvent::Stored(h(2))]);
        let second = event("decode-x", 7, 2, 0, log.since(7, 1));
        assert!(matches!(
            w.apply_event(&second),
            Applied::Yes { gap: false }
        ));
        assert_eq!(w.cached_blocks(), 2);

        // Messages 3 and 4 were dropped; 5 starts after this coordinator's cursor.
        log.record([KvEvent::Stored(h(3))]);
        log.record([KvEvent::Removed(h(1))]);
        log.record([KvEvent::Stored(h(4))]);
        let fifth = event("decode-x", 7, 5, 0, log.since(7, 4));
        assert!(matches!(w.apply_event(&fifth), Applied::NeedsResync));
        assert_eq!(w.cached_blocks(), 2, "nothing applied past a gap");
        // The resync: the worker's answer to this coordinator's cursor.
        let (e, c) = w.kv_index.lock().expect("index").cursor();
        w.apply_kv_events(Some(kv_events_to_proto(&log.since(e, c))), 64);
        assert_eq!(w.cached_blocks(), 3);

        // Already seen, another worker's, or a minute old: ignored.
        assert!(matches!(w.apply_event(&second), Applied::Stale));
        let other = event("decode-y", 7, 6, 0, log.since(7, 5));
        assert!(matches!(w.apply_event(&other), Applied::Stale));
        let old = event("decode-x", 7, 7, 120_000, log.since(7, 5));
        assert!(matches!(w.apply_event(&old), Applied::Stale));
        assert!(matches!(
            w.apply_event(b"\xff\xff not a message"),
            Applied::Stale
        ));

        // A restart: another epoch, and its first message is the whole new set.
        let mut restarted = KvEventLog::new(8, 64);
        restarted.record([KvEvent::Stored(h(9))]);
        let fresh = event("decode-x", 8, 1, 0, restarted.since(u64::MAX, 0));
        assert!(matches!(w.apply_event(&fresh), Applied::Yes { .. }));
        assert_eq!(w.cached_blocks(), 1);
    }
}

//! The workers the coordinator routes to: their clients, what they said about themselves
//! (`Info`), their last load report, and health. A poll task refreshes load; a worker that does
//! not answer is unhealthy until it does. When a prefill and a decode worker are both known, the
//! prefill worker is told to open its KV connection to the decode worker then, not on the first
//! request.
//!
//! A worker that starts draining (SIGTERM) turns its grpc.health.v1 status to NOT_SERVING; a
//! health watch per worker sees that at once and placement skips the worker from then on.
//!
//! Workers come from a static list here; discovery (mDNS, etcd) will feed the same registry.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::{BlockHash, Fingerprint, KvIndex, block_hashes, reusable_blocks};
use baton_proto::v1::{
    self, ConnectRequest, InfoRequest, LoadReport, LoadRequest, WorkerInfo,
    decode_worker_client::DecodeWorkerClient, prefill_worker_client::PrefillWorkerClient,
};
use baton_telemetry::TraceContext;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::error::{Error, Result};
use crate::placement::Candidate;

/// A worker's name: its configured gRPC address until it reports its own id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerId(pub String);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerRole {
    Prefill,
    Decode,
}

impl WorkerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerRole::Prefill => "prefill",
            WorkerRole::Decode => "decode",
        }
    }
}

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
    pub role: WorkerRole,
    pub address: String,
    channel: Channel,
    info: Mutex<Option<WorkerInfo>>,
    load: Mutex<LoadReport>,
    healthy: AtomicBool,
    /// The worker said it is draining (health NOT_SERVING, or its load report): no new work.
    draining: AtomicBool,
    /// Requests placed here and not finished.
    placed: AtomicU32,
    /// Their prompt tokens still to compute (prefill workers: until the first token).
    placed_tokens: AtomicU64,
    /// The blocks its prefix cache holds, from the KV events of its load reports.
    kv_index: Mutex<KvIndex>,
}

impl Worker {
    fn new(role: WorkerRole, address: &str) -> Result<Self> {
        let channel = Channel::from_shared(format!("http://{address}"))
            .map_err(|e| Error::InvalidConfig {
                field: match role {
                    WorkerRole::Prefill => "prefill_workers",
                    WorkerRole::Decode => "decode_workers",
                },
                reason: format!("{address:?}: {e}"),
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            role,
            address: address.to_string(),
            channel,
            info: Mutex::new(None),
            load: Mutex::new(LoadReport::default()),
            healthy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            placed: AtomicU32::new(0),
            placed_tokens: AtomicU64::new(0),
            kv_index: Mutex::new(KvIndex::default()),
        })
    }

    pub fn id(&self) -> WorkerId {
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

    /// Healthy and not draining: new requests may be placed here.
    pub fn routable(&self) -> bool {
        self.healthy() && !self.draining.load(Ordering::Relaxed)
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

    /// Follows the worker's grpc.health.v1 status until `stop`: NOT_SERVING marks it draining
    /// the moment the worker says so, without waiting for the next load poll. A broken watch is
    /// opened again after `retry`.
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
                tracing::info!(worker = %info.worker_id, address = %self.address, role = self.role.as_str(), "worker joined");
                *self.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
            }
            let (epoch, after) = self.kv_index.lock().unwrap_or_else(|p| p.into_inner()).cursor();
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
        }
        .await;
        match result {
            Ok(()) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(worker = %self.address, role = self.role.as_str(), "worker healthy");
                }
                true
            }
            Err(status) => {
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

impl Worker {
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

impl Drop for Placed {
    fn drop(&mut self) {
        self.0.placed.fetch_sub(1, Ordering::Relaxed);
        self.0.placed_tokens.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Every worker, by role.
pub struct Registry {
    pub prefill: Vec<Arc<Worker>>,
    pub decode: Vec<Arc<Worker>>,
    /// (prefill index, decode index) pairs whose KV link is open.
    linked: Mutex<HashSet<(usize, usize)>>,
    /// Pairs that also opened a shared-memory link (same host).
    shm: Mutex<HashSet<(usize, usize)>>,
}

impl Registry {
    pub fn new(prefill: &[String], decode: &[String]) -> Result<Self> {
        Ok(Self {
            prefill: prefill
                .iter()
                .map(|a| Worker::new(WorkerRole::Prefill, a).map(Arc::new))
                .collect::<Result<_>>()?,
            decode: decode
                .iter()
                .map(|a| Worker::new(WorkerRole::Decode, a).map(Arc::new))
                .collect::<Result<_>>()?,
            linked: Mutex::new(HashSet::new()),
            shm: Mutex::new(HashSet::new()),
        })
    }

    pub fn prefill_candidates(&self, prompt: &[u32], names: &mut PromptNames) -> Vec<Candidate> {
        self.prefill
            .iter()
            .map(|w| w.candidate(0, prompt, names))
            .collect()
    }

    pub fn decode_candidates(
        &self,
        needed_blocks: u32,
        prompt: &[u32],
        names: &mut PromptNames,
    ) -> Vec<Candidate> {
        self.decode
            .iter()
            .map(|w| w.candidate(needed_blocks, prompt, names))
            .collect()
    }

    /// Ready: at least one healthy decode worker, and a healthy prefill worker when any is
    /// configured.
    pub fn ready(&self) -> bool {
        let any = |ws: &[Arc<Worker>]| ws.iter().any(|w| w.routable());
        any(&self.decode) && (self.prefill.is_empty() || any(&self.prefill))
    }

    /// Polls every worker once, then opens KV links for new healthy pairs.
    pub async fn poll_all(&self) {
        let all: Vec<&Arc<Worker>> = self.prefill.iter().chain(&self.decode).collect();
        futures::future::join_all(all.iter().map(|w| w.poll())).await;
        self.link_pairs().await;
    }

    async fn link_pairs(&self) {
        for (pi, p) in self.prefill.iter().enumerate() {
            for (di, d) in self.decode.iter().enumerate() {
                let (Some(_), Some(dinfo)) = (p.info(), d.info()) else {
                    self.unlink(pi, di);
                    continue;
                };
                if !(p.healthy() && d.healthy()) {
                    self.unlink(pi, di);
                    continue;
                }
                if self
                    .linked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&(pi, di))
                {
                    continue;
                }
                let mut all_ok = true;
                let mut shm_ok = false;
                for endpoint in &dinfo.kv_endpoints {
                    let req = ConnectRequest {
                        endpoint: Some(endpoint.clone()),
                        destination: dinfo.layout.clone(),
                    };
                    let shm = endpoint.transport == v1::Transport::Shm as i32;
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
                if all_ok {
                    self.linked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((pi, di));
                    if shm_ok {
                        self.shm
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((pi, di));
                    }
                    tracing::info!(prefill = %p.address, decode = %d.address, shm = shm_ok, "kv link open");
                }
            }
        }
    }

    fn unlink(&self, pi: usize, di: usize) {
        for set in [&self.linked, &self.shm] {
            set.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(pi, di));
        }
    }

    /// Whether this prefill worker holds a shared-memory link to this decode worker.
    pub fn shm_linked(&self, prefill: &Arc<Worker>, decode: &Arc<Worker>) -> bool {
        let pi = self.prefill.iter().position(|w| Arc::ptr_eq(w, prefill));
        let di = self.decode.iter().position(|w| Arc::ptr_eq(w, decode));
        pi.zip(di).is_some_and(|pair| {
            self.shm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&pair)
        })
    }
}

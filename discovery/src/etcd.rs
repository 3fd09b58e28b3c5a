//! The etcd backend (`etcd-client`): each worker puts its signed advert under
//! `/baton/<cluster>/workers/<worker_id>`, attached to a lease it keeps alive; a coordinator
//! lists the prefix, then watches it, and admits the adverts that verify under the cluster key.
//!
//! worker --put under lease, keep-alive--> etcd --list, then watch from revision+1--> coordinator
//!
//! A key's value is the advert's pairs as `key=value\n` lines (see [`crate::advert`]). Under
//! etcd nothing resolves addresses, so an advert names the host to dial ([`Advert::host`]).
//!
//! Invariants:
//! - the keep-alive runs on its own OS thread and current-thread runtime, so an engine that
//!   keeps the worker's runtime busy cannot let the lease lapse; a lost lease (expired, or
//!   forgotten by an etcd that lost its data) is granted again and the key put again;
//! - a worker that dies leaves when its lease expires (etcd deletes the key: a watch event);
//!   a withdrawal revokes the lease, so a draining worker leaves at once;
//! - the watch never misses a change: it resumes after the last revision it saw, and where
//!   etcd cannot replay from there (compacted, or its history went back) it lists the prefix
//!   again and reports who vanished meanwhile;
//! - a key's value is refused (a [`Membership::Refused`], once per key and value) unless it is
//!   at most [`MAX_VALUE_BYTES`] of UTF-8 `key=value` lines holding a verifying advert of the
//!   worker the key names; nothing read from etcd panics;
//! - connection failures are retried with bounded backoff for as long as the [`Members`] or
//!   [`Announcement`] lives; only a malformed endpoint list is an error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::time::Duration;

use baton_core::WorkerId;
use etcd_client::{
    Client, ConnectOptions, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

use crate::advert::{Advert, ClusterKey, now_ms};
use crate::backend::{Announcement, Backend, BoxFuture, Members, TaskGuard, WATCH_QUEUE};
use crate::config::EtcdConfig;
use crate::error::{Error, Refusal, Result};
use crate::membership::{Member, MemberSet, Membership, Source};

/// Largest value a reader parses; an advert's pairs take a few hundred bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Bound on each unary call (grant, put, get, revoke, opening a stream): a call to an etcd
/// that does not answer fails and is retried rather than hanging the task.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on establishing a TCP connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 pings on open streams, so a watch on a silently dead connection fails instead of
/// waiting forever. etcd sends GOAWAY to clients that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`).
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait after a failure, doubled per consecutive failure up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// How long a withdrawal waits for etcd to revoke the lease; past it the lease expires by
/// itself.
const REVOKE_WAIT: Duration = Duration::from_secs(1);

/// Most refused keys remembered (so each is reported once); past it the memory is cleared
/// rather than grown.
const MAX_REMEMBERED_REFUSALS: usize = 1024;

/// Where a cluster's workers live in etcd.
pub fn prefix(cluster: &str) -> String {
    format!("/baton/{cluster}/workers/")
}

/// A worker's key.
pub fn worker_key(cluster: &str, id: &WorkerId) -> String {
    format!("{}{id}", prefix(cluster))
}

pub struct EtcdBackend {
    cluster: String,
    key: ClusterKey,
    config: EtcdConfig,
}

impl EtcdBackend {
    /// Nothing connects until [`Backend::watch`] or [`Backend::announce`].
    pub fn new(cluster: String, key: ClusterKey, config: EtcdConfig) -> Self {
        Self {
            cluster,
            key,
            config,
        }
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn watch(&self) -> BoxFuture<'_, Result<Members>> {
        Box::pin(async move {
            // Connecting is lazy: this fails only on a malformed endpoint list.
            let client = connect(&self.config.endpoints).await?;
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let watcher = Watcher {
                endpoints: self.config.endpoints.clone(),
                prefix: prefix(&self.cluster),
                reader: Reader::new(self.cluster.clone(), self.key.clone()),
                tx,
                resume: None,
                backoff: Backoff::default(),
            };
            let task = tokio::spawn(watcher.run(client));
            Ok(Members::new(rx, TaskGuard(task)))
        })
    }

    fn announce(&self, advert: Advert) -> BoxFuture<'_, Result<Announcement>> {
        Box::pin(async move {
            if advert.cluster != self.cluster {
                return Err(Error::InvalidConfig {
                    field: "discovery.cluster",
                    reason: format!(
                        "the advert names cluster {:?}, the backend serves {:?}",
                        advert.cluster, self.cluster
                    ),
                });
            }
            let Some(host) = &advert.host else {
                return Err(Error::InvalidConfig {
                    field: "discovery.advertise_host",
                    reason: "under etcd an advert names the host coordinators dial: set \
                             advertise_host, or listen on a specific address"
                        .into(),
                });
            };
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(Error::InvalidConfig {
                    field: "discovery.advertise_host",
                    reason: format!("{host:?} is not a host name or address"),
                });
            }
            let value = encode(&advert.to_pairs(&self.key)).map_err(|reason| Error::Backend {
                backend: "etcd",
                reason,
            })?;
            let lease = LeaseHolder {
                endpoints: self.config.endpoints.clone(),
                key: worker_key(&self.cluster, &advert.worker_id),
                value,
                ttl: self.config.lease_ttl,
            };
            let (stop_tx, stop_rx) = mpsc::channel(1);
            let (first_tx, first_rx) = oneshot::channel();
            let key = lease.key.clone();
            std::thread::Builder::new()
                .name("baton-etcd-lease".into())
                .spawn(move || lease.run_on_own_runtime(stop_rx, first_tx))
                .map_err(|e| Error::Backend {
                    backend: "etcd",
                    reason: format!("starting the lease thread: {e}"),
                })?;
            // The first attempt is bounded by its calls' timeouts; a failed one goes on retrying.
            match first_rx.await {
                Ok(Ok(())) => {
                    tracing::info!(worker = %advert.worker_id, %key, "announced in etcd");
                }
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Retry(reason))) => {
                    tracing::warn!(
                        worker = %advert.worker_id, %key, %reason,
                        "etcd did not take the advert yet; retrying in the background"
                    );
                }
                Err(_) => {
                    return Err(Error::Backend {
                        backend: "etcd",
                        reason: "the lease thread stopped".into(),
                    });
                }
            }
            let withdraw_stop = stop_tx.clone();
            let withdraw: BoxFuture<'static, ()> = Box::pin(async move {
                let (done_tx, done_rx) = oneshot::channel();
                if withdraw_stop.send(done_tx).await.is_ok() {
                    // The thread bounds the revoke by REVOKE_WAIT; the margin covers its hop.
                    let _ = timeout(REVOKE_WAIT + Duration::from_millis(500), done_rx).await;
                }
            });
            // Dropping every sender stops the thread without a revoke.
            Ok(Announcement::new(Some(withdraw), stop_tx))
        })
    }
}

/// Whether a failure is worth retrying.
enum Attempt {
    Retry(String),
    Fatal(Error),
}

impl From<etcd_client::Error> for Attempt {
    fn from(e: etcd_client::Error) -> Self {
        Attempt::Retry(e.to_string())
    }
}

/// A client for `endpoints`. It connects on first use, so the only failures here are a
/// malformed endpoint list.
async fn connect(endpoints: &[String]) -> Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(PING_INTERVAL, PING_TIMEOUT);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| Error::InvalidConfig {
            field: "discovery.etcd.endpoints",
            reason: e.to_string(),
        })
}

/// Runs `call` under [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> std::result::Result<T, Attempt> {
    match timeout(REQUEST_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| Attempt::Retry(format!("{what}: {e}"))),
        Err(_) => Err(Attempt::Retry(format!(
            "{what}: no answer in {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// Retry delays after consecutive failures.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        wait
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }

    /// Whether the last attempt failed too (repeated failures log quietly).
    fn failing(&self) -> bool {
        self.next > FIRST_RETRY
    }
}

/// A worker's side: keeps one key under a live lease until stopped.
struct LeaseHolder {
    endpoints: Vec<String>,
    key: String,
    value: String,
    ttl: Duration,
}

/// What the lease thread knows across reconnections.
#[derive(Default)]
struct LeaseState {
    /// Kept across failures (its channel reconnects by itself), so a withdrawal revokes over
    /// the connection that is up rather than dialling first.
    client: Option<Client>,
    /// The lease the key was last put under; kept across reconnections, since etcd keeps it
    /// alive for a TTL without us (and across its restarts).
    lease: Option<i64>,
    first: Option<oneshot::Sender<std::result::Result<(), Attempt>>>,
    backoff: Backoff,
}

impl LeaseHolder {
    /// The thread's body: a runtime of its own, until a withdrawal (a message: revoke, then
    /// answer) or the announcement's drop (the channel closes: stop, and let the lease expire).
    fn run_on_own_runtime(
        self,
        stop: mpsc::Receiver<oneshot::Sender<()>>,
        first: oneshot::Sender<std::result::Result<(), Attempt>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = first.send(Err(Attempt::Fatal(Error::Backend {
                    backend: "etcd",
                    reason: format!("starting the lease runtime: {e}"),
                })));
                return;
            }
        };
        runtime.block_on(self.run(stop, first));
    }

    async fn run(
        self,
        mut stop: mpsc::Receiver<oneshot::Sender<()>>,
        first: oneshot::Sender<std::result::Result<(), Attempt>>,
    ) {
        let mut state = LeaseState {
            first: Some(first),
            ..LeaseState::default()
        };
        let withdrawn = loop {
            let failure = tokio::select! {
                withdrawn = stop.recv() => break withdrawn,
                failure = self.hold(&mut state) => failure,
            };
            let reason = match failure {
                Attempt::Fatal(e) => {
                    if let Some(first) = state.first.take() {
                        let _ = first.send(Err(Attempt::Fatal(e)));
                    } else {
                        tracing::error!(key = %self.key, error = %e, "etcd announcement stopped");
                    }
                    return;
                }
                Attempt::Retry(reason) => reason,
            };
            if let Some(first) = state.first.take() {
                let _ = first.send(Err(Attempt::Retry(reason)));
            } else if state.backoff.failing() {
                tracing::debug!(key = %self.key, %reason, "etcd still unreachable");
            } else {
                tracing::warn!(key = %self.key, %reason, "etcd announcement interrupted; retrying");
            }
            tokio::select! {
                withdrawn = stop.recv() => break withdrawn,
                () = tokio::time::sleep(state.backoff.next()) => {}
            }
        };
        if let Some(done) = withdrawn {
            if let (Some(mut client), Some(lease)) = (state.client.take(), state.lease) {
                match timeout(REVOKE_WAIT, client.lease_revoke(lease)).await {
                    Ok(Ok(_)) => tracing::info!(key = %self.key, "withdrawn from etcd"),
                    Ok(Err(e)) => {
                        tracing::warn!(
                            key = %self.key, error = %e,
                            "lease revoke failed; it expires by itself"
                        );
                    }
                    Err(_) => {
                        tracing::warn!(
                            key = %self.key,
                            "lease revoke timed out; it expires by itself"
                        );
                    }
                }
            }
            let _ = done.send(());
        }
    }

    /// Connects, makes sure the key stands under a live lease, then keeps the lease alive
    /// until something breaks; returns why.
    async fn hold(&self, state: &mut LeaseState) -> Attempt {
        match self.hold_until_broken(state).await {
            Ok(never) => match never {},
            Err(failure) => failure,
        }
    }

    async fn hold_until_broken(
        &self,
        state: &mut LeaseState,
    ) -> std::result::Result<std::convert::Infallible, Attempt> {
        let client = match state.client.clone() {
            Some(client) => client,
            None => connect(&self.endpoints).await.map_err(Attempt::Fatal)?,
        };
        state.client = Some(client.clone());
        let mut client = client;
        let (lease, ttl, mut keeper, mut answers) = self.attach(&mut client, state).await?;
        bounded(
            "put",
            client.put(
                self.key.as_bytes(),
                self.value.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        if let Some(first) = state.first.take() {
            let _ = first.send(Ok(()));
        } else {
            tracing::info!(key = %self.key, lease, "advert back in etcd");
        }
        state.backoff.reset();

        let interval = ttl / 3;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    // Two intervals without an answer: the connection is gone even if the
                    // stream has not noticed. The lease may live on: `attach` tries it first.
                    if answered.elapsed() > interval * 2 {
                        return Err(Attempt::Retry(format!(
                            "no keep-alive answer in {:?}",
                            answered.elapsed()
                        )));
                    }
                    keeper.keep_alive().await?;
                }
                answer = answers.message() => match answer? {
                    Some(answer) if answer.ttl() > 0 => answered = Instant::now(),
                    Some(_) => {
                        tracing::warn!(
                            key = %self.key, lease,
                            "etcd lease expired; granting a new one"
                        );
                        state.lease = None;
                        return Err(Attempt::Retry("the lease expired".into()));
                    }
                    None => return Err(Attempt::Retry("keep-alive stream closed".into())),
                },
            }
        }
    }

    /// The lease to put the key under, its TTL, and its keep-alive stream: the lease held
    /// before where etcd still has it, else a new one.
    async fn attach(
        &self,
        client: &mut Client,
        state: &mut LeaseState,
    ) -> std::result::Result<(i64, Duration, LeaseKeeper, LeaseKeepAliveStream), Attempt> {
        if let Some(lease) = state.lease {
            match timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease)).await {
                Ok(Ok((keeper, answers))) => return Ok((lease, self.ttl, keeper, answers)),
                // etcd answers TTL 0 for a lease it does not have: expired while we were
                // away, or lost with etcd's data.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    tracing::warn!(key = %self.key, lease, "etcd lease lost; granting a new one");
                    state.lease = None;
                }
                Ok(Err(e)) => return Err(Attempt::Retry(format!("keep-alive: {e}"))),
                Err(_) => {
                    return Err(Attempt::Retry(format!(
                        "keep-alive: no answer in {REQUEST_TIMEOUT:?}"
                    )));
                }
            }
        }
        let ttl_secs = self.ttl.as_secs_f64().ceil().max(1.0) as i64;
        let grant = bounded("lease grant", client.lease_grant(ttl_secs, None)).await?;
        let lease = grant.id();
        state.lease = Some(lease);
        // etcd may grant another TTL than asked (it raises ones below its minimum).
        let ttl = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0).max(1));
        let (keeper, answers) = bounded("keep-alive", client.lease_keep_alive(lease)).await?;
        Ok((lease, ttl, keeper, answers))
    }
}

/// A coordinator's side: the task behind [`Members`].
struct Watcher {
    endpoints: Vec<String>,
    prefix: String,
    reader: Reader,
    tx: mpsc::Sender<Membership>,
    /// The revision to watch from: one past the last seen; `None` until a listing (again).
    resume: Option<i64>,
    backoff: Backoff,
}

/// Why a watch session ended.
enum Ended {
    /// The [`Members`] is gone: stop.
    ReaderGone,
    /// Connection, stream or etcd trouble: reconnect after a backoff.
    Broken(String),
}

impl From<etcd_client::Error> for Ended {
    fn from(e: etcd_client::Error) -> Self {
        Ended::Broken(e.to_string())
    }
}

impl From<Attempt> for Ended {
    fn from(a: Attempt) -> Self {
        match a {
            Attempt::Retry(reason) => Ended::Broken(reason),
            Attempt::Fatal(e) => Ended::Broken(e.to_string()),
        }
    }
}

impl Watcher {
    async fn run(mut self, first: Client) {
        let mut client = Some(first);
        loop {
            let client = match client.take() {
                Some(client) => client,
                // A fresh client per session: nothing of a broken connection carries over.
                None => match connect(&self.endpoints).await {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::error!(error = %e, "etcd watch stopped");
                        return;
                    }
                },
            };
            let reason = match self.session(client).await {
                Ended::ReaderGone => return,
                Ended::Broken(reason) => reason,
            };
            if self.backoff.failing() {
                tracing::debug!(%reason, "etcd still unreachable");
            } else {
                tracing::warn!(%reason, "etcd watch broken; resuming");
            }
            tokio::time::sleep(self.backoff.next()).await;
        }
    }

    /// Lists (where needed) and watches over one connection until it breaks.
    async fn session(&mut self, mut client: Client) -> Ended {
        loop {
            let from = match self.resume {
                Some(from) => from,
                None => match self.list(&mut client).await {
                    Ok(revision) => revision + 1,
                    Err(ended) => return ended,
                },
            };
            self.resume = Some(from);
            if let Err(ended) = self.follow(&mut client, from).await {
                return ended;
            }
            // `follow` returned: etcd cannot replay from `from`; list again.
            self.resume = None;
        }
    }

    /// A full listing: every member present joins (or changes), the vanished leave. Returns
    /// the listing's revision.
    async fn list(&mut self, client: &mut Client) -> std::result::Result<i64, Ended> {
        let listing = bounded(
            "listing",
            client.get(
                self.prefix.as_bytes(),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        let revision = listing
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| Ended::Broken("a listing without a header".into()))?;
        let kvs: Vec<(&[u8], &[u8])> = listing
            .kvs()
            .iter()
            .map(|kv| (kv.key(), kv.value()))
            .collect();
        let changes = self.reader.resync(&kvs);
        self.backoff.reset();
        self.send(changes).await?;
        Ok(revision)
    }

    /// Follows changes from revision `from`; `Ok` where etcd cannot replay from there.
    async fn follow(&mut self, client: &mut Client, from: i64) -> std::result::Result<(), Ended> {
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream =
            bounded("watch", client.watch(self.prefix.as_bytes(), Some(options))).await?;
        loop {
            let Some(response) = stream.message().await? else {
                return Err(Ended::Broken("watch stream closed".into()));
            };
            if response.compact_revision() > 0 {
                tracing::info!(
                    from,
                    compacted_to = response.compact_revision(),
                    "etcd compacted past the watch; listing again"
                );
                return Ok(());
            }
            if response.canceled() {
                tracing::info!(
                    reason = response.cancel_reason(),
                    "etcd cancelled the watch; listing again"
                );
                return Ok(());
            }
            if response.created() {
                self.backoff.reset();
                // A store behind what we saw lost its history (restored, or wiped): the
                // revisions we would resume from mean other writes there.
                if let Some(header) = response.header()
                    && header.revision() + 1 < from
                {
                    tracing::warn!(
                        from,
                        etcd_revision = header.revision(),
                        "etcd's revision went back; listing again"
                    );
                    return Ok(());
                }
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let changes = self.reader.event(kv);
                self.resume = Some(self.resume.unwrap_or(0).max(kv.mod_revision() + 1));
                self.send(changes).await?;
            }
        }
    }

    async fn send(&self, changes: Vec<Membership>) -> std::result::Result<(), Ended> {
        for change in changes {
            if self.tx.send(change).await.is_err() {
                return Err(Ended::ReaderGone);
            }
        }
        Ok(())
    }
}

/// A coordinator's reading of the keys under the prefix (pure but for the time).
struct Reader {
    cluster: String,
    key: ClusterKey,
    prefix: String,
    set: MemberSet,
    /// etcd key -> the worker its value advertised.
    names: HashMap<String, WorkerId>,
    /// etcd key -> a digest of the value refused there, so a value is reported once.
    refused: HashMap<String, blake3::Hash>,
}

impl Reader {
    fn new(cluster: String, key: ClusterKey) -> Self {
        Self {
            prefix: prefix(&cluster),
            cluster,
            key,
            set: MemberSet::default(),
            names: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    /// A watch event. etcd marks a deletion (lease expiry included) by a key without a
    /// creation revision, the rule its own watchable store applies to choose the event type;
    /// reading it here avoids `Event::event_type`, which panics on a type it does not know.
    fn event(&mut self, kv: &KeyValue) -> Vec<Membership> {
        if kv.create_revision() == 0 {
            self.delete(kv.key())
        } else {
            self.put(kv.key(), kv.value())
        }
    }

    /// A key now holds `value`.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Vec<Membership> {
        let key = String::from_utf8_lossy(key).into_owned();
        let digest = blake3::hash(value);
        match self.admit(&key, value) {
            Ok(member) => {
                let id = member.id.clone();
                match self.set.observe(member) {
                    // An older advert of the worker put over a newer one: the newer stands.
                    Some(Membership::Refused { reason, .. }) => {
                        self.refuse(&key, digest, reason).into_iter().collect()
                    }
                    change => {
                        self.refused.remove(&key);
                        self.names.insert(key, id);
                        change.into_iter().collect()
                    }
                }
            }
            // What the key held before is gone: its member leaves.
            Err(reason) => {
                let left = self.names.remove(&key).and_then(|id| self.set.forget(&id));
                left.into_iter()
                    .chain(self.refuse(&key, digest, reason))
                    .collect()
            }
        }
    }

    fn delete(&mut self, key: &[u8]) -> Vec<Membership> {
        let key = String::from_utf8_lossy(key);
        self.refused.remove(key.as_ref());
        self.names
            .remove(key.as_ref())
            .and_then(|id| self.set.forget(&id))
            .into_iter()
            .collect()
    }

    /// A full listing of the prefix: the keys in it are read again, the members of keys not
    /// in it leave.
    fn resync(&mut self, kvs: &[(&[u8], &[u8])]) -> Vec<Membership> {
        let listed: HashSet<String> = kvs
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        self.names.retain(|k, _| listed.contains(k));
        self.refused.retain(|k, _| listed.contains(k));
        let mut changes: Vec<Membership> = kvs.iter().flat_map(|(k, v)| self.put(k, v)).collect();
        let present: Vec<WorkerId> = self.names.values().cloned().collect();
        changes.extend(self.set.retain_only(&present));
        changes
    }

    /// A refusal to report, unless this key's value was refused already.
    fn refuse(&mut self, key: &str, digest: blake3::Hash, reason: Refusal) -> Option<Membership> {
        if self.refused.get(key) == Some(&digest) {
            return None;
        }
        if self.refused.len() >= MAX_REMEMBERED_REFUSALS {
            self.refused.clear();
        }
        self.refused.insert(key.to_string(), digest);
        Some(Membership::Refused {
            from: key.to_string(),
            source: Source::Etcd,
            reason,
        })
    }

    /// The member a key's value describes.
    fn admit(&self, key: &str, value: &[u8]) -> std::result::Result<Member, Refusal> {
        let pairs = decode(value)?;
        let advert = Advert::from_pairs(&pairs, &self.key, &self.cluster)?;
        if advert.from_the_future(now_ms()) {
            return Err(Refusal::FromTheFuture);
        }
        let named = key.strip_prefix(&self.prefix).unwrap_or(key);
        if advert.worker_id.to_string() != named {
            return Err(Refusal::Malformed(format!(
                "the key names worker {named:?}, its advert {:?}",
                advert.worker_id.to_string()
            )));
        }
        let Some(host) = &advert.host else {
            return Err(Refusal::Malformed(
                "no host to dial (field \"a\"), which etcd adverts need".into(),
            ));
        };
        Ok(Member {
            id: advert.worker_id.clone(),
            role: advert.role,
            address: dial_address(host, advert.grpc_port),
            advert: Some(advert),
            source: Source::Etcd,
        })
    }
}

/// `host:port`, with an IPv6 literal in brackets.
fn dial_address(host: &str, port: u16) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An advert's pairs as a key's value: `key=value\n` lines.
fn encode(pairs: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let mut value = String::with_capacity(512);
    for (k, v) in pairs {
        if k.is_empty() || k.contains(['=', '\n']) || v.contains('\n') {
            return Err(format!("advert field {k:?} does not fit a key=value line"));
        }
        value.push_str(k);
        value.push('=');
        value.push_str(v);
        value.push('\n');
    }
    Ok(value)
}

/// A key's value as pairs: at most [`MAX_VALUE_BYTES`] of UTF-8 `key=value` lines (the last
/// newline optional), no key twice.
fn decode(value: &[u8]) -> std::result::Result<BTreeMap<String, String>, Refusal> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Refusal::Malformed(format!(
            "a value of {} bytes, over the {MAX_VALUE_BYTES} limit",
            value.len()
        )));
    }
    let text =
        std::str::from_utf8(value).map_err(|e| Refusal::Malformed(format!("not UTF-8: {e}")))?;
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut pairs = BTreeMap::new();
    for line in body.split('\n') {
        let Some((k, v)) = line.split_once('=') else {
            return Err(Refusal::Malformed("a line without '='".into()));
        };
        if pairs.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Refusal::Malformed(format!("field {k:?} twice")));
        }
    }
    Ok(pairs)
}

/// The watcher's reading of raw keys and values, public only for the fuzz targets in `fuzz/`;
/// not part of the crate's API.
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::BTreeMap;

    use super::Reader;
    use crate::advert::{ClusterKey, sign_pairs};
    use crate::membership::Membership;

    /// A watcher's reader of `cluster`'s prefix, without a connection.
    pub struct EtcdReader(Reader);

    impl EtcdReader {
        pub fn new(cluster: &str, key: ClusterKey) -> Self {
            Self(Reader::new(cluster.to_string(), key))
        }

        /// The key at `key` now holds `value`.
        pub fn put(&mut self, key: &[u8], value: &[u8]) -> Vec<Membership> {
            self.0.put(key, value)
        }

        /// The key at `key` was deleted (or its lease expired).
        pub fn delete(&mut self, key: &[u8]) -> Vec<Membership> {
            self.0.delete(key)
        }

        /// A full listing of the prefix.
        pub fn resync(&mut self, kvs: &[(&[u8], &[u8])]) -> Vec<Membership> {
            self.0.resync(kvs)
        }
    }

    /// `value`'s pairs signed again under `key`, as a worker holding the key would write
    /// them; `None` when `value` is not a value's pairs or they fit no value.
    pub fn resign(value: &[u8], key: &ClusterKey) -> Option<Vec<u8>> {
        let mut pairs: BTreeMap<String, String> = super::decode(value).ok()?;
        sign_pairs(&mut pairs, key);
        super::encode(&pairs).ok().map(String::into_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::Role;
    use baton_core::Fingerprint;
    use proptest::prelude::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef-secret").expect("key")
    }

    fn advert(id: &str, issued_ms: u64) -> Advert {
        Advert {
            cluster: "lab".into(),
            worker_id: WorkerId::parse(id).expect("id"),
            role: Role::Prefill,
            fingerprint: Fingerprint([3; 32]),
            host_id: "host-a".into(),
            grpc_port: 7000,
            event_port: 7001,
            host: Some("10.0.0.2".into()),
            issued_ms,
        }
    }

    fn value(advert: &Advert) -> Vec<u8> {
        encode(&advert.to_pairs(&key()))
            .expect("encode")
            .into_bytes()
    }

    fn key_of(id: &str) -> Vec<u8> {
        worker_key("lab", &WorkerId::parse(id).expect("id")).into_bytes()
    }

    fn reader() -> Reader {
        Reader::new("lab".into(), key())
    }

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let pairs = advert("a", 1).to_pairs(&key());
        assert_eq!(
            decode(encode(&pairs).expect("encode").as_bytes()),
            Ok(pairs)
        );
        for bad in [
            &b""[..],
            b"no equals sign\n",
            b"a=1\na=2\n",
            b"a=1\n\nb=2\n",
            b"\xff\xfe=1\n",
        ] {
            assert!(matches!(decode(bad), Err(Refusal::Malformed(_))), "{bad:?}");
        }
        let huge = vec![b'x'; MAX_VALUE_BYTES + 1];
        assert!(matches!(decode(&huge), Err(Refusal::Malformed(m)) if m.contains("limit")));
        let mut with_break = advert("a", 1).to_pairs(&key());
        with_break.insert("h".into(), "two\nlines".into());
        assert!(encode(&with_break).is_err());
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(dial_address("10.0.0.2", 7000), "10.0.0.2:7000");
        assert_eq!(dial_address("node-1.lab", 7000), "node-1.lab:7000");
        assert_eq!(dial_address("2001:db8::1", 7000), "[2001:db8::1]:7000");
    }

    #[test]
    fn puts_and_deletes_become_joins_changes_and_leaves() {
        let mut r = reader();
        let changes = r.put(&key_of("a"), &value(&advert("a", 1)));
        let [Membership::Joined(member)] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(member.address, "10.0.0.2:7000");
        assert_eq!(member.source, Source::Etcd);
        assert!(r.put(&key_of("a"), &value(&advert("a", 1))).is_empty());
        assert!(matches!(
            r.put(&key_of("a"), &value(&advert("a", 2))).as_slice(),
            [Membership::Changed(_)]
        ));
        assert!(matches!(
            r.delete(&key_of("a")).as_slice(),
            [Membership::Left {
                source: Source::Etcd,
                ..
            }]
        ));
        assert!(r.delete(&key_of("a")).is_empty());
    }

    #[test]
    fn a_refusal_is_reported_once_per_value() {
        let mut r = reader();
        let garbage = b"\x00\x01garbage";
        assert!(matches!(
            r.put(&key_of("g"), garbage).as_slice(),
            [Membership::Refused {
                source: Source::Etcd,
                reason: Refusal::Malformed(_),
                ..
            }]
        ));
        assert!(r.put(&key_of("g"), garbage).is_empty());
        assert_eq!(r.put(&key_of("g"), b"other garbage").len(), 1);
        // A key holding a member that turns to garbage: the member leaves.
        r.put(&key_of("a"), &value(&advert("a", 1)));
        let changes = r.put(&key_of("a"), garbage);
        assert!(matches!(
            changes.as_slice(),
            [Membership::Left { .. }, Membership::Refused { .. }]
        ));
    }

    #[test]
    fn a_key_must_name_its_advert_worker() {
        let mut r = reader();
        let changes = r.put(&key_of("b"), &value(&advert("a", 1)));
        let misnamed = matches!(
            changes.as_slice(),
            [Membership::Refused { reason: Refusal::Malformed(m), .. }] if m.contains("names worker")
        );
        assert!(misnamed, "{changes:?}");
        let no_host = Advert {
            host: None,
            ..advert("a", 1)
        };
        assert!(matches!(
            r.put(&key_of("a"), &value(&no_host)).as_slice(),
            [Membership::Refused { .. }]
        ));
    }

    #[test]
    fn a_replayed_advert_keeps_the_newer_and_is_reported_by_key() {
        let mut r = reader();
        r.put(&key_of("a"), &value(&advert("a", 5)));
        let changes = r.put(&key_of("a"), &value(&advert("a", 4)));
        let [
            Membership::Refused {
                from,
                reason: Refusal::Replayed,
                ..
            },
        ] = changes.as_slice()
        else {
            panic!("{changes:?}");
        };
        assert_eq!(from.as_bytes(), key_of("a"));
        let id = WorkerId::parse("a").expect("id");
        assert_eq!(
            r.set
                .get(&id)
                .and_then(|m| m.advert.as_ref())
                .map(|a| a.issued_ms),
            Some(5)
        );
    }

    #[test]
    fn a_resync_reports_who_vanished_and_who_appeared() {
        let mut r = reader();
        r.put(&key_of("a"), &value(&advert("a", 1)));
        r.put(&key_of("b"), &value(&advert("b", 1)));
        let (ka, va) = (key_of("a"), value(&advert("a", 1)));
        let (kc, vc) = (key_of("c"), value(&advert("c", 1)));
        let changes = r.resync(&[(&ka, &va), (&kc, &vc)]);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, Membership::Joined(m) if m.id.to_string() == "c"))
        );
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, Membership::Left { id, .. } if id.to_string() == "b"))
        );
        // A key that vanished and comes back with the same garbage is reported again.
        let kg = key_of("g");
        assert_eq!(r.put(&kg, b"junk").len(), 1);
        r.resync(&[]);
        assert_eq!(r.put(&kg, b"junk").len(), 1);
    }

    proptest! {
        /// Whatever bytes a key holds, reading them returns (never panics) and admits nothing
        /// unsigned.
        #[test]
        fn any_value_reads_without_panic(value in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut r = reader();
            for change in r.put(&key_of("a"), &value) {
                let is_refused = matches!(change, Membership::Refused { .. });
                prop_assert!(is_refused);
            }
        }
    }
}

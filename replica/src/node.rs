//! One coordinator's replica: its raft node, the service its peers call, and the proposal path
//! (apply here when this node leads, else forward to the leader; wait out an election).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::v1::RaftMessage;
use baton_proto::v1::replica_client::ReplicaClient;
use baton_proto::v1::replica_server::{Replica as ReplicaRpc, ReplicaServer};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::TypeConfig;
use crate::config::ReplicaConfig;
use crate::network::{Network, channel, message};
use crate::state::{Command, CommandId, Proposal, Response, State};
use crate::store::open_storage;

/// Between two tries of a proposal that found no leader, at most this long (it tries again as
/// soon as raft's view changes).
const RETRY: Duration = Duration::from_millis(50);

/// How long [`Replica::shutdown`] waits for raft's tasks to let go of the database file.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Why a proposal was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// The command names something that cannot be (a bad worker id).
    #[error("invalid command: {0}")]
    Invalid(String),
    /// No leader took it within the proposal time-out (no quorum: a majority of the group is
    /// down or cut off). It may still be applied if a leader got it before the time ran out.
    #[error("no raft leader took the proposal within {waited:?}: {last}")]
    NoLeader { waited: Duration, last: String },
    /// This replica is shutting down or failed.
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

/// A snapshot of where the replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub is_leader: bool,
    /// The index of the last entry applied to the state here.
    pub applied: Option<u64>,
    /// The index of the last log entry dropped here (covered by a snapshot).
    pub purged: Option<u64>,
    pub members: Vec<u64>,
}

/// A running replica. Dropping it does not stop it: call [`Replica::shutdown`].
pub struct Replica {
    node_id: u64,
    raft: Raft<TypeConfig>,
    state: watch::Receiver<State>,
    incarnation: u64,
    seq: AtomicU64,
    propose_timeout: Duration,
    tls: Option<ClientTlsConfig>,
    members: BTreeMap<u64, String>,
    data: std::path::PathBuf,
    /// Channels to leaders this replica forwarded to, by node id.
    leaders: Mutex<HashMap<u64, ReplicaClient<Channel>>>,
    local_addr: SocketAddr,
    stop_server: Mutex<Option<oneshot::Sender<()>>>,
    file_closed: watch::Receiver<()>,
}

impl Replica {
    /// Binds `config.listen` and starts.
    pub async fn start(config: ReplicaConfig) -> Result<Arc<Replica>, String> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("replica.listen: {}: {e}", config.listen))?;
        Replica::start_on(config, listener).await
    }

    /// Starts on a bound listener: opens the database, starts raft, serves the peers, and on
    /// first start initializes the group with every configured member (each member does the
    /// same with the same list, which raft allows; a group already formed ignores it).
    pub async fn start_on(
        mut config: ReplicaConfig,
        listener: TcpListener,
    ) -> Result<Arc<Replica>, String> {
        // What is validated (loopback or not: TLS) is where it really listens.
        config.listen = listener.local_addr().map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        let (log, sm) = open_storage(&config.data).map_err(|e| format!("replica.data: {e}"))?;
        let state = sm.subscribe();
        let file_closed = sm.on_close();
        let raft_config = openraft::Config {
            cluster_name: "baton".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout.0.as_millis() as u64,
            election_timeout_max: config.election_timeout.1.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_after),
            max_in_snapshot_log_to_keep: config.log_kept_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("replica: {e}"))?;
        let (server_tls, client_tls) = match &config.tls {
            Some(files) => (
                Some(baton_proto::tls::server_config(files).map_err(|e| e.to_string())?),
                Some(
                    baton_proto::tls::client_config(files, "coordinator")
                        .map_err(|e| e.to_string())?,
                ),
            ),
            None => (None, None),
        };
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            Network {
                tls: client_tls.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| format!("replica: starting raft: {e}"))?;

        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = server_tls {
            builder = builder.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
        }
        let service = ReplicaServer::new(Service {
            node_id: config.node_id,
            raft: raft.clone(),
        })
        .max_decoding_message_size(usize::MAX);
        let server = builder.add_service(service).serve_with_incoming_shutdown(
            baton_proto::incoming(listener),
            async {
                let _ = stop_rx.await;
            },
        );
        let node_id = config.node_id;
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(node_id, error = %e, "replica server stopped");
            }
        });

        if !raft.is_initialized().await.map_err(|e| e.to_string())? {
            let members: BTreeMap<u64, BasicNode> = config
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(format!("replica: initializing the group: {e}")),
            }
        }
        tracing::info!(
            node_id,
            listen = %local_addr,
            members = ?config.members.keys().collect::<Vec<_>>(),
            data = %config.data.display(),
            "replica started"
        );
        let replica = Arc::new(Replica {
            node_id,
            raft,
            state,
            incarnation: rand::random(),
            seq: AtomicU64::new(0),
            propose_timeout: config.propose_timeout,
            tls: client_tls,
            members: config.members,
            data: config.data,
            leaders: Mutex::new(HashMap::new()),
            local_addr,
            stop_server: Mutex::new(Some(stop_tx)),
            file_closed,
        });
        tokio::spawn(announce(Arc::downgrade(&replica)));
        tokio::spawn(log_leaders(node_id, replica.raft.metrics()));
        Ok(replica)
    }

    /// Where the peers' service listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The state as applied here: every change committed by the group reaches it, in order,
    /// shortly after the leader commits it.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        Status {
            node_id: self.node_id,
            leader: m.current_leader,
            term: m.current_term,
            is_leader: m.state == ServerState::Leader,
            applied: m.last_applied.map(|id| id.index),
            purged: m.purged.map(|id| id.index),
            members: m.membership_config.membership().voter_ids().collect(),
        }
    }

    /// Waits until raft's view satisfies `ready`, up to `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        ready: impl Fn(&Status) -> bool,
    ) -> Result<Status, Status> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status();
            if ready(&status) {
                return Ok(status);
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(self.status());
            }
        }
    }

    /// Proposes `command` and waits until the group applied it: here when this replica leads,
    /// else forwarded to the leader; while there is none (an election), tried again until the
    /// proposal time-out. A retry after a lost answer is applied once (its id is kept).
    pub async fn propose(&self, command: Command) -> Result<Response, ProposeError> {
        command.validate().map_err(ProposeError::Invalid)?;
        let proposal = Proposal {
            id: CommandId {
                node: self.node_id,
                incarnation: self.incarnation,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
            },
            command,
        };
        let started = Instant::now();
        let mut metrics = self.raft.metrics();
        loop {
            let last = match self.raft.client_write(proposal.clone()).await {
                Ok(written) => return Ok(written.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => {
                    match (to.leader_id, to.leader_node) {
                        (Some(leader), Some(node)) => {
                            match self.forward(leader, &node.addr, &proposal).await {
                                Ok(response) => return Ok(response),
                                Err(e) => e,
                            }
                        }
                        _ => "no leader elected".to_string(),
                    }
                }
                Err(RaftError::APIError(e)) => e.to_string(),
                Err(RaftError::Fatal(e)) => return Err(ProposeError::Stopped(e.to_string())),
            };
            let waited = started.elapsed();
            if waited >= self.propose_timeout {
                return Err(ProposeError::NoLeader { waited, last });
            }
            // Try again when raft's view changes (a leader elected), or after a short wait.
            let _ = tokio::time::timeout(RETRY, metrics.changed()).await;
        }
    }

    /// Sends `proposal` to `leader` and returns what it applied.
    async fn forward(
        &self,
        leader: u64,
        addr: &str,
        proposal: &Proposal,
    ) -> Result<Response, String> {
        let mut client = {
            let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
            match leaders.get(&leader) {
                Some(c) => c.clone(),
                None => {
                    let c = ReplicaClient::new(channel(addr, self.tls.as_ref())?);
                    leaders.insert(leader, c.clone());
                    c
                }
            }
        };
        let body = message(leader, proposal).map_err(|e| e.to_string())?;
        let mut call = tonic::Request::new(body);
        call.set_timeout(self.propose_timeout);
        let reply = client
            .propose(call)
            .await
            .map_err(|s| format!("forwarding to leader {leader}: {}", s.message()))?;
        decode::<Result<Response, String>>(&reply.into_inner().json)?
    }

    /// Stops raft and the peers' service, and returns once the database file is closed (or
    /// after [`CLOSE_WAIT`], logged). The file stays as it is; a replica started on it again
    /// catches up from the group.
    pub async fn shutdown(&self) {
        if let Some(stop) = self
            .stop_server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = stop.send(());
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node_id = self.node_id, error = %e, "replica shutdown");
        }
        let mut closed = self.file_closed.clone();
        if tokio::time::timeout(CLOSE_WAIT, closed.changed())
            .await
            .is_err()
        {
            tracing::warn!(
                node_id = self.node_id,
                "replica shut down, but its database file is still open after {CLOSE_WAIT:?}"
            );
        }
    }

    /// The configured members and their addresses.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    /// This process's incarnation (a random number drawn at start), in its proposals' ids.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The database file.
    pub fn data(&self) -> &std::path::Path {
        &self.data
    }
}

/// Logs each change of leader as this replica sees it (the raft library itself is kept to
/// its errors), until raft stops.
async fn log_leaders(
    node_id: u64,
    mut metrics: watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
) {
    let mut last: Option<Option<u64>> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            // A restarted node's metrics first show its persisted vote for itself as a leader
            // it is not; only a node in the leader state leads.
            let leader = m
                .current_leader
                .filter(|l| *l != node_id || m.state == ServerState::Leader);
            (leader, m.current_term)
        };
        if last != Some(leader) {
            match leader {
                Some(l) if l == node_id => {
                    tracing::info!(node_id, term, "this coordinator leads the raft group")
                }
                Some(l) => tracing::info!(node_id, leader = l, term, "raft leader known"),
                None if last.is_some() => tracing::warn!(
                    node_id,
                    term,
                    "no raft leader: budget decisions wait for an election"
                ),
                None => {}
            }
            last = Some(leader);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Records this process's start in the group (`Command::Started`), which closes what the
/// node's earlier incarnation left open; tried until it is applied or the replica is gone (a
/// group without quorum cannot record anything, this included).
async fn announce(replica: std::sync::Weak<Replica>) {
    loop {
        let Some(r) = replica.upgrade() else { return };
        let at = jiff::Timestamp::now();
        match r.propose(Command::Started { at }).await {
            Ok(Response::Started(closed)) => {
                for (id, settlement) in &closed {
                    tracing::warn!(
                        node_id = r.node_id, %id, charged = %settlement.charged,
                        "a cloud reservation left open when this coordinator last stopped was \
                         closed, charged in full (its request died with that process)"
                    );
                }
                return;
            }
            Ok(other) => {
                tracing::error!(node_id = r.node_id, answer = ?other, "unexpected answer to Started");
                return;
            }
            Err(ProposeError::Stopped(_)) => return,
            Err(e) => {
                tracing::warn!(node_id = r.node_id, error = %e, "recording this coordinator's start in the replicated state; trying again");
            }
        }
    }
}

fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<T, String> {
    serde_json::from_slice(json).map_err(|e| format!("undecodable raft message: {e}"))
}

/// The service peers call: each message goes to the local raft, and its result goes back.
struct Service {
    node_id: u64,
    raft: Raft<TypeConfig>,
}

impl Service {
    fn open<T: DeserializeOwned>(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<T, tonic::Status> {
        let m = request.into_inner();
        if m.to != self.node_id {
            return Err(tonic::Status::failed_precondition(format!(
                "this is raft node {}, not {}",
                self.node_id, m.to
            )));
        }
        decode(&m.json).map_err(tonic::Status::invalid_argument)
    }

    fn reply(
        &self,
        value: &impl serde::Serialize,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        message(self.node_id, value)
            .map(tonic::Response::new)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

#[tonic::async_trait]
impl ReplicaRpc for Service {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let result = self.raft.append_entries(self.open(request)?).await;
        self.reply(&result)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let result = self.raft.install_snapshot(self.open(request)?).await;
        self.reply(&result)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let result = self.raft.vote(self.open(request)?).await;
        self.reply(&result)
    }

    async fn propose(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let proposal: Proposal = self.open(request)?;
        // Only the leader applies forwarded proposals; a stale one says so and the forwarder
        // asks again once it sees the new leader.
        let result: Result<Response, String> = match self.raft.client_write(proposal).await {
            Ok(written) => Ok(written.data),
            Err(e) => Err(e.to_string()),
        };
        self.reply(&result)
    }
}

//! Raft's messages between coordinators over gRPC (`baton.v1.Replica`): the client side that
//! openraft calls to reach a peer, and the service that hands a peer's message to the local
//! raft. Each message is one of openraft's types as JSON; a reply carries the remote raft's
//! `Result`, so a refusal there (a higher term, a stale leader) comes back as openraft's own
//! error, not as a transport failure.

use std::time::Duration;

use baton_proto::v1::RaftMessage;
use baton_proto::v1::replica_client::ReplicaClient;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::TypeConfig;

/// How long a connect to a peer may take: an election must not wait on a dead peer's SYN.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Makes a [`PeerClient`] per peer, lazily connected.
#[derive(Clone)]
pub(crate) struct Network {
    pub tls: Option<ClientTlsConfig>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            client: None,
            reachable: true,
        }
    }
}

/// A lazily connected channel to `addr` (`host:port`), over TLS when configured.
pub(crate) fn channel(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("{addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("tls: {e}"))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Encodes `value` as a message for node `to`.
pub(crate) fn message(to: u64, value: &impl Serialize) -> Result<RaftMessage, serde_json::Error> {
    Ok(RaftMessage {
        to,
        json: serde_json::to_vec(value)?,
    })
}

/// One peer, as openraft's replication and election tasks reach it.
pub(crate) struct PeerClient {
    target: u64,
    addr: String,
    tls: Option<ClientTlsConfig>,
    client: Option<ReplicaClient<Channel>>,
    /// Whether the last call got an answer: a change is logged once (the raft library, kept
    /// quiet, would log every retry).
    reachable: bool,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Snapshot,
    Vote,
}

impl PeerClient {
    fn client(&mut self) -> Result<ReplicaClient<Channel>, Unreachable> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let channel = channel(&self.addr, self.tls.as_ref())
            .map_err(|e| Unreachable::new(&std::io::Error::other(e)))?;
        let client = ReplicaClient::new(channel).max_decoding_message_size(usize::MAX);
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            message(self.target, request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut call = tonic::Request::new(body);
        call.set_timeout(ttl);
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let reply = match rpc {
            Rpc::Append => client.append_entries(call).await,
            Rpc::Snapshot => client.install_snapshot(call).await,
            Rpc::Vote => client.vote(call).await,
        };
        match (&reply, self.reachable) {
            (Err(status), true) => {
                tracing::warn!(peer = self.target, addr = %self.addr, error = %status.message(), "raft peer unreachable; retrying");
                self.reachable = false;
            }
            (Ok(_), false) => {
                tracing::info!(peer = self.target, addr = %self.addr, "raft peer reachable again");
                self.reachable = true;
            }
            _ => {}
        }
        let reply = reply.map_err(|status| {
            let e = std::io::Error::other(format!("{}: {}", status.code(), status.message()));
            match status.code() {
                // Nothing answered (refused, reset, timed out connecting): openraft backs off.
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let result: Result<Resp, RaftError<u64, E>> =
            serde_json::from_slice(&reply.into_inner().json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

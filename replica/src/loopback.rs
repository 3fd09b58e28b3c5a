//! A group of replicas in one process on loopback listeners, each with its own database file
//! in one directory: what the replica's tests and `baton-lab replica` run. Not a deployment
//! (no TLS, one process); coordinators start their replica from `[coordinator.replica]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::{Replica, ReplicaConfig, Status};

/// The replicas, by node id, and every member's address.
pub struct LoopbackGroup {
    pub members: BTreeMap<u64, String>,
    pub replicas: BTreeMap<u64, Arc<Replica>>,
}

/// Node `node_id`'s config in a group of `members`, its file `dir/node-<id>.redb`, the
/// defaults otherwise.
pub fn config(node_id: u64, members: &BTreeMap<u64, String>, dir: &Path) -> ReplicaConfig {
    let listen = members
        .get(&node_id)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut c = ReplicaConfig::single(node_id, listen, dir.join(format!("node-{node_id}.redb")));
    c.members = members.clone();
    c
}

/// Starts `n` replicas (node ids 1..=n) on listeners bound to 127.0.0.1:0; `tune` adjusts
/// each one's config (timings, snapshots) before it starts.
pub async fn start(
    n: u64,
    dir: &Path,
    tune: impl Fn(&mut ReplicaConfig),
) -> Result<LoopbackGroup, String> {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        members.insert(id, l.local_addr().map_err(|e| e.to_string())?.to_string());
        listeners.push((id, l));
    }
    let mut replicas = BTreeMap::new();
    for (id, l) in listeners {
        let mut c = config(id, &members, dir);
        tune(&mut c);
        replicas.insert(id, Replica::start_on(c, l).await?);
    }
    Ok(LoopbackGroup { members, replicas })
}

impl LoopbackGroup {
    /// The leader, once every replica names the same one, within `bound`.
    ///
    /// Every member initializes the group at once, so several may stand in the first term and
    /// one replica's first view of a leader can be a candidate the others never followed:
    /// the views are compared again whenever any replica's raft view changes, until they agree.
    pub async fn agreed_leader(&self, bound: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + bound;
        loop {
            let seen: Vec<Status> = self.replicas.values().map(|r| r.status()).collect();
            if let Some(Some(leader)) = seen.first().map(|s| s.leader)
                && seen.iter().all(|s| s.leader == Some(leader))
            {
                return Ok(leader);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let views: Vec<Option<u64>> = seen.iter().map(|s| s.leader).collect();
                return Err(format!(
                    "the replicas never agreed on a leader within {bound:?}: {views:?}"
                ));
            }
            // Woken by the first replica whose view differs from what was just read.
            let mut changes = tokio::task::JoinSet::new();
            for (r, was) in self.replicas.values().zip(seen) {
                let r = Arc::clone(r);
                changes.spawn(async move { r.wait_for(left, move |now| *now != was).await });
            }
            let _ = changes.join_next().await;
        }
    }
}

//! Replicas on real sockets (127.0.0.1), each with its own redb file: a one-node group across a
//! restart, and a three-node group that loses its leader under a stream of proposals.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use baton_replica::{Command, DecisionKind, Replica, ReplicaConfig, Response, State};
use tokio::net::TcpListener;

const BOUND: Duration = Duration::from_secs(10);

fn config(node_id: u64, members: &BTreeMap<u64, String>, dir: &Path) -> ReplicaConfig {
    let listen = members[&node_id].parse().expect("an address");
    let mut c = ReplicaConfig::single(node_id, listen, dir.join(format!("node-{node_id}.redb")));
    c.members = members.clone();
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(200), Duration::from_millis(400));
    c.propose_timeout = Duration::from_secs(5);
    c
}

fn drain(worker: &str) -> Command {
    Command::Drain {
        worker: worker.into(),
        reason: "test".into(),
        at_unix_ms: 1,
    }
}

/// Waits until `replica`'s applied state satisfies `ready`.
async fn state_where(replica: &Replica, ready: impl Fn(&State) -> bool) -> State {
    let mut state = replica.state();
    tokio::time::timeout(BOUND, state.wait_for(|s| ready(s)))
        .await
        .expect("the state within the bound")
        .expect("the replica alive")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_group_applies_and_keeps_its_state_across_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let members = BTreeMap::from([(1, listener.local_addr()?.to_string())]);
    let replica = Replica::start_on(config(1, &members, dir.path()), listener)
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        replica.propose(drain("decode-a")).await,
        Ok(Response::Changed)
    );
    assert_eq!(
        replica.propose(drain("decode-a")).await,
        Ok(Response::Unchanged)
    );
    assert!(matches!(
        replica.propose(drain("not a worker id")).await,
        Err(baton_replica::ProposeError::Invalid(_))
    ));
    replica.shutdown().await;
    drop(replica);

    let replica = Replica::start(config(1, &members, dir.path()))
        .await
        .map_err(anyhow::Error::msg)?;
    let state = state_where(&replica, |s| s.decision("decode-a").is_some()).await;
    assert_eq!(
        state.decision("decode-a").context("drained")?.kind,
        DecisionKind::Drained
    );
    assert_eq!(
        replica
            .propose(Command::Restore {
                worker: "decode-a".into()
            })
            .await,
        Ok(Response::Changed)
    );
    replica.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_agree_lose_their_leader_and_the_restarted_one_catches_up()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let mut members = BTreeMap::new();
    for (i, l) in listeners.iter().enumerate() {
        members.insert(i as u64 + 1, l.local_addr()?.to_string());
    }
    let mut replicas: BTreeMap<u64, Arc<Replica>> = BTreeMap::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let r = Replica::start_on(config(id, &members, dir.path()), listener)
            .await
            .map_err(anyhow::Error::msg)?;
        replicas.insert(id, r);
    }
    let leader = replicas[&1]
        .wait_for(BOUND, |s| s.leader.is_some())
        .await
        .map_err(|s| anyhow!("no leader: {s:?}"))?
        .leader
        .context("a leader")?;
    for r in replicas.values() {
        r.wait_for(BOUND, |s| s.leader == Some(leader))
            .await
            .map_err(|s| anyhow!("a replica without the leader: {s:?}"))?;
    }

    // Proposed on a follower: forwarded, applied everywhere.
    let follower = *replicas
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;
    assert_eq!(
        replicas[&follower].propose(drain("w-0")).await,
        Ok(Response::Changed)
    );
    for r in replicas.values() {
        state_where(r, |s| s.decision("w-0").is_some()).await;
    }

    // A steady stream of proposals through both followers while the leader is stopped.
    let survivors: Vec<Arc<Replica>> = replicas
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, r)| r.clone())
        .collect();
    let load = {
        let survivors = survivors.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 1..=60u32 {
                let via = &survivors[n as usize % survivors.len()];
                let at = Instant::now();
                let result = via.propose(drain(&format!("w-{n}"))).await;
                sent.push((at, Instant::now(), result));
            }
            sent
        })
    };
    // Stop the leader once the stream is under way.
    state_where(&survivors[0], |s| s.decision("w-10").is_some()).await;
    let killed_at = Instant::now();
    replicas[&leader].shutdown().await;
    let sent = load.await?;
    let failed: Vec<_> = sent.iter().filter(|(_, _, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "proposals through survivors failed: {failed:?}"
    );
    let failover = sent
        .iter()
        .filter(|(at, _, _)| *at >= killed_at)
        .map(|(_, done, _)| *done - killed_at)
        .min()
        .expect("proposals after the stop");
    let new_leader = survivors[0]
        .wait_for(BOUND, |s| s.leader.is_some_and(|l| l != leader))
        .await
        .map_err(|s| anyhow!("no new leader among the survivors: {s:?}"))?
        .leader
        .context("a leader")?;
    eprintln!(
        "leader {leader} stopped; new leader {new_leader}; first proposal applied {failover:?} after the stop"
    );

    // The stopped replica restarts on its file and catches up.
    let old = replicas.remove(&leader).context("the old leader")?;
    drop(old);
    let restarted = Replica::start(config(leader, &members, dir.path()))
        .await
        .map_err(anyhow::Error::msg)?;
    let everything = |s: &State| (0..=60).all(|n| s.decision(&format!("w-{n}")).is_some());
    let caught_up = state_where(&restarted, everything).await;
    for r in &survivors {
        assert_eq!(
            state_where(r, everything).await,
            caught_up,
            "the same state"
        );
    }
    restarted.shutdown().await;
    for r in &survivors {
        r.shutdown().await;
    }
    Ok(())
}

//! Replicas on real sockets (127.0.0.1), each with its own redb file: a one-node group across a
//! restart, and a three-node group that loses its leader under a stream of proposals.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use baton_budget::{CapConfig, Close, Period, Usd};
use baton_replica::{Command, DecisionKind, Replica, ReplicaConfig, Response, State, loopback};
use jiff::Timestamp;
use tokio::net::TcpListener;

const BOUND: Duration = Duration::from_secs(10);

/// Faster timings than the defaults, so elections in these tests are short.
fn fast(c: &mut ReplicaConfig) {
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(200), Duration::from_millis(400));
    c.propose_timeout = Duration::from_secs(5);
}

fn config(node_id: u64, members: &BTreeMap<u64, String>, dir: &Path) -> ReplicaConfig {
    let mut c = loopback::config(node_id, members, dir);
    fast(&mut c);
    c
}

fn drain(worker: &str) -> Command {
    Command::Drain {
        worker: worker.into(),
        reason: "test".into(),
        at_unix_ms: 1,
    }
}

/// Starts `n` replicas on loopback listeners, each with its file in `dir`.
async fn start_group(
    n: u64,
    dir: &Path,
) -> anyhow::Result<(BTreeMap<u64, String>, BTreeMap<u64, Arc<Replica>>)> {
    let g = loopback::start(n, dir, fast)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok((g.members, g.replicas))
}

/// The group's leader once every replica agrees on it.
async fn agreed_leader(replicas: &BTreeMap<u64, Arc<Replica>>) -> anyhow::Result<u64> {
    loopback::LoopbackGroup {
        members: BTreeMap::new(),
        replicas: replicas.clone(),
    }
    .agreed_leader(BOUND)
    .await
    .map_err(anyhow::Error::msg)
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
    let (members, mut replicas) = start_group(3, dir.path()).await?;
    let leader = agreed_leader(&replicas).await?;

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
    // Everything, and the restarted replica's own start (it records itself in the state).
    let incarnation = restarted.incarnation();
    let everything = |s: &State| {
        (0..=60).all(|n| s.decision(&format!("w-{n}")).is_some())
            && s.incarnation(leader) == Some(incarnation)
    };
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

fn usd(cents: u64) -> Usd {
    Usd::from_dollars(cents as f64 / 100.0).unwrap_or(Usd::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_ledger_charges_every_request_once_across_a_leader_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, replicas) = start_group(3, dir.path()).await?;
    let leader = agreed_leader(&replicas).await?;
    let survivors: Vec<Arc<Replica>> = replicas
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, r)| r.clone())
        .collect();
    let caps = vec![CapConfig {
        period: Period::Month,
        cap_usd: 1000.0,
        endpoint: None,
    }];
    let now: Timestamp = "2026-12-07T12:00:00Z".parse()?;
    // Requests through the followers: reserve 5 cents, settle at 1 + n % 3 cents; the leader
    // is stopped after the tenth.
    let requests = 40u64;
    let (stopped_tx, mut stopped_rx) = tokio::sync::mpsc::channel::<()>(1);
    let load = {
        let survivors = survivors.clone();
        let caps = caps.clone();
        tokio::spawn(async move {
            let mut charged = 0u64;
            for n in 0..requests {
                if n == 10 {
                    // The test stops the leader now and says so.
                    stopped_rx.recv().await;
                }
                let via = &survivors[n as usize % survivors.len()];
                let reserved = via
                    .propose(Command::Reserve {
                        endpoint: "cloud".into(),
                        amount: usd(5),
                        request_id: format!("req-{n}"),
                        at: now,
                        caps: caps.clone(),
                        time_zone: "UTC".into(),
                    })
                    .await?;
                let Response::Reserved(id) = reserved else {
                    anyhow::bail!("request {n} not reserved: {reserved:?}");
                };
                let cost = 1 + n % 3;
                let closed = via
                    .propose(Command::Close {
                        id,
                        how: Close::Settled(usd(cost)),
                        at: now,
                    })
                    .await?;
                anyhow::ensure!(
                    matches!(closed, Response::Closed(s) if s.charged == usd(cost)),
                    "request {n} settled as {closed:?}"
                );
                charged += cost;
            }
            Ok(charged)
        })
    };
    state_where(&survivors[0], |s| {
        s.ledger
            .snapshot(&caps, "UTC", now)
            .is_ok_and(|r| r.windows[0].settled >= 5)
    })
    .await;
    replicas[&leader].shutdown().await;
    stopped_tx.send(()).await?;
    let charged_cents = load.await??;
    for r in &survivors {
        let report = state_where(r, |s| {
            s.ledger
                .snapshot(&caps, "UTC", now)
                .is_ok_and(|r| r.windows[0].settled == requests)
        })
        .await
        .ledger
        .snapshot(&caps, "UTC", now)
        .map_err(anyhow::Error::msg)?;
        let w = &report.windows[0];
        assert_eq!(
            w.spent,
            usd(charged_cents),
            "spent = the sum of the settled costs"
        );
        assert_eq!(w.reserved, Usd::ZERO, "nothing left reserved");
        assert_eq!(w.open, 0);
        assert!(
            report.open.is_empty(),
            "no reservation lost open: {:?}",
            report.open
        );
    }
    for r in &survivors {
        r.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_compacted_log_is_sent_a_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let compact = |c: &mut ReplicaConfig| {
        fast(c);
        c.snapshot_after = 10;
        c.log_kept_after_snapshot = 0;
    };
    let (members, mut replicas) = {
        let g = loopback::start(3, dir.path(), compact)
            .await
            .map_err(anyhow::Error::msg)?;
        (g.members, g.replicas)
    };
    let compacting = |id: u64| {
        let mut c = loopback::config(id, &members, dir.path());
        compact(&mut c);
        c
    };
    let leader = agreed_leader(&replicas).await?;
    let behind = *replicas
        .keys()
        .find(|id| **id != leader)
        .context("a follower")?;
    let stopped = replicas.remove(&behind).context("the follower")?;
    let had = stopped.status().applied.unwrap_or(0);
    stopped.shutdown().await;
    // Far more entries than a snapshot spans, so the leader drops the log the stopped replica
    // would need.
    for n in 0..60 {
        replicas[&leader].propose(drain(&format!("w-{n}"))).await?;
    }
    let everything = |s: &State| (0..60).all(|n| s.decision(&format!("w-{n}")).is_some());
    state_where(&replicas[&leader], everything).await;
    replicas[&leader]
        .wait_for(BOUND, |s| s.purged.is_some_and(|p| p > had))
        .await
        .map_err(|s| anyhow!("the leader kept the log the stopped replica needs: {s:?}"))?;
    let restarted = Replica::start(compacting(behind))
        .await
        .map_err(anyhow::Error::msg)?;
    // The restarted replica records its start; both then hold the same state.
    let incarnation = restarted.incarnation();
    let started = |s: &State| everything(s) && s.incarnation(behind) == Some(incarnation);
    let at_leader = state_where(&replicas[&leader], started).await;
    assert_eq!(
        state_where(&restarted, started).await,
        at_leader,
        "the snapshot carries the whole state"
    );
    // It follows the log again after the snapshot.
    replicas[&leader].propose(drain("after")).await?;
    state_where(&restarted, |s| s.decision("after").is_some()).await;
    restarted.shutdown().await;
    for r in replicas.values() {
        r.shutdown().await;
    }
    Ok(())
}

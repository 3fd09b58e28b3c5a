//! `baton-lab replica`: what replicating the coordinators' shared state costs, and how long a
//! group is without a leader when it loses one.
//!
//! Replicas run in this process on loopback sockets, each with its own redb file in a
//! temporary directory, with the default timings (`ReplicaConfig::single`: heartbeat 100 ms,
//! election time-out 300-600 ms).
//!
//! - Steady state: sequential cloud budget reservations, each settled right after (the settle
//!   not timed), on a one-node group (the baseline: the same code, a durable apply and no
//!   peers), then on a three-node group through the leader and through a follower (forwarded);
//!   a reservation's latency p50/p99 on each.
//! - Failover, per trial: a three-node group under a stream of reservations through both
//!   followers; the leader is stopped; the figure is the time from the stop to the first
//!   reservation sent after it that the group decided (a new leader elected and committing),
//!   and how many failed (none should: a proposal waits out an election). The stopped replica
//!   then restarts on its file and must catch up before the next trial.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_bench::metrics::percentile;
use baton_budget::{CapConfig, Close, Period, Usd};
use baton_replica::{Command, Replica, Response, State, loopback};

#[derive(clap::Args)]
pub struct ReplicaArgs {
    /// Leader stops to measure.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Sequential proposals per steady-state figure.
    #[arg(long, default_value_t = 400)]
    proposals: usize,
}

const BOUND: Duration = Duration::from_secs(20);

pub fn run(args: ReplicaArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main(args))
}

async fn main(args: ReplicaArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // Steady state, one node.
    let one = group(1, &dir.path().join("one")).await?;
    let single = latencies(&one.replicas[&1], args.proposals, "one").await?;
    one.stop().await;

    // Steady state, three nodes.
    let mut three = group(3, &dir.path().join("three")).await?;
    let leader = three.leader().await?;
    let follower = three.follower_of(leader)?;
    let via_leader = latencies(&three.replicas[&leader], args.proposals, "leader").await?;
    let via_follower = latencies(&three.replicas[&follower], args.proposals, "follower").await?;

    println!(
        "baton-lab replica: {} sequential budget reservations each (each settled after, untimed)",
        args.proposals
    );
    println!("                          p50 ms   p99 ms   p50 / one node");
    for (name, l) in [
        ("one node", &single),
        ("three, via the leader", &via_leader),
        ("three, via a follower", &via_follower),
    ] {
        println!(
            "  {name:<22} {:>8.3} {:>8.3}   {:.2}x",
            l.0,
            l.1,
            l.0 / single.0
        );
    }

    // Failover.
    let mut failovers = Vec::new();
    let mut failed_total = 0;
    for trial in 1..=args.trials {
        let (failover, failed) = three.lose_the_leader(trial).await?;
        println!(
            "  trial {trial:>2}: first proposal applied {:>7.1} ms after the leader stopped, {failed} failed",
            failover.as_secs_f64() * 1e3
        );
        failovers.push(failover.as_secs_f64() * 1e3);
        failed_total += failed;
    }
    failovers.sort_by(f64::total_cmp);
    println!(
        "failover over {} trials: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms; proposals failed: {failed_total}",
        failovers.len(),
        percentile(&failovers, 50.0),
        percentile(&failovers, 90.0),
        failovers.last().copied().unwrap_or(f64::NAN),
    );
    three.stop().await;
    Ok(())
}

/// Sequential reservations through `via`, each settled after: the reservations' (p50, p99)
/// in ms.
async fn latencies(via: &Replica, n: usize, tag: &str) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let reserved = via.propose(reserve(&format!("steady-{tag}-{i}"))).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        let Response::Reserved(id) = reserved else {
            anyhow::bail!("not reserved: {reserved:?}");
        };
        via.propose(Command::Close {
            id,
            how: Close::Settled(Usd::from_dollars(0.001).unwrap_or(Usd::ZERO)),
            at: jiff::Timestamp::now(),
        })
        .await?;
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 50.0), percentile(&ms, 99.0)))
}

/// A reservation of a cent under a cap it always fits.
fn reserve(request_id: &str) -> Command {
    Command::Reserve {
        endpoint: "cloud".into(),
        amount: Usd::from_dollars(0.01).unwrap_or(Usd::ZERO),
        request_id: request_id.into(),
        at: jiff::Timestamp::now(),
        caps: vec![CapConfig {
            period: Period::Month,
            cap_usd: 1e6,
            endpoint: None,
        }],
        time_zone: "UTC".into(),
    }
}

/// Whether the state's ledger holds an open reservation for `request_id`.
fn holds(state: &State, request_id: &str) -> bool {
    let caps = [CapConfig {
        period: Period::Month,
        cap_usd: 1e6,
        endpoint: None,
    }];
    state
        .ledger
        .snapshot(&caps, "UTC", jiff::Timestamp::now())
        .is_ok_and(|r| r.open.iter().any(|o| o.request_id == request_id))
}

struct Group {
    members: BTreeMap<u64, String>,
    replicas: BTreeMap<u64, Arc<Replica>>,
    dir: std::path::PathBuf,
    /// Proposals made by the failover stream so far (worker names are numbered by it).
    streamed: usize,
}

async fn group(n: u64, dir: &Path) -> anyhow::Result<Group> {
    std::fs::create_dir_all(dir)?;
    let started = loopback::start(n, dir, |_| {})
        .await
        .map_err(anyhow::Error::msg)?;
    let g = Group {
        members: started.members,
        replicas: started.replicas,
        dir: dir.to_path_buf(),
        streamed: 0,
    };
    g.leader().await?;
    Ok(g)
}

impl Group {
    async fn leader(&self) -> anyhow::Result<u64> {
        loopback::LoopbackGroup {
            members: self.members.clone(),
            replicas: self.replicas.clone(),
        }
        .agreed_leader(BOUND)
        .await
        .map_err(anyhow::Error::msg)
    }

    fn follower_of(&self, leader: u64) -> anyhow::Result<u64> {
        self.replicas
            .keys()
            .copied()
            .find(|id| *id != leader)
            .context("a follower")
    }

    /// One failover trial: (stop to first applied proposal, proposals failed).
    async fn lose_the_leader(&mut self, trial: usize) -> anyhow::Result<(Duration, usize)> {
        let leader = self.leader().await?;
        let survivors: Vec<Arc<Replica>> = self
            .replicas
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, r)| r.clone())
            .collect();
        let first = self.streamed;
        let count = 40;
        self.streamed += count;
        let stream = {
            let survivors = survivors.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for n in first..first + count {
                    let via = &survivors[n % survivors.len()];
                    let at = Instant::now();
                    let ok = matches!(
                        via.propose(reserve(&format!("failover-{n}"))).await,
                        Ok(Response::Reserved(_))
                    );
                    sent.push((at, Instant::now(), ok));
                }
                sent
            })
        };
        // Stop the leader a few proposals into the stream.
        let marker = format!("failover-{}", first + 5);
        let mut state = survivors[0].state();
        tokio::time::timeout(BOUND, state.wait_for(|s: &State| holds(s, &marker)))
            .await
            .context("the stream under way")??;
        let stopped = Instant::now();
        let old = self.replicas.remove(&leader).context("the leader")?;
        old.shutdown().await;
        drop(old);
        let sent = stream.await?;
        let failed = sent.iter().filter(|(_, _, ok)| !ok).count();
        let failover = sent
            .iter()
            .filter(|(at, _, ok)| *ok && *at >= stopped)
            .map(|(_, done, _)| *done - stopped)
            .min()
            .with_context(|| format!("trial {trial}: no proposal applied after the stop"))?;

        // The old leader restarts on its file and catches up before the next trial.
        let restarted = Replica::start(loopback::config(leader, &self.members, &self.dir))
            .await
            .map_err(anyhow::Error::msg)?;
        let last = format!("failover-{}", first + count - 1);
        let mut state = restarted.state();
        tokio::time::timeout(BOUND, state.wait_for(|s: &State| holds(s, &last)))
            .await
            .context("the restarted replica catching up")??;
        self.replicas.insert(leader, restarted);
        Ok((failover, failed))
    }

    async fn stop(self) {
        for r in self.replicas.values() {
            r.shutdown().await;
        }
    }
}

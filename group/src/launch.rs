//! Starting a group from a worker: its settings (`[decode.group]`), the even split of the
//! model's layers over stages, the other ranks started as processes on this host (or awaited
//! from other hosts), and the leading engine that is rank 0.

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_collective::{Collective, ShmGroup};
use baton_engine::local_group::RankOp;
use baton_engine::{Engine, EngineConfig, Followers, Role, Shard, StepItem, StepOutput};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::driver::RemoteGroup;
use crate::rank::COLLECTIVE_VALUES;
use crate::{Error, Result};

/// The environment variable that carries a group's secret to its ranks (never a flag: flags
/// show in `ps`).
pub const SECRET_ENV: &str = "BATON_GROUP_SECRET";

/// How long one operation may wait for a rank's reply (a long prefill chunk on a slow stage).
const OP_TIMEOUT: Duration = Duration::from_secs(600);

/// A worker that is a tensor- and pipeline-parallel group (`[decode.group]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    /// Tensor-parallel ranks per pipeline stage: each holds its share of every layer's heads
    /// and MLP. Default 1.
    pub tp: usize,
    /// Pipeline stages: the model's layers split evenly, each stage holding its range. Default 1.
    pub pp: usize,
    /// Where the group's other ranks connect; port 0 lets the OS choose. Default "127.0.0.1:0".
    pub listen: SocketAddr,
    /// Whether this worker starts its other ranks itself, as processes on this host (true), or
    /// waits for ranks started with `baton rank --group-addr` elsewhere (false: every rank and
    /// this worker read the group's secret from $BATON_GROUP_SECRET). Default true.
    pub spawn: bool,
    /// How long the other ranks have to join (a duration). Default 120s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub join_timeout: Duration,
    /// How long an all-reduce waits for a stage's other ranks before the group counts as
    /// broken (a duration). Default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub collective_timeout: Duration,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawn: true,
            join_timeout: Duration::from_secs(120),
            collective_timeout: Duration::from_secs(30),
        }
    }
}

impl GroupConfig {
    /// Ranks in the group.
    pub fn ranks(&self) -> usize {
        self.tp * self.pp
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.tp == 0 || self.tp > 64 {
            return bad("group.tp", "must be 1 to 64");
        }
        if self.pp == 0 || self.pp > 64 {
            return bad("group.pp", "must be 1 to 64");
        }
        if self.join_timeout.is_zero() {
            return bad("group.join_timeout", "must be positive");
        }
        if self.collective_timeout < Duration::from_millis(100) {
            return bad("group.collective_timeout", "must be at least 100 ms");
        }
        Ok(())
    }
}

/// `layers` cut into `n` contiguous, even stages (the first ones one layer shorter when it does
/// not divide).
pub fn stages(layers: usize, n: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|i| layers * i / n..layers * (i + 1) / n)
        .collect()
}

/// The engine a worker serves with: the whole model in this process, or rank 0 of the group
/// `group` describes, leading the others.
pub fn load_engine(config: EngineConfig, group: &GroupConfig) -> Result<Engine> {
    group.validate()?;
    if group.ranks() == 1 {
        return Ok(Engine::load(config)?);
    }
    let shape = baton_engine::read_model_shape(&config.model)?;
    if group.pp > shape.num_layers {
        return Err(Error::InvalidConfig {
            field: "group.pp",
            reason: format!(
                "{} stages for the model's {} layers",
                group.pp, shape.num_layers
            ),
        });
    }
    let stages = stages(shape.num_layers, group.pp);
    let listener = TcpListener::bind(group.listen).map_err(|e| Error::InvalidConfig {
        field: "group.listen",
        reason: format!("{}: {e}", group.listen),
    })?;
    let addr = listener.local_addr().map_err(|e| Error::InvalidConfig {
        field: "group.listen",
        reason: e.to_string(),
    })?;
    let secret = if group.spawn {
        let bytes: [u8; 24] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    } else {
        std::env::var(SECRET_ENV).map_err(|_| Error::InvalidConfig {
            field: "group.spawn",
            reason: format!("ranks started elsewhere prove ${SECRET_ENV}, which is not set here"),
        })?
    };
    // One segment per stage and launch: a crashed group's file is never reused.
    let segments: Vec<PathBuf> = (0..group.pp)
        .map(|s| {
            PathBuf::from(format!(
                "/dev/shm/baton-group-{}-{}-stage{s}",
                std::process::id(),
                addr.port()
            ))
        })
        .collect();
    let mut launched = Launched {
        group: None,
        children: Vec::new(),
        stopping: Arc::new(AtomicBool::new(false)),
        segments: segments.clone(),
    };
    if group.spawn {
        let exe = std::env::current_exe().map_err(|e| Error::InvalidConfig {
            field: "group.spawn",
            reason: format!("this program's path: {e}"),
        })?;
        let engine_json = serde_json::to_string(&config).map_err(|e| Error::InvalidConfig {
            field: "engine",
            reason: e.to_string(),
        })?;
        for rank in 1..group.ranks() {
            let stage = rank / group.tp;
            let layers = &stages[stage];
            let mut cmd = Command::new(&exe);
            cmd.env(SECRET_ENV, &secret)
                .arg("rank")
                .args(["--group-addr", &addr.to_string()])
                .args(["--rank", &rank.to_string()])
                .args(["--tp", &group.tp.to_string()])
                .args(["--layers", &format!("{}..{}", layers.start, layers.end)])
                .args(["--role", role_name(config.role)])
                .args(["--engine-json", &engine_json])
                .args([
                    "--collective-timeout-s",
                    &group.collective_timeout.as_secs().max(1).to_string(),
                ]);
            if group.tp > 1 {
                cmd.arg("--collective").arg(&segments[stage]);
            }
            let child = cmd.spawn().map_err(|e| Error::InvalidConfig {
                field: "group.spawn",
                reason: format!("starting rank {rank}: {e}"),
            })?;
            launched.watch(rank, child);
        }
    } else {
        tracing::info!(%addr, ranks = group.ranks() - 1, "waiting for the group's ranks to join (baton rank --group-addr)");
    }
    let mut own = config.clone();
    own.shard = Shard {
        tp_rank: 0,
        tp_size: group.tp,
        layers: Some(stages[0].clone()),
    };
    let collective = if group.tp > 1 {
        Some(Arc::new(ShmGroup::open(
            &segments[0],
            0,
            group.tp,
            COLLECTIVE_VALUES,
            group.collective_timeout,
        )?) as Arc<dyn Collective>)
    } else {
        None
    };
    let mut engine = Engine::load_rank(own, collective)?;
    let mut remote = RemoteGroup::accept_followers(
        &listener,
        &secret,
        group.tp,
        &stages,
        engine.descriptor(),
        group.join_timeout,
        OP_TIMEOUT,
    )?;
    // Every rank must offer the blocks this one plans with: the same operations then fit
    // everywhere or nowhere.
    let total = engine.total_blocks();
    for (i, (_, blocks)) in remote.pools()?.into_iter().enumerate() {
        if blocks != total {
            return Err(Error::InvalidConfig {
                field: "group.pp",
                reason: format!(
                    "rank {} holds {blocks} KV blocks, rank 0 {total}: stages of unequal layer counts size their pools differently; use a stage count that divides the model's {} layers",
                    i + 1,
                    shape.num_layers
                ),
            });
        }
    }
    tracing::info!(
        tp = group.tp,
        pp = group.pp,
        stages = ?stages,
        %addr,
        blocks = total,
        "the group's ranks joined; this worker is rank 0"
    );
    launched.group = Some(remote);
    engine.lead(Box::new(launched))?;
    Ok(engine)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Colocated => "colocated",
    }
}

/// The other ranks as the leading engine sees them, and the processes this worker started
/// (stopped when it drops: their links close and they exit anyway).
struct Launched {
    group: Option<RemoteGroup>,
    /// Process ids of the ranks this worker started; a thread waits on each.
    children: Vec<u32>,
    /// Set when this worker stops its ranks itself.
    stopping: Arc<AtomicBool>,
    segments: Vec<PathBuf>,
}

impl Launched {
    /// Waits on a started rank: a rank that exits while the group serves leaves it unable to
    /// compute anything, so this worker exits too (loudly, non-zero), for its supervisor to
    /// start the whole group again, rather than serve errors.
    fn watch(&mut self, rank: usize, child: Child) {
        let pid = child.id();
        self.children.push(pid);
        let stopping = self.stopping.clone();
        std::thread::spawn(move || {
            // Waits for the exit without reaping it (WNOWAIT): the process id stays this
            // worker's until `Drop` reaps it, so its kill can never reach a reused id.
            // SAFETY: waitid(2) on a child of this process, writing into a zeroed siginfo_t.
            let exited = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                ) == 0
            };
            if !exited || stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::error!(
                rank,
                pid,
                "a rank of this worker's group exited; the group cannot compute without it: this worker exits too"
            );
            std::process::exit(70);
        });
        // The handle is dropped unreaped: the watcher waits on the id, `Drop` reaps it.
        drop(child);
    }

    fn group(&mut self) -> baton_engine::Result<&mut RemoteGroup> {
        self.group
            .as_mut()
            .ok_or(baton_engine::Error::Internal("the group has not formed"))
    }
}

impl Followers for Launched {
    fn apply(&mut self, op: RankOp) -> baton_engine::Result<()> {
        self.group()?.apply(op)
    }

    fn start_step(&mut self, items: &[StepItem]) -> baton_engine::Result<()> {
        self.group()?.start_step(items)
    }

    fn finish_step(
        &mut self,
        items: &[StepItem],
        hidden: Option<Vec<f32>>,
    ) -> baton_engine::Result<Option<Vec<StepOutput>>> {
        self.group()?.finish_step(items, hidden)
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Closing the links ends the ranks' loops; a rank stuck elsewhere is killed (its
        // watcher thread reaps it).
        self.group = None;
        for &pid in &self.children {
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) and waitpid(2) on a child of this process that nothing has
            // reaped yet (its watcher waits with WNOWAIT), so the id is still this child's.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        for s in &self.segments {
            let _ = std::fs::remove_file(s);
        }
    }
}

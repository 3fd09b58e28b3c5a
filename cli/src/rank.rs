//! `baton rank`: one rank of a tensor- and pipeline-parallel worker group, its own process
//! (issue 21). It loads only its shard (its stage's layers, its share of the heads and MLP),
//! joins the group at `--group-addr`, proving the secret in `$BATON_GROUP_SECRET`, and applies
//! what the group's driver sends until the driver closes the link. A rank of a later pipeline
//! stage may run on another host: the driver's address is all it needs.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_engine::{EngineConfig, Role, WeightsSetting};
use baton_group::{RankArgs, SECRET_ENV, serve_rank};

#[derive(clap::Args)]
pub struct RankCliArgs {
    /// The group driver's address (host:port).
    #[arg(long)]
    group_addr: String,
    /// This rank's index, stage-major: stage RANK / TP, tensor-parallel rank RANK % TP.
    #[arg(long)]
    rank: usize,
    /// Tensor-parallel ranks per stage.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// The layers of this rank's stage, FIRST..END (END exclusive).
    #[arg(long, value_parser = layers)]
    layers: Range<usize>,
    /// The stage's shared-memory segment for its all-reduce (every rank of the stage names the
    /// same path; needed with --tp above 1).
    #[arg(long)]
    collective: Option<PathBuf>,
    /// Seconds an all-reduce waits for the stage's other ranks before the group counts as broken.
    #[arg(long, default_value_t = 30)]
    collective_timeout_s: u64,
    /// The model file (every rank of a group loads the same one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Which phases this group serves: prefill, decode or colocated (sets `weights = auto`).
    #[arg(long, default_value = "decode", value_parser = role)]
    role: Role,
    /// How linear-layer weights are held: auto, quantized, f32 or f16.
    #[arg(long, default_value = "auto")]
    weights: WeightsSetting,
    /// KV pool size in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// Tokens per KV block (the same on every rank of a group, and on the groups it trades KV with).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// The whole engine table as JSON, as the group's leading worker passes it to the ranks it
    /// starts (every engine setting then matches the leader's); replaces --model, --weights,
    /// --kv-cache-mib and --block-size.
    #[arg(long, conflicts_with_all = ["model", "weights", "kv_cache_mib", "block_size"])]
    engine_json: Option<String>,
}

fn layers(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not FIRST..END"))?;
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("{s:?}: {x:?}: {e}"))
    };
    Ok(parse(a)?..parse(b)?)
}

fn role(s: &str) -> Result<Role, String> {
    match s {
        "prefill" => Ok(Role::Prefill),
        "decode" => Ok(Role::Decode),
        "colocated" => Ok(Role::Colocated),
        _ => Err(format!("{s:?} is not prefill, decode or colocated")),
    }
}

pub fn run(args: RankCliArgs) -> anyhow::Result<()> {
    let secret = std::env::var(SECRET_ENV)
        .with_context(|| format!("{SECRET_ENV}: the group's secret is not set"))?;
    if secret.len() < 16 {
        bail!("{SECRET_ENV}: the group's secret must be at least 16 characters");
    }
    let config = match &args.engine_json {
        Some(json) => {
            let mut config: EngineConfig =
                serde_json::from_str(json).context("--engine-json: not an engine table")?;
            config.role = args.role;
            config
        }
        None => {
            let model = crate::model_path::resolve(args.model)?;
            let mut config = EngineConfig::new(model, args.role);
            config.weights = args.weights;
            config.kv_cache_bytes = args
                .kv_cache_mib
                .checked_mul(1 << 20)
                .context("--kv-cache-mib: too large")?;
            config.block_size = args.block_size;
            config
        }
    };
    config.validate()?;
    serve_rank(
        config,
        RankArgs {
            group_addr: args.group_addr,
            rank: args.rank,
            tp: args.tp,
            layers: args.layers,
            collective: args.collective,
            collective_timeout: Duration::from_secs(args.collective_timeout_s),
            secret,
            connect_timeout: Duration::from_secs(60),
        },
    )?;
    Ok(())
}

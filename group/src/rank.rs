//! A rank process: loads its shard, connects to its group's driver, proves the group's secret
//! and names its shard, then applies every operation the driver sends and answers it, until the
//! driver closes the link.

use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_collective::{Collective, ShmGroup};
use baton_engine::local_group::RankState;
use baton_engine::{Engine, EngineConfig, Shard};

use crate::wire::{self, Header, ReadError};
use crate::{Error, Result};

/// Values one all-reduce carries; longer ones are split.
pub const COLLECTIVE_VALUES: usize = 1 << 20;

/// Where a rank stands in its group, and how it reaches the driver.
#[derive(Debug, Clone)]
pub struct RankArgs {
    /// The driver's group address.
    pub group_addr: String,
    /// This rank's index in the group, stage-major: stage `rank / tp`, tensor-parallel rank
    /// `rank % tp`.
    pub rank: usize,
    pub tp: usize,
    /// The layers of this rank's stage.
    pub layers: Range<usize>,
    /// The shared segment of this stage's collective (ranks of a stage share a host); needed
    /// when `tp` > 1.
    pub collective: Option<PathBuf>,
    /// How long an all-reduce waits for the stage's other ranks.
    pub collective_timeout: Duration,
    /// The group's secret, proved to the driver.
    pub secret: String,
    /// How long to keep trying to reach the driver (it may start after this rank).
    pub connect_timeout: Duration,
}

/// Runs one rank until its driver closes the link.
pub fn serve_rank(mut config: EngineConfig, args: RankArgs) -> Result<()> {
    if args.tp == 0 {
        return Err(Error::InvalidConfig {
            field: "tp",
            reason: "must be at least 1".into(),
        });
    }
    config.shard = Shard {
        tp_rank: args.rank % args.tp,
        tp_size: args.tp,
        layers: Some(args.layers.clone()),
    };
    let collective = if args.tp > 1 {
        let path = args.collective.as_ref().ok_or(Error::InvalidConfig {
            field: "collective",
            reason: "a tensor-parallel rank needs its stage's shared segment".into(),
        })?;
        Some(Arc::new(ShmGroup::open(
            path,
            args.rank % args.tp,
            args.tp,
            COLLECTIVE_VALUES,
            args.collective_timeout,
        )?) as Arc<dyn Collective>)
    } else {
        None
    };
    let engine = Engine::load_rank(config, collective)?;
    let descriptor = engine.descriptor().clone();
    let stream = connect(&args)?;
    let lost = |e: std::io::Error| Error::RankLost {
        rank: args.rank,
        reason: e.to_string(),
    };
    stream.set_nodelay(true).map_err(lost)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(lost)?);
    let mut writer = BufWriter::new(stream);
    wire::write_frame(
        &mut writer,
        &Header::Hello {
            rank: args.rank,
            secret: args.secret.clone(),
            descriptor,
        },
        &[],
    )
    .map_err(lost)?;
    match wire::read_frame_within(&mut reader, wire::MAX_HELLO_HEADER, 0) {
        Ok((Header::Welcome, _)) => {}
        Ok((Header::Refused { reason }, _)) => {
            return Err(Error::Refused {
                rank: args.rank,
                reason,
            });
        }
        Ok(_) => return Err(bad(args.rank, "expected a welcome")),
        Err(ReadError::Closed(e)) => return Err(lost(e)),
        Err(ReadError::Bad(e)) => return Err(bad(args.rank, &e)),
    }
    tracing::info!(rank = args.rank, tp = args.tp, layers = ?args.layers, "rank joined its group");
    let mut state = RankState::new(engine);
    loop {
        let (header, payload) = match wire::read_frame(&mut reader) {
            Ok(frame) => frame,
            // The driver closed the link: the group is done (or its driver died).
            Err(ReadError::Closed(_)) => return Ok(()),
            Err(ReadError::Bad(e)) => return Err(bad(args.rank, &e)),
        };
        let op = wire::op_of(header, payload).map_err(|e| bad(args.rank, &e))?;
        match state.apply(op) {
            Ok(reply) => {
                let (header, parts) = wire::reply_frame(reply);
                let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                wire::write_frame(&mut writer, &header, &parts).map_err(lost)?;
            }
            Err(e) => {
                let header = Header::Failed {
                    class: e.class().as_str().to_string(),
                    message: e.to_string(),
                };
                wire::write_frame(&mut writer, &header, &[]).map_err(lost)?;
                // A broken collective cannot recover: this rank's stage is done.
                if matches!(e, baton_engine::Error::Collective(_)) {
                    return Err(e.into());
                }
            }
        }
    }
}

fn bad(rank: usize, reason: &str) -> Error {
    Error::BadFrame {
        rank,
        reason: reason.to_string(),
    }
}

/// Connects to the driver, retrying while it may still be starting.
fn connect(args: &RankArgs) -> Result<TcpStream> {
    let deadline = Instant::now() + args.connect_timeout;
    let mut wait = Duration::from_millis(20);
    loop {
        match TcpStream::connect(&args.group_addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::RankLost {
                    rank: args.rank,
                    reason: format!("cannot reach the group at {}: {e}", args.group_addr),
                });
            }
            // Backing off between tries: the driver listens before it starts its ranks, but a
            // rank on another host may be started first.
            Err(_) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
}

//! The driver's side of a group: waits for its ranks to join, checks each one's shard against
//! the group, then gives every rank the same operations and gathers their replies.

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_core::LayoutDescriptor;
use baton_engine::kv::BlockId;
use baton_engine::local_group::{RankOp, RankReply};
use baton_engine::{SeqId, StepItem, StepOutput};

use crate::wire::{self, Header, ReadError};
use crate::{Error, Result};

/// How long a connecting rank has to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

struct Link {
    rank: usize,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

/// A group of rank processes, `tp` per stage, driven over one link each.
pub struct RemoteGroup {
    /// Ranks `first..`, stage-major, as ranks number themselves.
    links: Vec<Link>,
    /// 0 when every rank is a process here; 1 when rank 0 is the driving engine itself
    /// ([`RemoteGroup::accept_followers`]).
    first: usize,
    tp: usize,
    descriptors: Vec<LayoutDescriptor>,
}

/// The group's shape, to check joining ranks against.
struct Expected<'a> {
    tp: usize,
    stages: &'a [Range<usize>],
    secret: &'a str,
}

impl Expected<'_> {
    fn ranks(&self) -> usize {
        self.tp * self.stages.len()
    }

    /// Why rank `rank`'s shard does not fit, if it does not.
    fn misfit(
        &self,
        rank: usize,
        secret: &str,
        d: &LayoutDescriptor,
        first: Option<&LayoutDescriptor>,
    ) -> Option<String> {
        if !constant_time_eq(secret.as_bytes(), self.secret.as_bytes()) {
            return Some("wrong group secret".into());
        }
        if rank >= self.ranks() {
            return Some(format!(
                "rank {rank} is not one of this group's {}",
                self.ranks()
            ));
        }
        let stage = &self.stages[rank / self.tp];
        let layers = stage.start as u32..stage.end as u32;
        if d.layers != layers {
            return Some(format!(
                "holds layers {:?}, its stage runs {layers:?}",
                d.layers
            ));
        }
        let per = d.num_kv_heads / self.tp as u32;
        let r = (rank % self.tp) as u32;
        if d.kv_heads != (per * r..per * (r + 1)) {
            return Some(format!(
                "holds kv heads {:?}, tensor-parallel rank {r} of {} holds {:?}",
                d.kv_heads,
                self.tp,
                per * r..per * (r + 1)
            ));
        }
        if let Some(f) = first
            && (f.fingerprint != d.fingerprint
                || f.dtype != d.dtype
                || f.block_size != d.block_size
                || f.num_layers != d.num_layers)
        {
            return Some("another model or KV layout than the group's other ranks".into());
        }
        None
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl RemoteGroup {
    /// Waits on `listener` until all `tp x stages.len()` ranks joined, each proving `secret`
    /// and holding the shard its rank index says; a rank that does not fit is refused (and told
    /// why) and the group keeps waiting for the right one, until `timeout`. Every later
    /// operation waits at most `op_timeout` for a rank's reply.
    pub fn accept(
        listener: &TcpListener,
        secret: &str,
        tp: usize,
        stages: &[Range<usize>],
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<RemoteGroup> {
        Self::accept_from(listener, secret, tp, stages, 0, timeout, op_timeout)
    }

    /// Like [`RemoteGroup::accept`] for the ranks after 0: rank 0 is the engine that leads the
    /// group ([`baton_engine::Engine::lead`] with this as its followers), `leader` its layout,
    /// checked against the group like the others'.
    pub fn accept_followers(
        listener: &TcpListener,
        secret: &str,
        tp: usize,
        stages: &[Range<usize>],
        leader: &LayoutDescriptor,
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<RemoteGroup> {
        let expected = Expected { tp, stages, secret };
        if let Some(reason) = expected.misfit(0, secret, leader, None) {
            return Err(Error::Refused { rank: 0, reason });
        }
        let mut group = Self::accept_from(listener, secret, tp, stages, 1, timeout, op_timeout)?;
        if group.descriptors.iter().any(|d| {
            d.fingerprint != leader.fingerprint
                || d.dtype != leader.dtype
                || d.block_size != leader.block_size
        }) {
            return Err(Error::Refused {
                rank: 1,
                reason: "another model or KV layout than the leader's".into(),
            });
        }
        group.descriptors.insert(0, leader.clone());
        Ok(group)
    }

    fn accept_from(
        listener: &TcpListener,
        secret: &str,
        tp: usize,
        stages: &[Range<usize>],
        first: usize,
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<RemoteGroup> {
        if tp == 0 || stages.is_empty() {
            return Err(Error::InvalidConfig {
                field: "group",
                reason: "a group needs at least one stage of at least one rank".into(),
            });
        }
        let expected = Expected { tp, stages, secret };
        let n = expected.ranks();
        let wake_addr = listener.local_addr().map_err(|e| Error::InvalidConfig {
            field: "group_addr",
            reason: e.to_string(),
        })?;
        let accepting = listener.try_clone().map_err(|e| Error::InvalidConfig {
            field: "group_addr",
            reason: e.to_string(),
        })?;
        // Accepting blocks; a thread does it and hands each connection over, and ends when this
        // side stops listening (its next send fails; a last connection wakes it).
        let (tx, rx) = mpsc::sync_channel::<TcpStream>(n);
        let acceptor = std::thread::spawn(move || {
            for conn in accepting.incoming() {
                let Ok(stream) = conn else { continue };
                if tx.send(stream).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<(Link, LayoutDescriptor)>> = (0..n).map(|_| None).collect();
        let result = loop {
            if links[first..].iter().all(Option::is_some) {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let stream = match rx.recv_timeout(left) {
                Ok(s) => s,
                Err(_) => {
                    let missing = (first..n).find(|&r| links[r].is_none()).unwrap_or(first);
                    break Err(Error::RankLost {
                        rank: missing,
                        reason: format!("did not join the group within {timeout:?}"),
                    });
                }
            };
            let first_joined = links.iter().flatten().map(|(_, d)| d).next().cloned();
            match join(stream, &expected, first_joined.as_ref(), &links, first) {
                Ok((link, d)) => {
                    let r = link.rank;
                    links[r] = Some((link, d));
                }
                Err(reason) => tracing::warn!(%reason, "a rank was refused by its group"),
            }
        };
        drop(rx);
        let _ = TcpStream::connect(wake_addr);
        let _ = acceptor.join();
        result?;
        let (links, descriptors): (Vec<_>, Vec<_>) = links.into_iter().flatten().unzip();
        for l in &links {
            let lost = |e: std::io::Error| Error::RankLost {
                rank: l.rank,
                reason: e.to_string(),
            };
            l.writer
                .get_ref()
                .set_read_timeout(Some(op_timeout))
                .map_err(lost)?;
        }
        Ok(RemoteGroup {
            links,
            first,
            tp,
            descriptors,
        })
    }

    /// Every rank's layout, stage-major: the shards a transfer plan maps.
    pub fn descriptors(&self) -> &[LayoutDescriptor] {
        &self.descriptors
    }

    /// Sends `op()` to ranks `ranks` and waits for every reply.
    fn call(&mut self, ranks: Range<usize>, op: impl Fn() -> RankOp) -> Result<Vec<RankReply>> {
        self.send(ranks.clone(), op)?;
        self.receive(ranks)
    }

    /// The links of ranks `ranks`.
    fn links(&mut self, ranks: Range<usize>) -> &mut [Link] {
        let first = self.first;
        &mut self.links[ranks.start - first..ranks.end - first]
    }

    fn send(&mut self, ranks: Range<usize>, op: impl Fn() -> RankOp) -> Result<()> {
        for l in self.links(ranks) {
            let (header, payload) = wire::op_frame(op());
            wire::write_frame(&mut l.writer, &header, &[&payload]).map_err(|e| {
                Error::RankLost {
                    rank: l.rank,
                    reason: e.to_string(),
                }
            })?;
        }
        Ok(())
    }

    /// Reads a reply from each of ranks `ranks`.
    fn receive(&mut self, ranks: Range<usize>) -> Result<Vec<RankReply>> {
        let mut replies = Vec::with_capacity(ranks.len());
        // Every reply is read, even after one failed, so the links stay in step.
        let mut failed = None;
        for l in self.links(ranks) {
            let rank = l.rank;
            let reply = match wire::read_frame(&mut l.reader) {
                Ok((h, p)) => match wire::reply_of(h, p) {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err((class, message))) => Err(Error::Rank {
                        rank,
                        class,
                        message,
                    }),
                    Err(reason) => Err(Error::BadFrame { rank, reason }),
                },
                Err(ReadError::Closed(e)) => Err(Error::RankLost {
                    rank,
                    reason: e.to_string(),
                }),
                Err(ReadError::Bad(reason)) => Err(Error::BadFrame { rank, reason }),
            };
            match reply {
                Ok(r) => replies.push(r),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    fn all(&mut self, op: impl Fn() -> RankOp) -> Result<Vec<RankReply>> {
        let n = self.first + self.links.len();
        self.call(self.first..n, op)
    }

    /// Ranks in the group, the leader included.
    fn ranks(&self) -> usize {
        self.first + self.links.len()
    }

    /// A stage's step replies: every rank's hidden states must agree (`own`, the leader's, too).
    fn stage_result(
        &self,
        first: usize,
        replies: Vec<RankReply>,
        own: Option<&Option<Vec<f32>>>,
    ) -> Result<(Vec<StepOutput>, Option<Vec<f32>>)> {
        let mut results = replies
            .into_iter()
            .map(|r| match r {
                RankReply::Stepped(out, h) => Ok((out, h)),
                _ => Err(unexpected()),
            })
            .collect::<Result<Vec<_>>>()?;
        let reference = own.or(results.first().map(|(_, h)| h));
        if results.iter().any(|(_, h)| Some(h) != reference) {
            return Err(Error::Rank {
                rank: first,
                class: baton_core::ErrorClass::Internal,
                message: "the tensor-parallel ranks of a stage computed different hidden states"
                    .into(),
            });
        }
        if results.is_empty() {
            return Ok((Vec::new(), own.cloned().flatten()));
        }
        Ok(results.swap_remove(0))
    }

    pub fn add_sequence(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        self.all(|| RankOp::Add(id, tokens.to_vec())).map(drop)
    }

    pub fn push_token(&mut self, id: SeqId, token: u32) -> Result<()> {
        self.all(|| RankOp::Push(id, token)).map(drop)
    }

    pub fn release(&mut self, id: SeqId) -> Result<()> {
        self.all(|| RankOp::Release(id)).map(drop)
    }

    /// Reserves blocks on every rank for a sequence whose KV another group writes; returns each
    /// rank's blocks.
    pub fn reserve(&mut self, id: SeqId, tokens: usize) -> Result<Vec<Vec<BlockId>>> {
        self.all(|| RankOp::Reserve(id, tokens))?
            .into_iter()
            .map(blocks)
            .collect()
    }

    pub fn adopt(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        self.all(|| RankOp::Adopt(id, tokens.to_vec())).map(drop)
    }

    pub fn block_ids(&mut self, id: SeqId) -> Result<Vec<Vec<BlockId>>> {
        self.all(|| RankOp::Blocks(id))?
            .into_iter()
            .map(blocks)
            .collect()
    }

    /// Free and total blocks of every rank's pool.
    pub fn pools(&mut self) -> Result<Vec<(usize, usize)>> {
        self.all(|| RankOp::Pool)?
            .into_iter()
            .map(|r| match r {
                RankReply::Pool(free, total) => Ok((free, total)),
                _ => Err(unexpected()),
            })
            .collect()
    }

    /// One step through every stage; the outputs of the last stage's rank 0. Every rank is a
    /// process here (a group from [`RemoteGroup::accept`]).
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>> {
        if self.first != 0 {
            return Err(Error::InvalidConfig {
                field: "group",
                reason: "a group with a leading engine steps through it".into(),
            });
        }
        self.later_stages(items, 0, None).map(|(out, _)| out)
    }

    /// Runs stages from the one starting at rank `from` to the last, the first of them from
    /// `hidden`; the last stage's rank 0 outputs, and the hidden states that went into it.
    fn later_stages(
        &mut self,
        items: &[StepItem],
        from: usize,
        mut hidden: Option<Vec<f32>>,
    ) -> Result<(Vec<StepOutput>, Option<Vec<f32>>)> {
        let mut outputs = Vec::new();
        for first in (from..self.ranks()).step_by(self.tp) {
            let replies = self.call(first..first + self.tp, || {
                RankOp::Step(items.to_vec(), hidden.clone())
            })?;
            let (out, h) = self.stage_result(first, replies, None)?;
            hidden = h;
            outputs = out;
        }
        Ok((outputs, hidden))
    }
}

impl baton_engine::Followers for RemoteGroup {
    fn apply(&mut self, op: RankOp) -> baton_engine::Result<()> {
        self.all(|| op.clone()).map(drop).map_err(engine_error)
    }

    fn start_step(&mut self, items: &[StepItem]) -> baton_engine::Result<()> {
        let peers = self.first..self.tp;
        self.send(peers, || RankOp::Step(items.to_vec(), None))
            .map_err(engine_error)
    }

    fn finish_step(
        &mut self,
        items: &[StepItem],
        hidden: Option<Vec<f32>>,
    ) -> baton_engine::Result<Option<Vec<StepOutput>>> {
        let run = |g: &mut Self| -> Result<Option<Vec<StepOutput>>> {
            let replies = g.receive(g.first..g.tp)?;
            g.stage_result(0, replies, Some(&hidden))?;
            if g.ranks() == g.tp {
                return Ok(None);
            }
            let (out, _) = g.later_stages(items, g.tp, hidden.clone())?;
            Ok(Some(out))
        };
        run(self).map_err(engine_error)
    }
}

/// A group failure as the leading engine reports it.
fn engine_error(e: Error) -> baton_engine::Error {
    tracing::error!(error = %e, "a rank of the group failed");
    match e {
        Error::Engine(e) => e,
        _ => baton_engine::Error::GroupBroken,
    }
}

fn unexpected() -> Error {
    Error::BadFrame {
        rank: 0,
        reason: "a rank answered another operation".into(),
    }
}

fn blocks(r: RankReply) -> Result<Vec<BlockId>> {
    match r {
        RankReply::Blocks(b) => Ok(b),
        _ => Err(unexpected()),
    }
}

/// Reads a joining rank's hello and checks it; welcomes it, or tells it why not.
fn join(
    stream: TcpStream,
    expected: &Expected<'_>,
    first: Option<&LayoutDescriptor>,
    joined: &[Option<(Link, LayoutDescriptor)>],
    lowest: usize,
) -> std::result::Result<(Link, LayoutDescriptor), String> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| format!("{peer}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| format!("{peer}: {e}"))?);
    let mut writer = BufWriter::new(stream);
    let (rank, secret, descriptor) =
        match wire::read_frame_within(&mut reader, wire::MAX_HELLO_HEADER, 0) {
            Ok((
                Header::Hello {
                    rank,
                    secret,
                    descriptor,
                },
                payload,
            )) if payload.is_empty() => (rank, secret, descriptor),
            Ok(_) => return Err(format!("{peer}: its first frame is not a hello")),
            Err(ReadError::Closed(e)) => return Err(format!("{peer}: {e}")),
            Err(ReadError::Bad(e)) => return Err(format!("{peer}: {e}")),
        };
    let misfit = expected
        .misfit(rank, &secret, &descriptor, first)
        .or_else(|| (rank < lowest).then(|| format!("rank {rank} is the group's leader")))
        .or_else(|| {
            joined
                .get(rank)
                .is_some_and(Option::is_some)
                .then(|| format!("rank {rank} already joined"))
        });
    if let Some(reason) = misfit {
        let _ = wire::write_frame(
            &mut writer,
            &Header::Refused {
                reason: reason.clone(),
            },
            &[],
        );
        return Err(format!("{peer} as rank {rank}: {reason}"));
    }
    wire::write_frame(&mut writer, &Header::Welcome, &[]).map_err(|e| format!("{peer}: {e}"))?;
    Ok((
        Link {
            rank,
            reader,
            writer,
        },
        descriptor,
    ))
}

//! A push job's sender: the task that owns the prefill side of one push handoff once the
//! engine thread has produced its bytes. It writes the layers in the order they come, keeps the
//! decode worker's lease alive while the prompt waits or computes, sends the completion (the
//! first token) after the last layer, and reports a failed write to the engine thread. The
//! decisions are `handoff::Push`'s; this is its IO shell.
//!
//! engine thread --Outgoing (bounded: a slow link slows the compute)--> [sender] --Peer--> decode

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::HandoffId;
use baton_kv_transfer::agent::Peer;
use baton_kv_transfer::wire::{LandedRange, Notice};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::engine_loop::PrefillEngine;
use crate::handoff::{Push, PushAction, PushEvent};
use crate::metrics::KvCounters;

/// What the engine thread hands a push job's sender, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// Bytes of `layer` for the decode worker's pool (tcp, or shm without its memory mapped).
    Write {
        layer: u32,
        pieces: Vec<(u64, Vec<u8>)>,
    },
    /// Ranges of `layer` the engine thread copied straight into the decode worker's memory.
    Landed {
        layer: u32,
        ranges: Vec<LandedRange>,
    },
    /// The prompt is done: the first token (already answered to the coordinator) follows the
    /// last layer to the decode worker.
    Complete {
        first_token: u32,
        compute_done: Instant,
    },
    /// The job failed or its caller went away: nothing more will come.
    Abort { reason: String },
    /// The decode worker cancelled and the engine thread dropped the job.
    Stopped,
}

/// Runs one push handoff's sender until the handoff ends.
pub async fn run(
    peer: Peer,
    handoff: HandoffId,
    ttl: Duration,
    mut outgoing: mpsc::Receiver<Outgoing>,
    engine: PrefillEngine,
    counters: Arc<KvCounters>,
) {
    let mut machine = Push::new(Instant::now(), ttl);
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let mut completion = None;
    loop {
        let wake = machine.next_wakeup();
        let sleep = baton_worker::sleep_until(wake);
        let event = tokio::select! {
            item = outgoing.recv() => match item {
                // The engine thread dropped the job without a word: its caller went away.
                None => PushEvent::CallerGone,
                Some(Outgoing::Write { layer, pieces }) => {
                    first.get_or_insert_with(Instant::now);
                    match peer.write(handoff, layer, &pieces).await {
                        Ok(n) => {
                            bytes += n;
                            continue;
                        }
                        Err(e) => PushEvent::TransferFailed { reason: e.to_string() },
                    }
                }
                Some(Outgoing::Landed { layer, ranges }) => {
                    first.get_or_insert_with(Instant::now);
                    let n: u64 = ranges.iter().map(|r| r.len).sum();
                    match peer.landed(handoff, layer, ranges).await {
                        Ok(()) => {
                            bytes += n;
                            continue;
                        }
                        Err(e) => PushEvent::TransferFailed { reason: e.to_string() },
                    }
                }
                Some(Outgoing::Complete { first_token, compute_done }) => {
                    completion = Some((first_token, compute_done));
                    PushEvent::Sampled
                }
                Some(Outgoing::Abort { reason }) => {
                    let _ = peer.notify(handoff, &Notice::Abort { reason }).await;
                    return;
                }
                Some(Outgoing::Stopped) => PushEvent::Stopped,
            },
            () = sleep => PushEvent::Tick,
        };
        let now = Instant::now();
        for action in machine.step(now, event) {
            match action {
                PushAction::Keepalive => {
                    // A lost keepalive is covered by the next two before the lease ends.
                    let _ = peer.notify(handoff, &Notice::Keepalive).await;
                }
                PushAction::Complete => {
                    let Some((first_token, compute_done)) = completion else {
                        continue;
                    };
                    let exposed = now.saturating_duration_since(compute_done);
                    let transfer =
                        first.map_or(Duration::ZERO, |f| now.saturating_duration_since(f));
                    let message = baton_proto::v1::HandoffCompletion {
                        first_token_id: first_token,
                        exposed_seconds: exposed.as_secs_f64(),
                    }
                    .encode_to_vec();
                    let sent = peer
                        .notify(
                            handoff,
                            &Notice::Complete {
                                bytes,
                                transfer_us: transfer.as_micros() as u64,
                                completion: message,
                            },
                        )
                        .await;
                    match sent {
                        Ok(()) => counters.sent(bytes, transfer, exposed),
                        Err(e) => {
                            counters.failed();
                            tracing::warn!(%handoff, error = %e, "kv completion not sent");
                        }
                    }
                }
                PushAction::FailJob { reason } => {
                    counters.failed();
                    engine.send_failed(handoff, reason).await;
                }
                PushAction::Abort { reason } => {
                    let _ = peer.notify(handoff, &Notice::Abort { reason }).await;
                }
                PushAction::Stopped => {
                    let _ = peer.notify(handoff, &Notice::Stopped).await;
                }
            }
        }
        if machine.next_wakeup().is_none() {
            return;
        }
    }
}

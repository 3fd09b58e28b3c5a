//! The frames of a rank link: a JSON header (the operation or reply, small) and a payload of
//! f32 values beside it (hidden states, logits: large, so never JSON).
//!
//! ```text
//! [u32 header bytes][u32 payload values][header: JSON Header][payload: f32 little-endian]
//! ```
//!
//! Every length is checked against a bound before anything is allocated: bytes a peer sent
//! never panic or exhaust memory.

use std::io::{Read, Write};

use baton_core::{ErrorClass, LayoutDescriptor};
use baton_engine::local_group::{RankOp, RankReply};
use serde::{Deserialize, Serialize};

/// Largest header accepted (an operation's token ids and block lists).
pub const MAX_HEADER: usize = 16 << 20;
/// Most payload values accepted (a long prefill chunk's hidden states, logits).
pub const MAX_VALUES: usize = 1 << 28;

/// What a frame's header says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Header {
    /// A rank's first frame: which rank it is, the group's secret, and the shard it loaded.
    Hello {
        rank: usize,
        secret: String,
        descriptor: LayoutDescriptor,
    },
    /// The driver accepted the rank.
    Welcome,
    /// The driver refused the rank, and why; the link closes.
    Refused { reason: String },
    /// An operation; a step's hidden states are the payload.
    Op(RankOp),
    /// A reply; the payload is the step's hidden states (`hidden` values), then each output's
    /// logits (`logits`: output index and length), in that order.
    Reply {
        reply: RankReply,
        hidden: usize,
        logits: Vec<(usize, usize)>,
    },
    /// The operation failed on the rank.
    Failed { class: String, message: String },
}

/// A frame that could not be read: the link is gone, or the peer sent something else.
#[derive(Debug)]
pub enum ReadError {
    Closed(std::io::Error),
    Bad(String),
}

pub fn write_frame(w: &mut impl Write, header: &Header, payload: &[&[f32]]) -> std::io::Result<()> {
    let json = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let values: usize = payload.iter().map(|p| p.len()).sum();
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&(values as u32).to_le_bytes())?;
    w.write_all(&json)?;
    let mut bytes = Vec::with_capacity(values * 4);
    for part in payload {
        for v in *part {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    w.write_all(&bytes)?;
    w.flush()
}

/// Largest header of a hello or its answer: what a peer may send before it proved the secret.
pub const MAX_HELLO_HEADER: usize = 64 << 10;

pub fn read_frame(r: &mut impl Read) -> Result<(Header, Vec<f32>), ReadError> {
    read_frame_within(r, MAX_HEADER, MAX_VALUES)
}

/// Reads a frame no larger than `max_header` header bytes and `max_values` payload values: a
/// hello is read within [`MAX_HELLO_HEADER`] and no values, so a peer that has not proved the
/// group's secret makes this side allocate next to nothing.
pub fn read_frame_within(
    r: &mut impl Read,
    max_header: usize,
    max_values: usize,
) -> Result<(Header, Vec<f32>), ReadError> {
    let mut lens = [0u8; 8];
    r.read_exact(&mut lens).map_err(ReadError::Closed)?;
    let header_len = u32::from_le_bytes([lens[0], lens[1], lens[2], lens[3]]) as usize;
    let values = u32::from_le_bytes([lens[4], lens[5], lens[6], lens[7]]) as usize;
    if header_len > max_header || values > max_values {
        return Err(ReadError::Bad(format!(
            "a frame of {header_len} header bytes and {values} values is larger than allowed"
        )));
    }
    let mut json = vec![0u8; header_len];
    r.read_exact(&mut json).map_err(ReadError::Closed)?;
    let header: Header =
        serde_json::from_slice(&json).map_err(|e| ReadError::Bad(format!("header: {e}")))?;
    let mut bytes = vec![0u8; values * 4];
    r.read_exact(&mut bytes).map_err(ReadError::Closed)?;
    let payload = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((header, payload))
}

/// An operation as a frame: the hidden states of a step move to the payload.
pub fn op_frame(op: RankOp) -> (Header, Vec<f32>) {
    match op {
        RankOp::Step(items, hidden) => (
            Header::Op(RankOp::Step(items, None)),
            hidden.unwrap_or_default(),
        ),
        op => (Header::Op(op), Vec::new()),
    }
}

/// The operation a frame carries, with its payload put back.
pub fn op_of(header: Header, payload: Vec<f32>) -> Result<RankOp, String> {
    match header {
        Header::Op(RankOp::Step(items, _)) => Ok(RankOp::Step(
            items,
            (!payload.is_empty()).then_some(payload),
        )),
        Header::Op(op) if payload.is_empty() => Ok(op),
        Header::Op(_) => Err("an operation other than a step carries values".into()),
        other => Err(format!("expected an operation, got {}", name(&other))),
    }
}

/// A reply as a frame: hidden states and logits move to the payload.
pub fn reply_frame(reply: RankReply) -> (Header, Vec<Vec<f32>>) {
    match reply {
        RankReply::Stepped(mut outputs, hidden) => {
            let mut payload = Vec::new();
            let hidden_len = hidden.as_ref().map_or(0, Vec::len);
            if let Some(h) = hidden {
                payload.push(h);
            }
            let mut logits = Vec::new();
            for (i, o) in outputs.iter_mut().enumerate() {
                if let Some(l) = o.logits.take() {
                    logits.push((i, l.len()));
                    payload.push(l);
                }
            }
            (
                Header::Reply {
                    reply: RankReply::Stepped(outputs, None),
                    hidden: hidden_len,
                    logits,
                },
                payload,
            )
        }
        reply => (
            Header::Reply {
                reply,
                hidden: 0,
                logits: Vec::new(),
            },
            Vec::new(),
        ),
    }
}

/// What a reply frame says: the reply with its payload put back, or the rank's error.
pub fn reply_of(
    header: Header,
    payload: Vec<f32>,
) -> Result<Result<RankReply, (ErrorClass, String)>, String> {
    match header {
        Header::Reply {
            reply,
            hidden,
            logits,
        } => {
            let wanted = logits
                .iter()
                .try_fold(hidden, |n, (_, l)| n.checked_add(*l))
                .ok_or("payload lengths overflow")?;
            if wanted != payload.len() {
                return Err(format!(
                    "the header names {wanted} values, the payload holds {}",
                    payload.len()
                ));
            }
            match reply {
                RankReply::Stepped(mut outputs, _) => {
                    let h = payload[..hidden].to_vec();
                    let mut at = hidden;
                    let count = outputs.len();
                    for (i, len) in logits {
                        let o = outputs
                            .get_mut(i)
                            .ok_or_else(|| format!("logits for output {i} of {count}"))?;
                        o.logits = Some(payload[at..at + len].to_vec());
                        at += len;
                    }
                    Ok(Ok(RankReply::Stepped(outputs, (hidden > 0).then_some(h))))
                }
                reply if wanted == 0 => Ok(Ok(reply)),
                _ => Err("a reply other than a step carries values".into()),
            }
        }
        Header::Failed { class, message } => {
            let class = ErrorClass::ALL
                .into_iter()
                .find(|c| c.as_str() == class)
                .unwrap_or(ErrorClass::Internal);
            Ok(Err((class, message)))
        }
        other => Err(format!("expected a reply, got {}", name(&other))),
    }
}

fn name(h: &Header) -> &'static str {
    match h {
        Header::Hello { .. } => "a hello",
        Header::Welcome => "a welcome",
        Header::Refused { .. } => "a refusal",
        Header::Op(_) => "an operation",
        Header::Reply { .. } => "a reply",
        Header::Failed { .. } => "a failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_engine::{Phase, SeqId, StepItem, StepOutput};

    #[test]
    fn a_step_and_its_reply_round_trip_with_their_values() {
        let item = StepItem {
            seq: SeqId(3),
            tokens: 2,
            phase: Phase::Prefill,
        };
        let (h, p) = op_frame(RankOp::Step(vec![item], Some(vec![1.0, -2.5])));
        let mut buf = Vec::new();
        write_frame(&mut buf, &h, &[&p]).expect("write");
        let (h, p) = read_frame(&mut buf.as_slice())
            .map_err(|_| "read")
            .expect("read");
        assert_eq!(
            op_of(h, p).expect("op"),
            RankOp::Step(vec![item], Some(vec![1.0, -2.5]))
        );

        let outputs = vec![
            StepOutput {
                seq: SeqId(3),
                logits: None,
            },
            StepOutput {
                seq: SeqId(4),
                logits: Some(vec![0.5; 7]),
            },
        ];
        let (h, parts) = reply_frame(RankReply::Stepped(outputs, Some(vec![9.0; 3])));
        let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let mut buf = Vec::new();
        write_frame(&mut buf, &h, &parts).expect("write");
        let (h, p) = read_frame(&mut buf.as_slice())
            .map_err(|_| "read")
            .expect("read");
        let Ok(Ok(RankReply::Stepped(out, hidden))) = reply_of(h, p) else {
            panic!("not a step reply");
        };
        assert_eq!(hidden, Some(vec![9.0; 3]));
        assert_eq!(out[0].logits, None);
        assert_eq!(out[1].logits, Some(vec![0.5; 7]));
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        // Lengths over the bounds, a truncated frame, a header that is not JSON, a payload the
        // header does not account for.
        let mut huge = Vec::new();
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(ReadError::Bad(_))
        ));
        let mut short = Vec::new();
        short.extend_from_slice(&10u32.to_le_bytes());
        short.extend_from_slice(&0u32.to_le_bytes());
        short.extend_from_slice(b"{\"Op");
        assert!(matches!(
            read_frame(&mut short.as_slice()),
            Err(ReadError::Closed(_))
        ));
        let mut junk = Vec::new();
        junk.extend_from_slice(&3u32.to_le_bytes());
        junk.extend_from_slice(&0u32.to_le_bytes());
        junk.extend_from_slice(b"!!!");
        assert!(matches!(
            read_frame(&mut junk.as_slice()),
            Err(ReadError::Bad(_))
        ));
        let liar = Header::Reply {
            reply: RankReply::Stepped(Vec::new(), None),
            hidden: 0,
            logits: vec![(5, 3)],
        };
        assert!(reply_of(liar, vec![1.0, 2.0, 3.0]).is_err());
        assert!(op_of(Header::Op(RankOp::Pool), vec![1.0]).is_err());
    }
}

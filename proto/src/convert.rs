//! Conversions between wire messages and the domain types of the crates that use them.
//!
//! Always: sampling parameters, sampled tokens and finish reasons (`baton-text`, which the
//! coordinator uses too). With the `workers` feature: layout descriptors (`baton-core`) and KV
//! endpoints (`baton-kv-transfer`), which only workers need; the coordinator passes those through
//! as opaque messages and so never links the transports.

use baton_text::{FinishReason, SampledToken, SamplingParams};

use crate::v1;

/// A message that cannot become a domain value; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: &'static str,
    pub reason: String,
}

/// Unset fields take [`SamplingParams::default`]'s values (greedy, 16 tokens); validation
/// happens after, against the server's limits.
/// A call's `grpc-timeout` (gRPC over HTTP/2: 1 to 8 digits and a unit H, M, S, m, u or n),
/// when it carries a valid one.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn sampling_from_proto(p: Option<&v1::SamplingParams>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(p) = p else { return d };
    SamplingParams {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.filter(|k| *k > 0),
        top_p: p.top_p.unwrap_or(d.top_p),
        min_p: p.min_p.unwrap_or(d.min_p),
        repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: p.seed,
        max_new_tokens: p.max_tokens.unwrap_or(d.max_new_tokens),
        stop_token_ids: p.stop_token_ids.clone(),
        stop_strings: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    }
}

pub fn sampling_to_proto(p: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: Some(p.temperature),
        top_p: Some(p.top_p),
        top_k: p.top_k,
        min_p: Some(p.min_p),
        repetition_penalty: Some(p.repetition_penalty),
        presence_penalty: Some(p.presence_penalty),
        frequency_penalty: Some(p.frequency_penalty),
        seed: p.seed,
        max_tokens: Some(p.max_new_tokens),
        stop: p.stop_strings.clone(),
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    }
}

pub fn token_to_proto(t: &SampledToken) -> v1::SampledToken {
    v1::SampledToken {
        token_id: t.id,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|&(token_id, logprob)| v1::TopLogprob { token_id, logprob })
            .collect(),
    }
}

pub fn token_from_proto(t: &v1::SampledToken) -> SampledToken {
    SampledToken {
        id: t.token_id,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|l| (l.token_id, l.logprob))
            .collect(),
    }
}

pub fn finish_to_proto(r: FinishReason) -> v1::FinishReason {
    match r {
        FinishReason::Stop => v1::FinishReason::Stop,
        FinishReason::Length => v1::FinishReason::Length,
    }
}

/// `None` for reasons a generation that finished normally never has (cancelled, error,
/// unspecified or unknown).
pub fn finish_from_proto(r: i32) -> Option<FinishReason> {
    match v1::FinishReason::try_from(r) {
        Ok(v1::FinishReason::Stop) => Some(FinishReason::Stop),
        Ok(v1::FinishReason::Length) => Some(FinishReason::Length),
        _ => None,
    }
}

/// A worker's KV events for the wire.
pub fn kv_events_to_proto(e: &baton_core::KvEvents) -> v1::KvEvents {
    use baton_core::KvEvent;
    v1::KvEvents {
        epoch: e.epoch,
        reset: e.reset,
        next: e.next,
        events: e
            .events
            .iter()
            .map(|ev| match ev {
                KvEvent::Stored(h) => v1::KvEvent {
                    block_hash: h.0.to_vec(),
                    removed: false,
                },
                KvEvent::Removed(h) => v1::KvEvent {
                    block_hash: h.0.to_vec(),
                    removed: true,
                },
            })
            .collect(),
    }
}

/// A worker's KV events as it sent them; a block name that is not 16 bytes refuses the lot.
pub fn kv_events_from_proto(e: &v1::KvEvents) -> Result<baton_core::KvEvents, ConvertError> {
    use baton_core::{BlockHash, KvEvent};
    let events = e
        .events
        .iter()
        .map(|ev| {
            let hash = <[u8; 16]>::try_from(ev.block_hash.as_slice())
                .map(BlockHash)
                .map_err(|_| ConvertError {
                    field: "kv_events.block_hash",
                    reason: format!("{} bytes, expected 16", ev.block_hash.len()),
                })?;
            Ok(if ev.removed {
                KvEvent::Removed(hash)
            } else {
                KvEvent::Stored(hash)
            })
        })
        .collect::<Result<_, ConvertError>>()?;
    Ok(baton_core::KvEvents {
        epoch: e.epoch,
        reset: e.reset,
        next: e.next,
        events,
    })
}

#[cfg(feature = "workers")]
mod workers {
    use std::net::SocketAddr;

    use baton_core::{BlockId, Fingerprint, KvDType, LayoutDescriptor, WorkerId};
    use baton_kv_transfer::Endpoint;
    use baton_kv_transfer::agent::{BlockDescriptor, Transport};
    use baton_kv_transfer::memory::PoolLayout;

    use super::ConvertError;
    use crate::v1;

    pub fn descriptor_to_proto(d: &LayoutDescriptor) -> v1::LayoutDescriptor {
        v1::LayoutDescriptor {
            fingerprint: d.fingerprint.0.to_vec(),
            dtype: match d.dtype {
                KvDType::F32 => v1::KvDType::KvDtypeF32,
                KvDType::F16 => v1::KvDType::KvDtypeF16,
            } as i32,
            block_size: d.block_size,
            num_layers: d.num_layers,
            layer_start: d.layers.start,
            layer_end: d.layers.end,
            num_kv_heads: d.num_kv_heads,
            kv_head_start: d.kv_heads.start,
            kv_head_end: d.kv_heads.end,
            head_dim: d.head_dim,
        }
    }

    pub fn descriptor_from_proto(
        d: &v1::LayoutDescriptor,
    ) -> Result<LayoutDescriptor, ConvertError> {
        let bad = |field: &'static str, reason: &str| ConvertError {
            field,
            reason: reason.into(),
        };
        let fingerprint: [u8; 32] = d
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| bad("layout.fingerprint", "must be 32 bytes"))?;
        let dtype = match v1::KvDType::try_from(d.dtype) {
            Ok(v1::KvDType::KvDtypeF32) => KvDType::F32,
            Ok(v1::KvDType::KvDtypeF16) => KvDType::F16,
            _ => return Err(bad("layout.dtype", "must be f32 or f16")),
        };
        if d.layer_start > d.layer_end || d.layer_end > d.num_layers {
            return Err(bad("layout.layer_end", "layer range is outside the model"));
        }
        if d.kv_head_start > d.kv_head_end || d.kv_head_end > d.num_kv_heads {
            return Err(bad(
                "layout.kv_head_end",
                "kv head range is outside the model",
            ));
        }
        if d.block_size == 0 || d.head_dim == 0 {
            return Err(bad(
                "layout.block_size",
                "block size and head dim must be positive",
            ));
        }
        Ok(LayoutDescriptor {
            fingerprint: Fingerprint(fingerprint),
            dtype,
            block_size: d.block_size,
            num_layers: d.num_layers,
            layers: d.layer_start..d.layer_end,
            num_kv_heads: d.num_kv_heads,
            kv_heads: d.kv_head_start..d.kv_head_end,
            head_dim: d.head_dim,
        })
    }

    pub fn endpoint_to_proto(e: &Endpoint, host_id: &str) -> v1::KvEndpoint {
        match e {
            Endpoint::Tcp(addr) => v1::KvEndpoint {
                transport: v1::Transport::Tcp as i32,
                address: addr.to_string(),
                host_id: host_id.to_string(),
            },
            Endpoint::Shm(path) => v1::KvEndpoint {
                transport: v1::Transport::Shm as i32,
                address: path.display().to_string(),
                host_id: host_id.to_string(),
            },
        }
    }

    pub fn endpoint_from_proto(e: &v1::KvEndpoint) -> Result<Endpoint, ConvertError> {
        match v1::Transport::try_from(e.transport) {
            Ok(v1::Transport::Tcp) => {
                e.address
                    .parse::<SocketAddr>()
                    .map(Endpoint::Tcp)
                    .map_err(|err| ConvertError {
                        field: "endpoint.address",
                        reason: format!("{:?} is not host:port: {err}", e.address),
                    })
            }
            Ok(v1::Transport::Shm) if !e.address.is_empty() => {
                Ok(Endpoint::Shm(std::path::PathBuf::from(&e.address)))
            }
            _ => Err(ConvertError {
                field: "endpoint.transport",
                reason: format!("transport {} is not supported here", e.transport),
            }),
        }
    }

    pub fn endpoint_transport(e: &Endpoint) -> v1::Transport {
        match e {
            Endpoint::Tcp(_) => v1::Transport::Tcp,
            Endpoint::Shm(_) => v1::Transport::Shm,
        }
    }

    pub fn blocks_to_proto(b: &BlockDescriptor, host_id: &str) -> v1::KvBlocks {
        v1::KvBlocks {
            worker_id: b.worker.to_string(),
            endpoints: b
                .endpoints
                .iter()
                .map(|e| endpoint_to_proto(e, host_id))
                .collect(),
            layout: Some(descriptor_to_proto(&b.pool.layout)),
            pool_blocks: b.pool.num_blocks,
            block_ids: b.blocks.iter().map(|b| b.0).collect(),
            tokens: b.tokens,
            cached_tokens: b.cached_tokens,
        }
    }

    /// A peer's block descriptor; endpoints this build cannot use are left out (the caller
    /// refuses a descriptor without the transport it needs).
    pub fn blocks_from_proto(b: &v1::KvBlocks) -> Result<BlockDescriptor, ConvertError> {
        let worker = WorkerId::parse(&b.worker_id).map_err(|reason| ConvertError {
            field: "blocks.worker_id",
            reason,
        })?;
        let layout = descriptor_from_proto(b.layout.as_ref().ok_or(ConvertError {
            field: "blocks.layout",
            reason: "is required".into(),
        })?)?;
        if b.pool_blocks == 0 {
            return Err(ConvertError {
                field: "blocks.pool_blocks",
                reason: "must be positive".into(),
            });
        }
        Ok(BlockDescriptor {
            worker,
            endpoints: b
                .endpoints
                .iter()
                .filter_map(|e| endpoint_from_proto(e).ok())
                .collect(),
            pool: PoolLayout {
                layout,
                num_blocks: b.pool_blocks,
            },
            blocks: b.block_ids.iter().copied().map(BlockId).collect(),
            tokens: b.tokens,
            cached_tokens: b.cached_tokens,
        })
    }

    pub fn transport_from_proto(t: i32) -> Result<Transport, ConvertError> {
        match v1::Transport::try_from(t) {
            Ok(v1::Transport::Tcp | v1::Transport::Unspecified) => Ok(Transport::Tcp),
            Ok(v1::Transport::Shm) => Ok(Transport::Shm),
            Err(_) => Err(ConvertError {
                field: "transport",
                reason: format!("unknown value {t}"),
            }),
        }
    }

    pub fn transport_to_proto(t: Transport) -> v1::Transport {
        match t {
            Transport::Tcp => v1::Transport::Tcp,
            Transport::Shm => v1::Transport::Shm,
        }
    }
}

#[cfg(feature = "workers")]
pub use workers::*;

#[cfg(test)]
mod timeout_tests {
    use super::grpc_timeout;
    use std::time::Duration;
    use tonic::metadata::MetadataMap;

    fn parse(v: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().expect("ascii"));
        grpc_timeout(&m)
    }

    #[test]
    fn grpc_timeout_units_parse_and_garbage_is_ignored() {
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("S"), None);
        assert_eq!(parse("12x"), None);
        assert_eq!(parse("123456789m"), None, "at most 8 digits");
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}

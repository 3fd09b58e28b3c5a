//! gRPC messages a peer sends (baton-proto): decoded by prost, then converted to domain types
//! and checked the way the receiving worker or coordinator does.

use baton_core::KvIndex;
use baton_proto::convert::{
    blocks_from_proto, descriptor_from_proto, descriptor_to_proto, endpoint_from_proto,
    endpoint_to_proto, finish_from_proto, kv_events_from_proto, kv_events_to_proto,
    sampling_from_proto, token_from_proto, transport_from_proto,
};
use baton_proto::prost::Message;
use baton_proto::v1;
use baton_text::SamplingLimits;

/// Context a worker of the seeds' model has (SmolLM2's 2048 tokens).
const MAX_CONTEXT: usize = 2048;

/// One message, chosen by the first byte, decoded from the rest and converted: the prefill
/// and decode workers' requests (sampling, block descriptors, transports, endpoints), the
/// coordinator's view of a worker (its info, load reports and events with their KV events),
/// the decode worker's stream, the completion a prefill worker sends with the last KV byte,
/// and a client's Generate request.
pub fn proto_worker(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => decoded::<v1::PrefillRequest>(body, |m| prefill_request(&m)),
        1 => decoded::<v1::DecodeRequest>(body, |m| decode_request(&m)),
        2 => decoded::<v1::ConnectRequest>(body, |m| {
            if let Some(e) = &m.endpoint {
                endpoint(e);
            }
            if let Some(d) = &m.destination {
                descriptor(d);
            }
        }),
        3 => decoded::<v1::PrefillResponse>(body, |m| {
            if let Some(t) = &m.first_token {
                let _ = token_from_proto(t);
            }
            if let Some(b) = &m.source {
                blocks(b, None);
            }
        }),
        4 => decoded::<v1::DecodeResponse>(body, |m| {
            let _: Vec<_> = m.tokens.iter().map(token_from_proto).collect();
            if let Some(f) = &m.finish {
                let _ = finish_from_proto(f.reason);
            }
            if let Some(b) = &m.reserved {
                blocks(b, None);
            }
            if let Some(t) = &m.recomputed_first_token {
                let _ = token_from_proto(t);
            }
        }),
        5 => decoded::<v1::WorkerEvent>(body, |m| {
            if let Some(load) = &m.load {
                load_report(load);
            }
        }),
        6 => decoded::<v1::LoadReport>(body, |m| load_report(&m)),
        7 => decoded::<v1::WorkerInfo>(body, |m| {
            m.kv_endpoints.iter().for_each(endpoint);
            if let Some(d) = &m.layout {
                descriptor(d);
            }
        }),
        // What a decode worker reads from a `Notice::Complete`.
        8 => decoded::<v1::HandoffCompletion>(body, |_| {}),
        _ => decoded::<v1::GenerateRequest>(body, |m| {
            sampling(m.sampling.as_ref(), 0);
        }),
    }
}

/// Decodes `body` as an `M`, and where it decodes, checks that its encoding decodes and
/// encodes to the same bytes (bytes, not messages: a NaN field is not equal to itself), then
/// converts it.
fn decoded<M: Message + Default>(body: &[u8], convert: impl FnOnce(M)) {
    let Ok(m) = M::decode(body) else {
        return;
    };
    let bytes = m.encode_to_vec();
    let again = M::decode(bytes.as_slice()).expect("an encoded message decodes");
    assert_eq!(
        again.encode_to_vec(),
        bytes,
        "a decoded message encodes and decodes the same"
    );
    convert(m);
}

/// Sampling as a worker takes it: defaults filled in, then validated against the context the
/// prompt leaves.
fn sampling(p: Option<&v1::SamplingParams>, prompt_len: usize) {
    let params = sampling_from_proto(p);
    let _ = params.validate(&SamplingLimits::with_room(
        MAX_CONTEXT.saturating_sub(prompt_len),
    ));
}

fn prefill_request(m: &v1::PrefillRequest) {
    sampling(m.sampling.as_ref(), m.prompt_token_ids.len());
    if let Some(v1::prefill_request::Handoff::Push(target)) = &m.handoff {
        if let Some(b) = &target.destination {
            blocks(b, Some(m.prompt_token_ids.len()));
        }
        if let Ok(t) = transport_from_proto(target.transport)
            && let Some(b) = &target.destination
            && let Ok(d) = blocks_from_proto(b)
        {
            let _ = d.endpoint(t);
        }
    }
}

fn decode_request(m: &v1::DecodeRequest) {
    use v1::decode_request::Source;
    let prompt_len = match &m.source {
        Some(Source::Push(p)) => {
            let _ = transport_from_proto(p.transport);
            p.prompt_token_ids.len()
        }
        Some(Source::Pull(p)) => {
            let _ = transport_from_proto(p.transport);
            if let Some(b) = &p.source {
                blocks(b, Some(p.prompt_token_ids.len()));
            }
            p.prompt_token_ids.len()
        }
        Some(Source::Prompt(p)) => p.prompt_token_ids.len(),
        None => 0,
    };
    sampling(m.sampling.as_ref(), prompt_len);
}

/// A block descriptor, checked against the prompt it is for where there is one.
fn blocks(b: &v1::KvBlocks, tokens: Option<usize>) {
    let Ok(d) = blocks_from_proto(b) else {
        return;
    };
    if let Some(tokens) = tokens.and_then(|t| u32::try_from(t).ok()) {
        let _ = d.check(tokens);
    }
    for e in &d.endpoints {
        let _ = e.transport();
    }
}

/// An endpoint, which must read back the same after the receiver sends it on.
fn endpoint(e: &v1::KvEndpoint) {
    if let Ok(ep) = endpoint_from_proto(e) {
        let again = endpoint_from_proto(&endpoint_to_proto(&ep, &e.host_id));
        assert_eq!(again.as_ref(), Ok(&ep), "an endpoint reads back the same");
    }
}

/// A layout descriptor, which converts back to the message it came from.
fn descriptor(d: &v1::LayoutDescriptor) {
    if let Ok(layout) = descriptor_from_proto(d) {
        assert_eq!(
            &descriptor_to_proto(&layout),
            d,
            "a layout converts back to its message"
        );
    }
}

/// A load report as the coordinator applies it: its KV events into a worker's index.
fn load_report(load: &v1::LoadReport) {
    let Some(events) = &load.kv_events else {
        return;
    };
    let Ok(domain) = kv_events_from_proto(events) else {
        return;
    };
    assert_eq!(
        &kv_events_to_proto(&domain),
        events,
        "kv events convert back to their message"
    );
    let mut pushed = KvIndex::default();
    if pushed.apply_pushed(&domain) && pushed.len() > load.total_blocks as usize {
        pushed.clear();
    }
    let mut polled = KvIndex::default();
    polled.apply(&domain);
}

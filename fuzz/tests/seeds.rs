//! Writes the seed corpus (`corpus/<target>/seed-*`) from the production encoders: valid
//! frames, hellos, notices, messages, adverts, requests and config files, so that a fuzzer
//! starts from what peers really send. The workspace's tests check that the committed seeds
//! are what today's encoders write (a wire change that forgets them fails); after a format
//! changes, write them again:
//!
//! ```text
//! BATON_WRITE_SEEDS=1 cargo test -p baton-fuzz --test seeds
//! ```

use std::path::Path;

use baton_core::{BlockId, HandoffId, WorkerId};
use baton_fuzz::{CLUSTER, cluster_key, local_layout};
use baton_kv_transfer::memory::PoolLayout;
use baton_kv_transfer::wire::{
    self, CloseCode, Header, Hello, Kind, LandedRange, Notice, ReadRequest, encode_close,
    encode_descriptor,
};

/// Writes a seed under `BATON_WRITE_SEEDS`, else checks that the committed one has these bytes.
fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let path = dir.join(format!("seed-{name}"));
    if std::env::var_os("BATON_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("corpus folder");
        std::fs::write(&path, data).expect("seed file");
        return;
    }
    let committed = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (BATON_WRITE_SEEDS=1 writes it)", path.display()));
    assert!(
        committed == data,
        "{} differs from what the encoders write now (BATON_WRITE_SEEDS=1 writes it again)",
        path.display()
    );
}

fn pool() -> PoolLayout {
    PoolLayout {
        layout: local_layout(),
        num_blocks: 728,
    }
}

fn hello(id: &str) -> Hello {
    Hello {
        worker: WorkerId::parse(id).expect("id"),
        pool: pool(),
    }
}

/// A TCP hello payload: the hello and its length-prefixed extra bytes.
fn tcp_hello(extra: &[u8]) -> Vec<u8> {
    let mut b = hello("decode-0").encode();
    b.extend_from_slice(&(extra.len() as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

/// A shm hello payload: the hello, `1u32`, the memfd flag.
fn shm_hello(memfd: bool) -> Vec<u8> {
    let mut b = hello("prefill-0").encode();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.push(u8::from(memfd));
    b
}

fn notices() -> Vec<(&'static str, Notice)> {
    vec![
        ("keepalive", Notice::Keepalive),
        (
            "landed",
            Notice::Landed {
                layer: 7,
                ranges: vec![
                    LandedRange {
                        offset: 1 << 20,
                        len: 4096,
                        crc: Some(0xdead_beef),
                    },
                    LandedRange {
                        offset: 8192,
                        len: 2048,
                        crc: None,
                    },
                ],
            },
        ),
        (
            "complete",
            Notice::Complete {
                bytes: 1_704_960,
                transfer_us: 534,
                // A HandoffCompletion: first token 42, exposed 0.001 s.
                completion: vec![8, 42, 17, 252, 169, 241, 210, 77, 98, 80, 63],
            },
        ),
        (
            "abort",
            Notice::Abort {
                reason: "compute failed".into(),
            },
        ),
        ("cancel", Notice::Cancel),
        ("stopped", Notice::Stopped),
        ("begin", Notice::Begin),
        ("go", Notice::Go),
        ("done", Notice::Done),
    ]
}

fn read_request() -> ReadRequest {
    ReadRequest {
        tokens: 37,
        layers: 0..30,
        heads: 1..3,
        source_blocks: vec![BlockId(4), BlockId(9), BlockId(1)],
        dest_blocks: vec![BlockId(0), BlockId(1), BlockId(2)],
        first_block: 1,
    }
}

fn write_frame(handoff: HandoffId, layer: u32, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut h =
        Header::new(Kind::Write, handoff, payload.len(), crc32c::crc32c(payload)).expect("header");
    h.layer = layer;
    h.offset = offset;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

fn kv_seeds() {
    let handoff = HandoffId(0x1234);
    let frame = |kind, handoff, payload: &[u8]| wire::frame(kind, handoff, payload).expect("frame");

    // A push handoff as a decode agent reads it over TCP: the dialer's auth offer and proof
    // (bytes as a keyed peer sends them), then its hello.
    let mut offer = vec![1u8, 1];
    offer.extend_from_slice(&[0x5a; 32]);
    let mut push = frame(Kind::Auth, HandoffId(0), &offer);
    push.extend(frame(Kind::Auth, HandoffId(0), &[0xa5; 32]));
    push.extend(frame(Kind::Hello, HandoffId(0), &tcp_hello(b"")));
    push.extend(frame(Kind::Notice, handoff, &Notice::Begin.encode()));
    push.extend(write_frame(handoff, 0, 0, &[7u8; 96]));
    push.extend(write_frame(handoff, 0, 96, &[8u8; 32]));
    push.extend(frame(Kind::Notice, handoff, &Notice::Keepalive.encode()));
    for (name, n) in notices() {
        if name == "complete" {
            push.extend(frame(Kind::Notice, handoff, &n.encode()));
        }
    }
    push.extend(frame(
        Kind::Close,
        HandoffId(0),
        &encode_close(CloseCode::Normal, "bye"),
    ));
    // The first byte: 1 makes the checksums right before reading, 0 reads the bytes as they are.
    let stream = |mode: u8, frames: &[u8]| [&[mode][..], frames].concat();
    write("kv_frame", "push-stream", &stream(0, &push));

    // A pull: the reader's hello, its read request, the source's writes and completion.
    let mut pull = frame(Kind::Hello, HandoffId(0), &tcp_hello(&[1, 2, 3]));
    pull.extend(frame(Kind::Read, handoff, &read_request().encode()));
    pull.extend(write_frame(handoff, 3, 1 << 16, &[1u8; 64]));
    pull.extend(frame(Kind::Notice, handoff, &Notice::Done.encode()));
    write("kv_frame", "pull-stream", &stream(1, &pull));

    // A shm link: the hello with its memfd flag, then landed ranges instead of writes.
    let mut shm = frame(Kind::Hello, HandoffId(0), &shm_hello(true));
    for (_, n) in notices() {
        shm.extend(frame(Kind::Notice, handoff, &n.encode()));
    }
    write("kv_frame", "shm-stream", &stream(1, &shm));

    let refused = frame(
        Kind::Close,
        HandoffId(0),
        &encode_close(CloseCode::Incompatible, "model fingerprints differ"),
    );
    write("kv_frame", "refused", &stream(0, &refused));

    let payload = |tag: u8, body: &[u8]| {
        let mut b = vec![tag];
        b.extend_from_slice(body);
        b
    };
    write(
        "kv_payload",
        "hello",
        &payload(0, &hello("decode-0").encode()),
    );
    write("kv_payload", "hello-tcp", &payload(1, &tcp_hello(b"extra")));
    write("kv_payload", "hello-shm", &payload(2, &shm_hello(true)));
    write(
        "kv_payload",
        "hello-shm-private",
        &payload(2, &shm_hello(false)),
    );
    for (name, n) in notices() {
        write(
            "kv_payload",
            &format!("notice-{name}"),
            &payload(3, &n.encode()),
        );
    }
    write("kv_payload", "read", &payload(4, &read_request().encode()));
    write(
        "kv_payload",
        "close",
        &payload(5, &encode_close(CloseCode::Corrupt, "crc32c mismatch")),
    );
    let shard = baton_core::LayoutDescriptor {
        layers: 15..30,
        kv_heads: 1..2,
        ..local_layout()
    };
    write(
        "kv_payload",
        "descriptor",
        &payload(6, &encode_descriptor(&shard)),
    );
}

fn discovery_seeds() {
    use baton_discovery::advert::{Advert, Role};
    use baton_discovery::events::TOPIC;

    let key = cluster_key();
    let advert = |id: &str, issued_ms: u64| Advert {
        cluster: CLUSTER.into(),
        worker_id: WorkerId::parse(id).expect("id"),
        role: Role::Decode,
        fingerprint: baton_core::Fingerprint([7; 32]),
        host_id: "host-a".into(),
        grpc_port: 50071,
        event_port: 50072,
        host: Some("10.0.0.2".into()),
        issued_ms,
    };
    let value = |a: &Advert| {
        let mut v = String::new();
        for (k, val) in a.to_pairs(&key) {
            v.push_str(&format!("{k}={val}\n"));
        }
        v.into_bytes()
    };
    // op: low bits 0 put, 1 delete, 2 resync; 0x10 under the prefix; 0x20 sign again.
    let put = |out: &mut Vec<u8>, op: u8, id: &str, value: &[u8]| {
        out.push(op);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
    };
    let a = advert("decode-a-1", 1_700_000_000_000);
    let mut join_leave = Vec::new();
    put(&mut join_leave, 0x10, "decode-a-1", &value(&a));
    put(
        &mut join_leave,
        0x10,
        "decode-a-1",
        &value(&Advert {
            grpc_port: 50081,
            issued_ms: a.issued_ms + 1,
            ..a.clone()
        }),
    );
    // A replay of the older advert, then the key's deletion.
    put(&mut join_leave, 0x10, "decode-a-1", &value(&a));
    join_leave.extend([0x11, 10]);
    join_leave.extend_from_slice(b"decode-a-1");
    write("discovery_advert", "join-change-replay-leave", &join_leave);

    // A value changed by hand and signed again: the checks behind the signature.
    let mut resigned = Vec::new();
    let text = String::from_utf8(value(&a)).expect("utf-8");
    let changed = text.replace("r=d", "r=p").replace("g=50071", "g=0");
    put(&mut resigned, 0x30, "decode-a-1", changed.as_bytes());
    put(
        &mut resigned,
        0x30,
        "decode-a-1",
        text.replace("a=10.0.0.2\n", "a=::1\n").as_bytes(),
    );
    write("discovery_advert", "resigned", &resigned);

    // A listing of two workers, one under the wrong key.
    let b = advert("decode-b-2", 1_700_000_000_500);
    let mut resync = vec![0x12, 2];
    for (id, adv) in [("decode-b-2", &b), ("decode-x", &a)] {
        resync.push(id.len() as u8);
        resync.extend_from_slice(id.as_bytes());
        let v = value(adv);
        resync.extend_from_slice(&(v.len() as u16).to_le_bytes());
        resync.extend_from_slice(&v);
    }
    write("discovery_advert", "resync", &resync);

    // Event-plane messages: frame count in the low bits; 0x10 topic, 0x20 sign.
    let message = |mode: u8, frames: &[&[u8]]| {
        let mut out = vec![mode];
        for f in frames {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    };
    let payload = b"\x0a\x08decode-0\x10\x07\x18\x01";
    let signature = key.sign_event(payload);
    write(
        "discovery_event",
        "signed",
        &message(3, &[TOPIC, payload, &signature]),
    );
    write(
        "discovery_event",
        "sign-here",
        &message(0x33, &[b"", payload, b""]),
    );
    write(
        "discovery_event",
        "unsigned",
        &message(3, &[TOPIC, payload, b"short"]),
    );
    write(
        "discovery_event",
        "two-frames",
        &message(2, &[TOPIC, payload]),
    );
}

#[cfg(feature = "heavy")]
fn proto_seeds() {
    use baton_kv_transfer::Endpoint;
    use baton_kv_transfer::agent::BlockDescriptor;
    use baton_proto::convert::{
        blocks_to_proto, descriptor_to_proto, endpoint_to_proto, kv_events_to_proto,
        sampling_to_proto,
    };
    use baton_proto::prost::Message;
    use baton_proto::v1;

    let message = |tag: u8, m: &dyn Fn() -> Vec<u8>| {
        let mut out = vec![tag];
        out.extend(m());
        out
    };
    let params = baton_text::SamplingParams {
        temperature: 0.7,
        top_k: Some(40),
        seed: Some(7),
        max_new_tokens: 32,
        stop_strings: vec!["\n\n".into()],
        logprobs: Some(2),
        ..Default::default()
    };
    let endpoints = vec![
        Endpoint::Tcp("127.0.0.1:50080".parse().expect("addr")),
        Endpoint::Shm("/run/baton/decode-0.sock".into()),
    ];
    let blocks = BlockDescriptor {
        worker: WorkerId::parse("decode-0").expect("id"),
        endpoints: endpoints.clone(),
        pool: pool(),
        blocks: vec![BlockId(3), BlockId(4), BlockId(5)],
        tokens: 40,
        cached_tokens: 16,
    };
    let kv_blocks = blocks_to_proto(&blocks, "host-a");
    let prompt: Vec<u32> = (1..=40).collect();
    let prefill = v1::PrefillRequest {
        request_id: "req-1".into(),
        prompt_token_ids: prompt.clone(),
        sampling: Some(sampling_to_proto(&params)),
        handoff: Some(v1::prefill_request::Handoff::Push(v1::PushTarget {
            handoff_id: 9,
            destination: Some(kv_blocks.clone()),
            transport: v1::Transport::Shm as i32,
            ttl_ms: 10_000,
        })),
    };
    write(
        "proto_worker",
        "prefill-push",
        &message(0, &|| prefill.encode_to_vec()),
    );
    let pull = v1::PrefillRequest {
        handoff: Some(v1::prefill_request::Handoff::Pull(v1::PullLease {
            handoff_id: 9,
            ttl_ms: 10_000,
        })),
        ..prefill.clone()
    };
    write(
        "proto_worker",
        "prefill-pull",
        &message(0, &|| pull.encode_to_vec()),
    );
    let decode_pull = v1::DecodeRequest {
        request_id: "req-1".into(),
        sampling: Some(sampling_to_proto(&params)),
        source: Some(v1::decode_request::Source::Pull(v1::PullSource {
            handoff_id: 9,
            source: Some(kv_blocks.clone()),
            prompt_token_ids: prompt.clone(),
            transport: v1::Transport::Tcp as i32,
            ttl_ms: 0,
        })),
        ..Default::default()
    };
    write(
        "proto_worker",
        "decode-pull",
        &message(1, &|| decode_pull.encode_to_vec()),
    );
    let decode_push = v1::DecodeRequest {
        source: Some(v1::decode_request::Source::Push(v1::PushSource {
            handoff_id: 9,
            prompt_token_ids: prompt.clone(),
            transport: v1::Transport::Shm as i32,
            ttl_ms: 5_000,
        })),
        ..decode_pull.clone()
    };
    write(
        "proto_worker",
        "decode-push",
        &message(1, &|| decode_push.encode_to_vec()),
    );
    let connect = v1::ConnectRequest {
        endpoint: Some(endpoint_to_proto(&endpoints[0], "host-a")),
        destination: Some(descriptor_to_proto(&pool().layout)),
    };
    write(
        "proto_worker",
        "connect",
        &message(2, &|| connect.encode_to_vec()),
    );
    let token = v1::SampledToken {
        token_id: 42,
        logprob: -0.25,
        top_logprobs: vec![v1::TopLogprob {
            token_id: 43,
            logprob: -1.5,
        }],
    };
    let prefill_response = v1::PrefillResponse {
        first_token: Some(token.clone()),
        source: Some(kv_blocks.clone()),
        prefill_seconds: 0.012,
        cached_tokens: 16,
    };
    write(
        "proto_worker",
        "prefill-response",
        &message(3, &|| prefill_response.encode_to_vec()),
    );
    let decode_response = v1::DecodeResponse {
        tokens: vec![token.clone(), token.clone()],
        finish: Some(v1::DecodeFinish {
            reason: v1::FinishReason::Length as i32,
            prompt_tokens: 40,
            completion_tokens: 32,
            ..Default::default()
        }),
        reserved: Some(kv_blocks.clone()),
        ..Default::default()
    };
    write(
        "proto_worker",
        "decode-response",
        &message(4, &|| decode_response.encode_to_vec()),
    );
    let events = baton_core::KvEvents {
        epoch: 77,
        reset: false,
        next: 3,
        events: vec![
            baton_core::KvEvent::Stored(baton_core::BlockHash([1; 16])),
            baton_core::KvEvent::Stored(baton_core::BlockHash([2; 16])),
            baton_core::KvEvent::Removed(baton_core::BlockHash([1; 16])),
        ],
    };
    let load = v1::LoadReport {
        running: 2,
        waiting: 1,
        free_blocks: 600,
        total_blocks: 728,
        leases: 1,
        kv_events: Some(kv_events_to_proto(&events)),
        ..Default::default()
    };
    let event = v1::WorkerEvent {
        worker_id: "decode-0".into(),
        epoch: 77,
        seq: 5,
        sent_ms: 1_700_000_000_000,
        load: Some(load.clone()),
    };
    write(
        "proto_worker",
        "worker-event",
        &message(5, &|| event.encode_to_vec()),
    );
    write(
        "proto_worker",
        "load-report",
        &message(6, &|| load.encode_to_vec()),
    );
    let info = v1::WorkerInfo {
        worker_id: "decode-0".into(),
        model_name: "smollm2".into(),
        layout: Some(descriptor_to_proto(&pool().layout)),
        kv_endpoints: endpoints
            .iter()
            .map(|e| endpoint_to_proto(e, "host-a"))
            .collect(),
        max_context: 2048,
        block_size: 16,
        total_blocks: 728,
        eos_token_ids: vec![2],
        event_port: 50072,
        device: "cpu".into(),
        ..Default::default()
    };
    write(
        "proto_worker",
        "worker-info",
        &message(7, &|| info.encode_to_vec()),
    );
    let completion = v1::HandoffCompletion {
        first_token_id: 42,
        exposed_seconds: 0.001,
    };
    write(
        "proto_worker",
        "handoff-completion",
        &message(8, &|| completion.encode_to_vec()),
    );
    let generate = v1::GenerateRequest {
        model: "smollm2".into(),
        input: Some(v1::generate_request::Input::Chat(v1::ChatMessages {
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: "Hello".into(),
            }],
        })),
        sampling: Some(sampling_to_proto(&params)),
        request_id: "client-1".into(),
        skip_special_tokens: Some(true),
        allow_cloud: Some(false),
        max_cost_usd: Some(0.01),
        ttft_target_seconds: Some(2.0),
        ..Default::default()
    };
    write(
        "proto_worker",
        "generate",
        &message(9, &|| generate.encode_to_vec()),
    );
}

#[cfg(feature = "heavy")]
fn openai_seeds() {
    let body = |tag: u8, timeout: Option<&str>, json: &str| {
        let mut out = vec![tag];
        if let Some(t) = timeout {
            out.push(t.len() as u8);
            out.extend_from_slice(t.as_bytes());
        }
        out.extend_from_slice(json.as_bytes());
        out
    };
    let seeds: &[(&str, u8, Option<&str>, &str)] = &[
        (
            "completion",
            0,
            None,
            r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":16,"temperature":0.7,"top_p":0.9,"stop":["\n"],"seed":7,"logprobs":2}"#,
        ),
        (
            "completion-tokens",
            2,
            Some("2.5"),
            r#"{"prompt":[1,2,3,4],"stream":true,"stream_options":{"include_usage":true},"top_k":-1,"min_p":0.05,"n":1,"pd_mode":"force","ignore_eos":true,"stop_token_ids":[2]}"#,
        ),
        (
            "completion-unsupported",
            0,
            None,
            r#"{"prompt":"x","logit_bias":{"50256":-100},"echo":false}"#,
        ),
        (
            "chat",
            1,
            None,
            r#"{"model":"smollm2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_completion_tokens":32,"logprobs":true,"top_logprobs":3,"repetition_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":0.5}"#,
        ),
        (
            "chat-parts",
            3,
            Some("30"),
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Hello "},{"type":"text","text":"there"}]}],"stream":true,"timeout":12.5,"allow_cloud":true,"max_cost_usd":0.02,"ttft_target":1.5,"pd_mode":"off"}"#,
        ),
        (
            "chat-tools",
            1,
            None,
            r#"{"messages":[{"role":"user","content":"x","tool_calls":[]}],"tools":[],"response_format":{"type":"json_object"}}"#,
        ),
    ];
    for (name, tag, timeout, json) in seeds {
        write("openai_request", name, &body(*tag, *timeout, json));
    }
}

#[cfg(feature = "heavy")]
fn config_seeds() {
    // The sample file without its comments: every key at its default.
    let sample =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../baton.toml"))
            .expect("baton.toml");
    let bare: String = sample
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    // baton.toml gains keys often and a sample a few keys behind is as good a start, so this
    // seed is checked to exist, not to match (BATON_WRITE_SEEDS=1 refreshes it).
    if std::env::var_os("BATON_WRITE_SEEDS").is_some() {
        write("config_toml", "sample", bare.as_bytes());
    } else {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/config_toml/seed-sample");
        assert!(path.is_file(), "{} is missing", path.display());
    }
    write(
        "config_toml",
        "roles",
        br#"[coordinator]
model = "/models/smollm2.gguf"
model_name = "smollm2"
decode_workers = ["127.0.0.1:50071"]
prefill_workers = ["127.0.0.1:50061"]
handoff = "pull"
transport = "shm"
lease_ttl = "250ms"
model_fingerprint = "0909090909090909090909090909090909090909090909090909090909090909"

[coordinator.discovery]
backend = "etcd"
cluster = "lab-1"
cluster_key_file = "/etc/baton/cluster.key"
advertise_host = "192.168.1.20"

[coordinator.discovery.etcd]
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
lease_ttl = "5s"

[[coordinator.auth.keys]]
name = "team-a"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
requests_per_minute = 60
max_concurrent = 4

[prefill]
worker_id = "prefill-0"
host_id = "3d1219c7c4c5404aaa1f6d2a48adfda4"

[prefill.engine]
max_context = 4096

[decode]
worker_id = "decode-0"
kv_failure_policy = "recompute"

[decode.engine]
kv_cache_mib = 256
"#,
    );
    write(
        "config_toml",
        "cloud",
        br#"[coordinator.cloud]
allow_by_default = false
ttft_target = "2s"

[[coordinator.cloud.endpoints]]
name = "openai"
base_url = "https://api.example.com/v1"
api_key_env = "BATON_FUZZ_NO_SUCH_KEY"
models = { smollm2 = "gpt-x-mini" }
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.6
max_concurrent = 8
connect_timeout = "5s"

[coordinator.cloud.budget]
ledger = "/var/lib/baton/ledger.redb"
time_zone = "Europe/Berlin"
caps = [{ period = "day", cap_usd = 50.0 }, { period = "hour", cap_usd = 5.0, endpoint = "openai" }]
"#,
    );
    write(
        "config_toml",
        "unknown-key",
        b"[decode]\nkv_cache_mb = 256\n",
    );
}

#[test]
fn the_committed_seeds_are_what_the_encoders_write() {
    kv_seeds();
    discovery_seeds();
    #[cfg(feature = "heavy")]
    {
        proto_seeds();
        openai_seeds();
        config_seeds();
    }
}

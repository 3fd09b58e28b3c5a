//! Pull reads are served off the prefill worker's engine thread: a decode worker that reads
//! slowly (here: a peer that asks for a pinned source and then never takes a byte off its
//! socket) does not delay another request's prefill on the same prefill worker.

use std::time::{Duration, Instant};

use baton_core::{BlockId, HandoffId, WorkerId};
use baton_e2e::{LIMIT, Workers, channel};
use baton_kv_transfer::memory::PoolLayout;
use baton_kv_transfer::wire::{self, Header, Hello, Kind, ReadRequest};
use baton_proto::convert;
use baton_proto::v1::{self, prefill_worker_client::PrefillWorkerClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pull(handoff: u64, prompt: Vec<u32>) -> v1::PrefillRequest {
    v1::PrefillRequest {
        prompt_token_ids: prompt,
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(4),
            ..Default::default()
        }),
        handoff: Some(v1::prefill_request::Handoff::Pull(v1::PullLease {
            handoff_id: handoff,
            ttl_ms: 60_000,
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_delay_another_prefill() {
    let workers = Workers::start(256).await;
    let mut prefill = PrefillWorkerClient::new(channel(workers.prefill));
    let info = prefill
        .info(v1::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let layout = convert::descriptor_from_proto(info.layout.as_ref().expect("layout"))
        .expect("layout converts");
    let kv_tcp = info
        .kv_endpoints
        .iter()
        .find(|e| e.transport == v1::Transport::Tcp as i32)
        .expect("a tcp endpoint")
        .address
        .clone();

    // A source big enough that its read cannot fit the socket buffers: 2000 tokens are about
    // 90 MB of KV in f32.
    let long: Vec<u32> = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411]
        .iter()
        .copied()
        .cycle()
        .take(2000)
        .collect();
    let source = prefill
        .prefill(pull(1, long.clone()))
        .await
        .expect("the first prefill")
        .into_inner()
        .source
        .expect("a pull source");

    // The slow reader: the handshake of a peer holding the same pool, one read request, and
    // then it never reads its socket.
    let mut raw = tokio::net::TcpStream::connect(kv_tcp)
        .await
        .expect("connect");
    let mut hello = Hello {
        worker: WorkerId::parse("slow-reader").expect("id"),
        pool: PoolLayout {
            layout,
            num_blocks: info.total_blocks,
        },
    }
    .encode();
    let mut extra = 9u64.to_le_bytes().to_vec();
    extra.extend_from_slice(&0u16.to_le_bytes());
    extra.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&(extra.len() as u32).to_le_bytes());
    hello.extend_from_slice(&extra);
    // A keyless auth offer first (the worker has no cluster key either), and the worker's.
    let mut offer = vec![1u8, 0];
    offer.extend_from_slice(&[0x42; 32]);
    raw.write_all(&wire::frame(Kind::Auth, HandoffId(0), &offer).expect("frame"))
        .await
        .expect("auth offer");
    raw.write_all(&wire::frame(Kind::Hello, HandoffId(0), &hello).expect("frame"))
        .await
        .expect("hello");
    let mut head = [0u8; wire::HEADER_LEN];
    raw.read_exact(&mut head).await.expect("the worker's offer");
    let h = Header::decode(&head, &wire::Limits::default()).expect("offer header");
    assert_eq!(h.kind, Kind::Auth);
    let mut body = vec![0u8; h.payload_len as usize];
    raw.read_exact(&mut body).await.expect("offer body");
    raw.read_exact(&mut head).await.expect("the worker's hello");
    let h = Header::decode(&head, &wire::Limits::default()).expect("hello header");
    let mut body = vec![0u8; h.payload_len as usize];
    raw.read_exact(&mut body).await.expect("hello body");
    let blocks: Vec<BlockId> = source.block_ids.iter().copied().map(BlockId).collect();
    let read = ReadRequest {
        tokens: long.len() as u32,
        layers: 0..source.layout.as_ref().expect("layout").num_layers,
        heads: 0..source.layout.as_ref().expect("layout").num_kv_heads,
        source_blocks: blocks.clone(),
        dest_blocks: blocks,
        first_block: 0,
    };
    raw.write_all(&wire::frame(Kind::Read, HandoffId(1), &read.encode()).expect("frame"))
        .await
        .expect("read request");
    // The source is being served: a write frame of it arrives. Then this reader stops reading.
    raw.read_exact(&mut head)
        .await
        .expect("a frame of the read");
    let first = Header::decode(&head, &wire::Limits::default()).expect("header");
    assert_eq!(first.kind, Kind::Write, "the read is being served");
    assert_eq!(first.handoff, HandoffId(1));

    // Another request's prefill on the same worker finishes while the read is stuck.
    let started = Instant::now();
    let second = tokio::time::timeout(LIMIT, prefill.prefill(pull(2, long[..300].to_vec())))
        .await
        .expect("the second prefill is not held behind the stalled read")
        .expect("the second prefill succeeds")
        .into_inner();
    assert!(second.first_token.is_some());
    let took = started.elapsed();
    // The stalled read still holds its source: nothing of it finished meanwhile.
    let load = prefill
        .load(v1::LoadRequest::default())
        .await
        .expect("load")
        .into_inner();
    assert_eq!(
        load.leases, 2,
        "both sources pinned; the first still being read"
    );
    eprintln!("second prefill took {took:?} while a reader stalled");
    drop(raw);
    assert!(took < Duration::from_secs(60));
}

//! The load generator (`baton-bench`) against a real in-process cluster, over both APIs: every
//! request completes, with the output length asked for (ignore_eos), the prompt length the
//! synthetic prompts promised, and timings in the order TTFT <= E2E. A handful of short requests
//! keeps it cheap; the numbers themselves are for `baton bench serve`, not for a test.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use baton_bench::prompts::synthetic;
use baton_bench::run::prompt_rng;
use baton_bench::{
    Bounds, GrpcTarget, LengthDist, Load, OpenAiTarget, RequestSpec, RunOptions, RunResult, Slo,
    Synthetic, TokenCountSource, run_load,
};
use baton_coordinator::{HandoffShape, TransportChoice};
use baton_e2e::{Coordinator, LIMIT, Workers, dev_model};

const REQUESTS: usize = 4;
const OUTPUT: u32 = 4;
/// Above the coordinator's 32-token threshold, so requests are disaggregated.
const INPUT: u32 = 40;

fn options() -> RunOptions {
    RunOptions {
        bounds: Bounds {
            max_requests: REQUESTS,
            max_duration: LIMIT,
        },
        timeout: LIMIT,
        slo: "ttft=60s".parse::<Slo>().expect("slo"),
        seed: 0,
        progress: false,
    }
}

fn check(api: &str, run: &RunResult) {
    let s = &run.summary;
    assert_eq!(
        (s.sent, s.completed),
        (REQUESTS, REQUESTS),
        "{api}: {:?}",
        run.samples
    );
    assert_eq!(s.total_output_tokens, (REQUESTS as u64) * u64::from(OUTPUT));
    assert_eq!(
        s.good,
        Some(REQUESTS),
        "{api}: every request within a generous SLO"
    );
    for sample in &run.samples {
        let m = &sample.measured;
        assert_eq!(
            (m.output_tokens, m.output_tokens_from),
            (OUTPUT, TokenCountSource::Usage),
            "{api}"
        );
        let served = m.server_prompt_tokens.expect("usage has prompt tokens");
        assert!(
            (INPUT..=INPUT + 1).contains(&served),
            "{api}: the server saw {served} prompt tokens for {INPUT} asked (a BOS may add one)"
        );
        let ttft = m.ttft_s.expect("a first token");
        assert!(0.0 < ttft && ttft <= m.e2e_s, "{api}: {m:?}");
    }
    assert_eq!(s.tpot.count, REQUESTS, "{api}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_measures_a_real_cluster_over_http_and_grpc() {
    let tokenizer = baton_engine::Tokenizer::load(&dev_model()).expect("tokenizer");
    let spec = Synthetic {
        input: LengthDist::Fixed { len: INPUT },
        output: LengthDist::Fixed { len: OUTPUT },
        shared_prefix_len: 0,
    };
    let requests: Vec<RequestSpec> =
        synthetic(&tokenizer, &spec, REQUESTS, &mut prompt_rng(0)).expect("prompts");
    let workers = Workers::start(64).await;
    let coordinator =
        Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;
    let load = Load::closed_loop(NonZeroUsize::new(2).expect("2"));

    let endpoint = format!("http://{}", coordinator.http);
    let model = OpenAiTarget::served_model(&endpoint, None)
        .await
        .expect("model");
    let http = OpenAiTarget::new(&endpoint, model, true).expect("target");
    check(
        "openai",
        &run_load(Arc::new(http), &requests, &load, &options()).await,
    );

    let grpc = GrpcTarget::new(&coordinator.grpc.to_string(), String::new(), true).expect("target");
    check(
        "grpc",
        &run_load(Arc::new(grpc), &requests, &load, &options()).await,
    );

    workers.await_pools_full(Duration::from_secs(5)).await;
}

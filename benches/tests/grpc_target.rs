//! The gRPC target against a fake `baton.v1.Inference` server in this process, which answers by
//! prompt: a good stream, a refusal status, a stream that ends without a finish, and a finish
//! with reason ERROR. Also a refused connection. The listener is bound before the client starts.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use baton_bench::{
    Arrivals, Bounds, ErrorKind, GrpcTarget, Load, RequestSpec, RunOptions, Slo, TokenCountSource,
    run_load,
};
use baton_proto::v1::{
    self,
    inference_server::{Inference, InferenceServer},
};
use tonic::{Request, Response, Status};

struct FakeInference;

fn message(text: &str, ids: &[u32], finish: Option<v1::FinishReason>) -> v1::GenerateResponse {
    v1::GenerateResponse {
        request_id: "r".into(),
        text: text.into(),
        token_ids: ids.to_vec(),
        logprobs: Vec::new(),
        finish: finish.map(|reason| v1::GenerateFinish {
            reason: reason as i32,
            usage: Some(v1::Usage {
                prompt_tokens: 7,
                completion_tokens: 4,
                total_tokens: 11,
                cached_tokens: 0,
            }),
            placement: None,
        }),
    }
}

type Stream = Pin<Box<dyn futures::Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for FakeInference {
    type GenerateStream = Stream;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Stream>, Status> {
        let req = request.into_inner();
        let sampling = req.sampling.unwrap_or_default();
        assert_eq!(sampling.temperature, Some(0.0));
        assert!(sampling.ignore_eos);
        let Some(v1::generate_request::Input::Prompt(prompt)) = req.input else {
            return Err(Status::invalid_argument("raw prompt expected"));
        };
        let messages = match prompt.as_str() {
            "busy" => return Err(Status::resource_exhausted("overloaded")),
            "no-finish" => vec![message("a", &[1], None)],
            "error-finish" => vec![message("a", &[1], Some(v1::FinishReason::Error))],
            _ => vec![
                message("", &[1], None), // a split character: ids, no text yet
                message("ab", &[2], None),
                message("c", &[3], None),
                message("d", &[4], Some(v1::FinishReason::Length)),
            ],
        };
        Ok(Response::new(Box::pin(futures::stream::iter(
            messages.into_iter().map(Ok),
        ))))
    }

    async fn tokenize(
        &self,
        _: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn models(
        &self,
        _: Request<v1::ModelsRequest>,
    ) -> Result<Response<v1::ModelsResponse>, Status> {
        Ok(Response::new(v1::ModelsResponse {
            models: vec![v1::ModelInfo {
                id: "fake".into(),
                ..Default::default()
            }],
        }))
    }

    async fn cluster_status(
        &self,
        _: Request<v1::ClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn budget(
        &self,
        _: Request<v1::BudgetRequest>,
    ) -> Result<Response<v1::BudgetResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn decide_worker(
        &self,
        _: Request<v1::DecideWorkerRequest>,
    ) -> Result<Response<v1::DecideWorkerResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(FakeInference))
            .serve_with_incoming(baton_proto::incoming(listener))
            .await
            .expect("fake server");
    });
    addr
}

fn options(n: usize) -> RunOptions {
    RunOptions {
        bounds: Bounds {
            max_requests: n,
            max_duration: Duration::from_secs(60),
        },
        timeout: Duration::from_secs(10),
        slo: Slo::default(),
        seed: 0,
        progress: false,
    }
}

fn spec(prompt: &str) -> RequestSpec {
    RequestSpec {
        prompt: prompt.into(),
        prompt_tokens: None,
        max_tokens: 4,
    }
}

const AT_ONCE: Load = Load {
    arrivals: Arrivals::Immediate,
    max_concurrency: None,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_are_timed_and_failures_classified() {
    let addr = serve().await;
    let target = GrpcTarget::new(&addr.to_string(), String::new(), true).expect("target");
    assert_eq!(target.served_model().await.expect("models"), "fake");
    let requests: Vec<RequestSpec> = ["good", "busy", "no-finish", "error-finish"]
        .iter()
        .map(|p| spec(p))
        .collect();
    let run = run_load(Arc::new(target), &requests, &AT_ONCE, &options(4)).await;
    let kinds: Vec<Option<ErrorKind>> = run
        .samples
        .iter()
        .map(|s| s.measured.error.as_ref().map(|e| e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            None,
            Some(ErrorKind::GrpcStatus {
                code: tonic::Code::ResourceExhausted as i32
            }),
            Some(ErrorKind::StreamBroken),
            Some(ErrorKind::ServerError),
        ]
    );
    let good = &run.samples[0].measured;
    assert_eq!(
        (good.output_tokens, good.output_tokens_from),
        (4, TokenCountSource::Usage)
    );
    assert_eq!(good.server_prompt_tokens, Some(7));
    assert_eq!(good.itl_s.len(), 2, "three messages with text, two gaps");
    assert_eq!(run.summary.errors.get("grpc ResourceExhausted"), Some(&1));
}

#[tokio::test]
async fn a_refused_grpc_connection_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let target =
        GrpcTarget::new(&format!("127.0.0.1:{port}"), String::new(), true).expect("target");
    let run = run_load(Arc::new(target), &[spec("good")], &AT_ONCE, &options(2)).await;
    assert_eq!(
        run.summary.errors.get("connect"),
        Some(&2),
        "{:?}",
        run.samples
    );
}

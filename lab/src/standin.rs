//! A constant-time decode worker for `baton-lab overhead --worker constant`.
//!
//! ```text
//! client --Generate--> coordinator --Decode--> stand-in     (measured path)
//! client --Decode--> stand-in                                 (baseline)
//! ```
//!
//! It speaks `baton.v1.DecodeWorker` and answers an aggregated `Decode` at once with the asked
//! number of tokens (the prompt's own ids, replayed), one token per message as a real decode
//! worker sends them. A real engine's response time varies by tens of milliseconds from one
//! request to the next on a shared CPU, which buries a millisecond-scale difference in the tail;
//! against a worker that takes no time, the paired difference is the coordinator's own cost:
//! one more gRPC hop, tokenization checks, placement, detokenization and stop strings.
//!
//! Only that benchmark starts it, inside the benchmark's own process, on 127.0.0.1; no
//! configuration of a cluster can reach it, and its `Info` names it `constant-time-stand-in`.

use std::net::SocketAddr;

use baton_proto::v1::{
    self, DecodeRequest, DecodeResponse, DisconnectRequest, DisconnectResponse, InfoRequest,
    LoadReport, LoadRequest, WorkerInfo,
    decode_worker_server::{DecodeWorker, DecodeWorkerServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Blocks the stand-in reports; a request needs a few, and none are ever taken.
const BLOCKS: u32 = 4096;

/// What the stand-in tells the coordinator about itself.
pub struct StandIn {
    pub max_context: u32,
    pub block_size: u32,
    pub eos_token_ids: Vec<u32>,
}

impl StandIn {
    /// Serves on an ephemeral 127.0.0.1 port until the runtime stops; returns the address.
    pub async fn serve(self) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<DecodeWorkerServer<StandInService>>()
            .await;
        let service = StandInService {
            info: WorkerInfo {
                worker_id: "constant-time-stand-in".into(),
                role: v1::WorkerRole::Colocated as i32,
                model_name: String::new(),
                // The coordinator admits only workers that name their model; this one has
                // none, so it names a model of its own.
                layout: Some(v1::LayoutDescriptor {
                    fingerprint: standin_fingerprint(),
                    ..Default::default()
                }),
                kv_endpoints: Vec::new(),
                max_context: self.max_context,
                block_size: self.block_size,
                total_blocks: BLOCKS,
                eos_token_ids: self.eos_token_ids,
                event_port: 0,
                device: "none".into(),
            },
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(DecodeWorkerServer::new(service))
                .serve_with_incoming(baton_proto::incoming(listener)),
        );
        Ok(address)
    }
}

struct StandInService {
    info: WorkerInfo,
}

/// The messages answering `request`: `max_tokens` tokens replayed from the prompt, one per
/// message, the last carrying the finish.
pub fn replay(request: &DecodeRequest) -> Result<Vec<DecodeResponse>, Status> {
    let Some(v1::decode_request::Source::Prompt(prompt)) = &request.source else {
        return Err(Status::unimplemented(
            "the constant-time stand-in serves aggregated requests (a prompt) only",
        ));
    };
    if !request.generated_token_ids.is_empty() {
        return Err(Status::unimplemented(
            "generated_token_ids: the constant-time stand-in does not continue migrated streams",
        ));
    }
    let ids = &prompt.prompt_token_ids;
    if ids.is_empty() {
        return Err(Status::invalid_argument("prompt: is empty"));
    }
    let wanted = request
        .sampling
        .as_ref()
        .and_then(|s| s.max_tokens)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Status::invalid_argument("sampling.max_tokens: the stand-in needs a positive limit")
        })?;
    let n = wanted as usize;
    Ok(ids
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, &id)| DecodeResponse {
            tokens: vec![v1::SampledToken {
                token_id: id,
                ..Default::default()
            }],
            finish: (i + 1 == n).then_some(v1::DecodeFinish {
                reason: v1::FinishReason::Length as i32,
                prompt_tokens: ids.len() as u32,
                completion_tokens: wanted,
                kv: None,
                source_kv: None,
                cached_tokens: 0,
            }),
            ..Default::default()
        })
        .collect())
}

type ReplayStream = tokio_stream::Iter<std::vec::IntoIter<Result<DecodeResponse, Status>>>;

#[tonic::async_trait]
impl DecodeWorker for StandInService {
    type DecodeStream = ReplayStream;

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadReport>, Status> {
        Ok(Response::new(LoadReport {
            free_blocks: BLOCKS,
            total_blocks: BLOCKS,
            ..Default::default()
        }))
    }

    /// No KV agent here, so no link to close.
    async fn disconnect_peer(
        &self,
        _: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        Ok(Response::new(DisconnectResponse {
            was_connected: false,
        }))
    }

    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let messages = replay(request.get_ref())?;
        Ok(Response::new(tokio_stream::iter(
            messages.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }
}

/// The stand-in's model fingerprint: a fixed name no real model's hash will equal.
fn standin_fingerprint() -> Vec<u8> {
    b"baton-lab constant-time stand-in".to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: Option<v1::decode_request::Source>, max_tokens: u32) -> DecodeRequest {
        DecodeRequest {
            request_id: String::new(),
            sampling: Some(v1::SamplingParams {
                max_tokens: Some(max_tokens),
                ..Default::default()
            }),
            source,
            generated_token_ids: Vec::new(),
        }
    }

    fn prompt(ids: &[u32]) -> Option<v1::decode_request::Source> {
        Some(v1::decode_request::Source::Prompt(v1::Prompt {
            prompt_token_ids: ids.to_vec(),
        }))
    }

    #[test]
    fn replays_the_prompt_one_token_per_message_and_finishes_on_the_last() {
        let messages = replay(&request(prompt(&[7, 8, 9]), 5)).expect("a prompt is served");
        let ids: Vec<u32> = messages
            .iter()
            .flat_map(|m| m.tokens.iter().map(|t| t.token_id))
            .collect();
        assert_eq!(ids, [7, 8, 9, 7, 8]);
        assert!(messages.iter().all(|m| m.tokens.len() == 1));
        assert!(messages[..4].iter().all(|m| m.finish.is_none()));
        let finish = messages[4]
            .finish
            .as_ref()
            .expect("the last message finishes");
        assert_eq!(finish.reason, v1::FinishReason::Length as i32);
        assert_eq!((finish.prompt_tokens, finish.completion_tokens), (3, 5));
    }

    #[test]
    fn refuses_what_only_an_engine_could_answer() {
        let pushed = Some(v1::decode_request::Source::Push(v1::PushSource::default()));
        assert_eq!(
            replay(&request(pushed, 4)).expect_err("no KV cache").code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            replay(&request(prompt(&[]), 4))
                .expect_err("empty prompt")
                .code(),
            tonic::Code::InvalidArgument
        );
        let mut no_limit = request(prompt(&[1]), 4);
        no_limit.sampling = None;
        assert_eq!(
            replay(&no_limit).expect_err("no max_tokens").code(),
            tonic::Code::InvalidArgument
        );
    }
}

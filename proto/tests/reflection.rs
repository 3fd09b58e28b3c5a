//! An in-process server with health and reflection, as every baton server runs them.

use std::collections::BTreeSet;

use baton_proto::{incoming, reflection_service};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt as _;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// Streamed tokens are small writes; a server socket without TCP_NODELAY can hold one for the
/// client's delayed ACK (40 ms), which `baton bench overhead --worker constant` once measured on
/// every second request through the coordinator.
#[tokio::test]
async fn accepted_connections_have_nodelay() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut accepted = incoming(listener);
    let _client = tokio::net::TcpStream::connect(addr).await?;
    let server_side = accepted.next().await.expect("a connection")?;
    assert!(server_side.nodelay()?);
    Ok(())
}

#[tokio::test]
async fn reflection_lists_baton_and_health_services() -> anyhow::Result<()> {
    // Bound before the server task starts, so connects queue on the listener instead of racing.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_health_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health)
            .add_service(reflection_service(&[
                "baton.v1.Inference",
                "baton.v1.PrefillWorker",
                "baton.v1.DecodeWorker",
            ])?)
            .serve_with_incoming_shutdown(incoming(listener), async {
                stopped.await.ok();
            }),
    );

    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .expect("reflection answers a list request");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!(
            "expected a list of services, got {:?}",
            response.message_response
        );
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "baton.v1.Inference",
        "baton.v1.PrefillWorker",
        "baton.v1.DecodeWorker",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.contains(expected),
            "{expected} missing from {services:?}"
        );
    }

    stop.send(()).ok();
    server.await??;
    Ok(())
}

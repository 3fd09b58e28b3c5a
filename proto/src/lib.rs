//! baton's gRPC API, protobuf package `baton.v1`, compiled with tonic and prost.
//!
//! ```text
//! client --Inference (Generate, Tokenize, Models, ClusterStatus)--> coordinator
//! coordinator --PrefillWorker (Info, Load, ConnectPeer, Prefill, Release)--> prefill worker
//! coordinator --DecodeWorker (Info, Load, Decode)--> decode worker
//! (KV moves between the workers' transfer agents, not over gRPC)
//! ```
//!
//! The sources are `baton/v1/{common,inference,worker}.proto` in this crate. [`v1`] holds the
//! generated messages, clients (`v1::inference_client::InferenceClient`, ...) and servers
//! (`v1::inference_server::InferenceServer`, ...). [`convert`] maps messages to domain types:
//! the text layer's always, kv-transfer's only with the `workers` feature, so the coordinator
//! never links the transports. [`status`] is the one mapping between an error's
//! [`baton_core::ErrorClass`] and a gRPC status, both ways.
//!
//! Every server should also serve `grpc.health.v1` ([`tonic_health::server::health_reporter`])
//! and reflection ([`reflection_service`]).

pub mod convert;
pub mod status;
pub mod tls;

/// The generated `baton.v1` messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("baton.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of every `baton.v1` file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("baton_v1_descriptor");

pub use prost;
pub use tonic;
pub use tonic_health;
pub use tonic_reflection;

use tonic_reflection::server::{
    Builder, Error as ReflectionError, v1::ServerReflection, v1::ServerReflectionServer,
    v1alpha::ServerReflection as ServerReflectionV1Alpha,
    v1alpha::ServerReflectionServer as ServerReflectionServerV1Alpha,
};

/// The connections a gRPC server accepts on `listener`, with `TCP_NODELAY` set.
///
/// A streamed message (one token) is a write of tens of bytes. Without `TCP_NODELAY`, Nagle's
/// algorithm holds a small write that follows an unacknowledged one until the peer's delayed
/// ACK arrives, up to 40 ms on Linux. That is 40 ms added to a token, and it comes and goes
/// with timing. `Server::serve(addr)` sets the option; `serve_with_incoming` on a plain listener
/// does not, so every baton server takes its connections from here.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A `grpc.reflection.v1` service listing the `baton.v1` services in `served` (what this server
/// actually serves), `grpc.health.v1` and reflection itself, with every `baton.v1` type
/// resolvable, so tools such as grpcurl can list and call them.
pub fn reflection_service(
    served: &[&str],
) -> Result<ServerReflectionServer<impl ServerReflection>, ReflectionError> {
    reflection_builder(served).build_v1()
}

/// The same service as [`reflection_service`] under `grpc.reflection.v1alpha`, for older
/// clients (grpc_cli and some GUI tools) that only speak that version.
pub fn reflection_service_v1alpha(
    served: &[&str],
) -> Result<ServerReflectionServerV1Alpha<impl ServerReflectionV1Alpha>, ReflectionError> {
    reflection_builder(served).build_v1alpha()
}

fn reflection_builder(served: &[&str]) -> Builder<'static> {
    let builder = Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    served
        .iter()
        .fold(builder, |b, name| b.with_service_name(*name))
}

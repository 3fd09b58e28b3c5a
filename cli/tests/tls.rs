//! Mutual TLS between the coordinator and the workers, with real processes: `baton certs`
//! writes a CA, a certificate per role and a cluster key; a cluster configured with them serves a
//! disaggregated request (its KV links authenticated by the key); a worker with TLS refuses a plaintext client and a client whose
//! certificate another CA signed; a coordinator without the CA's certificates never gets a
//! worker.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_proto::v1::{self, decode_worker_client::DecodeWorkerClient};
use common::{START_LIMIT, certs, channel, get, model, worker};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A TLS client of a decode worker presenting `who`'s certificate from `dir`, trusting `ca`.
async fn tls_info(addr: SocketAddr, dir: &Path, who: &str, ca: &Path) -> Result<(), String> {
    let read = |p: std::path::PathBuf| std::fs::read(p).expect("read pem");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca.join("ca.pem"))))
        .identity(Identity::from_pem(
            read(dir.join(format!("{who}.pem"))),
            read(dir.join(format!("{who}.key"))),
        ))
        .domain_name("baton-decode");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    DecodeWorkerClient::new(channel)
        .info(v1::InfoRequest {})
        .await
        .map(drop)
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_mutual_tls_serves_and_its_workers_refuse_strangers() {
    let dir = std::env::temp_dir().join(format!("baton-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
    certs(&ours);
    certs(&theirs);
    // A second run into the same directory refuses to overwrite the CA.
    let again = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["certs", "--out", ours.to_str().expect("utf-8")])
        .output()
        .expect("baton certs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("does not overwrite"));

    let model = model();
    // The config `baton certs` wrote: every role's certificate and the cluster key, so the
    // handoff below also crosses KV links that proved the key.
    let workers_config = ours.join("tls.toml");
    let prefill = worker(
        "prefill",
        &model,
        &["--config", workers_config.to_str().expect("utf-8")],
    );
    let decode = worker(
        "decode",
        &model,
        &["--config", workers_config.to_str().expect("utf-8")],
    );
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);

    // The worker answers a client with one of the CA's certificates, and nobody else.
    let ok = tokio::time::timeout(START_LIMIT, async {
        loop {
            match tls_info(d, &ours, "coordinator", &ours).await {
                Ok(()) => return,
                Err(e) if e.contains("Unavailable") || e.contains("connect") => {
                    tokio::task::yield_now().await
                }
                Err(e) => panic!("a client with the CA's certificate: {e}"),
            }
        }
    })
    .await;
    assert!(ok.is_ok(), "the decode worker never answered over TLS");
    let stranger = tls_info(d, &theirs, "coordinator", &ours).await;
    assert!(
        stranger.is_err(),
        "another CA's client certificate is refused"
    );
    let plaintext = DecodeWorkerClient::new(channel(d))
        .info(v1::InfoRequest {})
        .await;
    assert!(plaintext.is_err(), "a plaintext client is refused");

    // A coordinator with its certificate serves a disaggregated request through them.
    let coordinator_config = ours.join("tls.toml");
    let coord = common::coordinator(
        &model,
        &[p],
        &[d],
        &["--config", coordinator_config.to_str().expect("utf-8")],
    );
    let (grpc, http) = (coord.addrs[0], coord.addrs[1]);
    let started = Instant::now();
    while !matches!(get(http, "/ready"), Ok((200, _))) {
        assert!(
            started.elapsed() < START_LIMIT,
            "coordinator never ready over TLS"
        );
        tokio::task::yield_now().await;
    }
    let mut client = v1::inference_client::InferenceClient::new(channel(grpc));
    let mut stream = client
        .generate(common::forced((300..364).collect(), 4))
        .await
        .expect("generate")
        .into_inner();
    let (_, finish) = common::to_finish(&mut stream).await;
    let placement = finish.placement.expect("placement");
    assert_eq!(placement.mode, "disaggregated");

    // A coordinator without certificates never admits them.
    let plain = common::coordinator(&model, &[], &[d], &[]);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (status, _) = get(plain.addrs[1], "/ready").expect("ready");
        assert_eq!(
            status, 503,
            "a worker answered a coordinator without certificates"
        );
        tokio::task::yield_now().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! `baton status`: the pool as one coordinator sees it: every worker with its role, state,
//! how it was found, host, device, KV blocks and load, refused workers with the reason, every
//! (prefill, decode) pair's KV link and its measured speed, and the pooled totals (gRPC
//! `ClusterStatus`).

use baton_proto::v1::{ClusterStatusRequest, WorkerRole, inference_client::InferenceClient};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
    /// Print the answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", args.coordinator))
            .await
            .map_err(|e| anyhow::anyhow!("coordinator {}: {e}", args.coordinator))?;
        anyhow::Ok(
            client
                .cluster_status(crate::api_key::request(ClusterStatusRequest {})?)
                .await?
                .into_inner(),
        )
    })?;
    if args.json {
        let workers: Vec<serde_json::Value> = status
            .workers
            .iter()
            .map(|w| {
                let load = w.load.clone().unwrap_or_default();
                serde_json::json!({
                    "worker_id": w.worker_id,
                    "role": role(w.role),
                    "state": w.state,
                    "discovered_via": w.discovered_via,
                    "address": w.address,
                    "host_id": w.host_id,
                    "device": w.device,
                    "refusal": w.refusal,
                    "free_blocks": load.free_blocks,
                    "total_blocks": load.total_blocks,
                    "running": load.running,
                    "waiting": load.waiting,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "workers": workers,
                "running_requests": status.running_requests,
                "waiting_requests": status.waiting_requests,
                "links": status.links.iter().map(|l| serde_json::json!({
                    "prefill_worker": l.prefill_worker,
                    "decode_worker": l.decode_worker,
                    "open": l.open,
                    "shm": l.shm,
                    "bytes_per_second": l.bytes_per_second,
                })).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<34} {:<10} {:<7} {:<22} {:<14} {:<7} {:>13} {:>8}",
        "ROLE", "WORKER", "STATE", "VIA", "ADDRESS", "HOST", "DEVICE", "KV FREE/ALL", "RUN+WAIT"
    );
    let (mut free, mut total) = (0u64, 0u64);
    for w in &status.workers {
        let load = w.load.clone().unwrap_or_default();
        if w.state == "routable" {
            free += u64::from(load.free_blocks);
            total += u64::from(load.total_blocks);
        }
        let host: String = w.host_id.chars().take(12).collect();
        println!(
            "{:<8} {:<34} {:<10} {:<7} {:<22} {:<14} {:<7} {:>13} {:>8}",
            role(w.role),
            w.worker_id,
            w.state,
            w.discovered_via,
            w.address,
            host,
            w.device,
            format!("{}/{}", load.free_blocks, load.total_blocks),
            load.running + load.waiting,
        );
        if !w.refusal.is_empty() {
            println!("         refused: {}", w.refusal);
        }
    }
    let routable = status
        .workers
        .iter()
        .filter(|w| w.state == "routable")
        .count();
    for l in &status.links {
        let link = match (l.open, l.shm) {
            (true, true) => "open (tcp + shm)",
            (true, false) => "open (tcp)",
            _ => "not open",
        };
        let speed = l.bytes_per_second.map_or_else(
            || "kept up with prefill".to_string(),
            |b| format!("{:.1} MB/s measured", b / 1e6),
        );
        println!(
            "link     {} -> {}: {link}, {speed}",
            l.prefill_worker, l.decode_worker
        );
    }
    println!(
        "pool: {routable} of {} workers routable, KV blocks {free} free of {total}; requests {} running, {} waiting",
        status.workers.len(),
        status.running_requests,
        status.waiting_requests
    );
    Ok(())
}

fn role(r: i32) -> &'static str {
    match WorkerRole::try_from(r) {
        Ok(WorkerRole::Prefill) => "prefill",
        Ok(WorkerRole::Decode) => "decode",
        _ => "other",
    }
}

//! `baton worker drain|refuse|restore ID`: an operator's standing decision about a worker,
//! sent to one coordinator (gRPC `DecideWorker`), which has the coordinators' raft group agree
//! on it before it answers; from then on no coordinator places new work on a drained or
//! refused worker, until it is restored.

use baton_proto::v1::{DecideWorkerRequest, WorkerDecision, inference_client::InferenceClient};

#[derive(clap::Args)]
pub struct DecideArgs {
    /// The worker's id, as `baton status` lists it.
    pub worker_id: String,
    /// Why (logged, and shown by `baton status` for a refusal).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// The gRPC address of any coordinator of the group.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
}

pub fn run(decision: WorkerDecision, args: DecideArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = runtime.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{}", args.coordinator))
            .await
            .map_err(|e| anyhow::anyhow!("coordinator {}: {e}", args.coordinator))?;
        let request = crate::api_key::request(DecideWorkerRequest {
            worker_id: args.worker_id.clone(),
            decision: decision as i32,
            reason: args.reason.clone(),
        })?;
        anyhow::Ok(client.decide_worker(request).await?.into_inner())
    })?;
    let verb = match decision {
        WorkerDecision::Drain => "drained",
        WorkerDecision::Refuse => "refused",
        _ => "restored",
    };
    if answer.changed {
        println!("{} {verb} (every coordinator agreed)", args.worker_id);
    } else {
        println!("{} was already {verb}", args.worker_id);
    }
    if !answer.known {
        eprintln!(
            "note: coordinator {} knows no worker {:?} (yet); the decision holds for it when it joins",
            args.coordinator, args.worker_id
        );
    }
    Ok(())
}

//! `baton budget`: the cloud budget: each cap's current window (spent, reserved, remaining,
//! when it resets), each upstream's spend, and the reservations not yet settled. Asks a
//! running coordinator (gRPC `Budget`), or with `--offline` reads the replicated state's
//! database of the configuration directly, as this coordinator last applied it (it must be
//! stopped: the database admits one process).

use baton_proto::v1::{BudgetRequest, BudgetResponse, inference_client::InferenceClient};

use crate::config::RoleName;
use crate::roles::ConfigArgs;

#[derive(clap::Args)]
pub struct BudgetArgs {
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
    /// Read the ledger from the database named by the configuration (`coordinator.replica.data`,
    /// else `coordinator.cloud.budget.ledger`) instead of asking a coordinator; for a
    /// coordinator that is stopped (or was killed). It shows what that coordinator had applied.
    #[arg(long)]
    pub offline: bool,
    /// Print the answer as JSON (amounts in nanodollars, exact) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: BudgetArgs) -> anyhow::Result<()> {
    let budget = if args.offline {
        let sources = args.config.sources(Some(RoleName::Coordinator), |_| {})?;
        let loaded = crate::config::load(&sources)?;
        let coordinator = &loaded.config.coordinator;
        let config = &coordinator.cloud;
        if config.endpoints.is_empty() {
            anyhow::bail!("the configuration has no cloud endpoints (coordinator.cloud.endpoints)");
        }
        let replica = coordinator.replica()?;
        let state = baton_replica::read_state(&replica.data).map_err(|e| anyhow::anyhow!(e))?;
        let mut snapshot = state
            .ledger
            .snapshot(
                &config.budget.caps,
                &config.budget.time_zone,
                jiff::Timestamp::now(),
            )
            .map_err(|e| anyhow::anyhow!("coordinator.cloud.budget: {e}"))?;
        // This coordinator is stopped: what it holds open is its previous run's (its next
        // start charges those in full); other members' reservations may still be live.
        for open in &mut snapshot.open {
            open.from_previous_run = state
                .owner(open.id)
                .is_some_and(|o| o.node == replica.node_id);
        }
        baton_coordinator::budget_to_proto(
            &snapshot,
            &config.budget,
            &replica.data.display().to_string(),
        )
    } else {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut client = InferenceClient::connect(format!("http://{}", args.coordinator))
                .await
                .map_err(|e| anyhow::anyhow!("coordinator {}: {e}", args.coordinator))?;
            let request = crate::api_key::request(BudgetRequest {})?;
            anyhow::Ok(client.budget(request).await?.into_inner())
        })?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json(&budget))?);
    } else {
        print!("{}", table(&budget));
    }
    Ok(())
}

fn dollars(nanos: u64) -> String {
    baton_budget::Usd::from_nanos(nanos).to_string()
}

fn json(b: &BudgetResponse) -> serde_json::Value {
    serde_json::json!({
        "configured": b.configured,
        "ledger": b.ledger,
        "time_zone": b.time_zone,
        "windows": b.windows.iter().map(|w| serde_json::json!({
            "scope": w.scope,
            "period": w.period,
            "start": w.start,
            "end": w.end,
            "cap_nanodollars": w.cap_nanodollars,
            "spent_nanodollars": w.spent_nanodollars,
            "reserved_nanodollars": w.reserved_nanodollars,
            "remaining_nanodollars": w.remaining_nanodollars,
            "overrun_nanodollars": w.overrun_nanodollars,
            "settled": w.settled,
            "open": w.open,
        })).collect::<Vec<_>>(),
        "upstreams": b.upstreams.iter().map(|u| serde_json::json!({
            "endpoint": u.endpoint,
            "spent_nanodollars": u.spent_nanodollars,
            "overrun_nanodollars": u.overrun_nanodollars,
            "settled": u.settled,
        })).collect::<Vec<_>>(),
        "open": b.open.iter().map(|r| serde_json::json!({
            "id": r.id,
            "endpoint": r.endpoint,
            "amount_nanodollars": r.amount_nanodollars,
            "request_id": r.request_id,
            "created": r.created,
            "from_previous_run": r.from_previous_run,
        })).collect::<Vec<_>>(),
        "replica": b.replica.as_ref().map(|r| serde_json::json!({
            "node_id": r.node_id,
            "leader": r.leader,
            "term": r.term,
            "members": r.members,
            "applied": r.applied,
        })),
    })
}

fn table(b: &BudgetResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if !b.configured {
        out.push_str("no cloud upstreams are configured: nothing is spent\n");
        return out;
    }
    let _ = writeln!(out, "ledger {}   time zone {}", b.ledger, b.time_zone);
    if let Some(r) = &b.replica {
        let leader = match r.leader {
            None => "none (an election)".to_string(),
            Some(l) if l == r.node_id => format!("{l} (this coordinator)"),
            Some(l) => l.to_string(),
        };
        let _ = writeln!(
            out,
            "replicated by coordinators {:?}: this is {}, leader {leader}, term {}",
            r.members, r.node_id, r.term
        );
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<6} {:>12} {:>12} {:>12} {:>12} {:>8} {:>5}  resets at",
        "SCOPE", "PERIOD", "CAP", "SPENT", "RESERVED", "REMAINING", "SETTLED", "OPEN"
    );
    for w in &b.windows {
        let _ = writeln!(
            out,
            "{:<22} {:<6} {:>12} {:>12} {:>12} {:>12} {:>8} {:>5}  {}{}",
            w.scope,
            w.period,
            dollars(w.cap_nanodollars),
            dollars(w.spent_nanodollars),
            dollars(w.reserved_nanodollars),
            dollars(w.remaining_nanodollars),
            w.settled,
            w.open,
            w.end,
            if w.overrun_nanodollars > 0 {
                format!("   (overrun {})", dollars(w.overrun_nanodollars))
            } else {
                String::new()
            },
        );
    }
    if !b.upstreams.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<22} {:>12} {:>12} {:>8}",
            "UPSTREAM", "SPENT", "OVERRUN", "SETTLED"
        );
        for u in &b.upstreams {
            let _ = writeln!(
                out,
                "{:<22} {:>12} {:>12} {:>8}",
                u.endpoint,
                dollars(u.spent_nanodollars),
                dollars(u.overrun_nanodollars),
                u.settled
            );
        }
    }
    if !b.open.is_empty() {
        let _ = writeln!(out, "\nopen reservations:");
        for r in &b.open {
            let _ = writeln!(
                out,
                "  #{} {} {} request {} since {}{}",
                r.id,
                r.endpoint,
                dollars(r.amount_nanodollars),
                r.request_id,
                r.created,
                if r.from_previous_run {
                    "  (in flight when the coordinator last stopped)"
                } else {
                    ""
                }
            );
        }
    }
    out
}

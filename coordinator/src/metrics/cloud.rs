//! The cloud path's metrics: why requests spilled or stayed, each upstream's attempts, errors
//! and outcomes, and (read from the budget ledger on each scrape, so they survive a restart)
//! spend, overruns and every cap's current window.

use std::sync::Arc;

use baton_budget::Usd;

use crate::budget::Budget;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::placement::{Kept, SpillReason, Unfit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// cloud_only_model | local_failed | no_local_worker | local_full | queue_wait
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeptLabels {
    reason: &'static str,
    /// not_allowed | not_served | over_max_cost | busy | budget
    why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointOutcome {
    endpoint: String,
    /// stop | length | cancelled | an error class
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointError {
    endpoint: String,
    /// connect | timeout | rate_limited | status | stream_cut | protocol
    kind: &'static str,
}

#[derive(Default)]
pub struct CloudMetrics {
    spills: Family<ReasonLabels, Counter>,
    kept: Family<KeptLabels, Counter>,
    attempts: Family<EndpointLabels, Counter>,
    errors: Family<EndpointError, Counter>,
    outcomes: Family<EndpointOutcome, Counter>,
}

impl CloudMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cloud_spills",
            "Requests sent to a cloud upstream, by why they left the local cluster",
            self.spills.clone(),
        );
        registry.register(
            "cloud_kept_local",
            "Requests that had a reason to spill but stayed local, by reason and what kept them (not allowed, or no upstream fit: busy, budget, max_cost_usd)",
            self.kept.clone(),
        );
        registry.register(
            "cloud_attempts",
            "Requests sent to each cloud upstream (a retry on the next upstream counts again)",
            self.attempts.clone(),
        );
        registry.register(
            "cloud_upstream_errors",
            "Cloud upstream failures, by kind",
            self.errors.clone(),
        );
        registry.register(
            "cloud_requests",
            "Cloud requests that ended, by upstream and outcome",
            self.outcomes.clone(),
        );
        for reason in [
            SpillReason::CloudOnlyModel,
            SpillReason::LocalFailed,
            SpillReason::NoLocalWorker,
            SpillReason::LocalFull,
            SpillReason::QueueWait,
        ] {
            let _ = self.spills.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
    }

    pub fn spilled(&self, reason: SpillReason) {
        self.spills
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn kept(&self, reason: SpillReason, kept: Kept) {
        let why = match kept {
            Kept::NotAllowed => "not_allowed",
            Kept::Unfit(Unfit::NotServed) => "not_served",
            Kept::Unfit(Unfit::OverMaxCost) => "over_max_cost",
            Kept::Unfit(Unfit::Busy) => "busy",
            Kept::Unfit(Unfit::Budget) => "budget",
        };
        self.kept
            .get_or_create(&KeptLabels {
                reason: reason.as_str(),
                why,
            })
            .inc();
    }

    pub fn attempt(&self, endpoint: &str) {
        self.attempts
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    pub fn failed(&self, endpoint: &str, e: &baton_cloud::UpstreamError) {
        use baton_cloud::UpstreamErrorKind as K;
        let kind = match e.kind {
            K::Connect(_) => "connect",
            K::Timeout { .. } => "timeout",
            K::RateLimited { .. } => "rate_limited",
            K::Status { .. } => "status",
            K::StreamCut { .. } => "stream_cut",
            K::Protocol(_) => "protocol",
        };
        self.errors
            .get_or_create(&EndpointError {
                endpoint: endpoint.to_string(),
                kind,
            })
            .inc();
    }

    pub fn finished(&self, endpoint: &str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&EndpointOutcome {
                endpoint: endpoint.to_string(),
                outcome,
            })
            .inc();
    }
}

/// Reads the ledger, as applied on this coordinator, on each scrape.
pub struct LedgerCollector {
    pub budget: Arc<Budget>,
}

impl std::fmt::Debug for LedgerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WindowLabels {
    /// global | endpoint:<name>
    scope: String,
    /// hour | day | month
    period: &'static str,
}

/// One figure of a cap's window.
type WindowField = fn(&baton_budget::WindowReport) -> Usd;

fn dollars(u: Usd) -> f64 {
    u.dollars()
}

impl Collector for LedgerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.budget.snapshot();
        let mut counter =
            |name: &str, help: &str, get: &dyn Fn(&baton_budget::EndpointTotals) -> Usd| {
                let mut family = encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for e in &snapshot.endpoints {
                    let labels = EndpointLabels {
                        endpoint: e.endpoint.clone(),
                    };
                    ConstCounter::new(dollars(get(e))).encode(family.encode_family(&labels)?)?;
                }
                Ok::<_, std::fmt::Error>(())
            };
        counter(
            "cloud_spend_dollars",
            "US dollars charged by each cloud upstream, as settled in the budget ledger (lifetime; reservations not yet settled are not included)",
            &|e| e.spent,
        )?;
        counter(
            "cloud_overrun_dollars",
            "US dollars an upstream reported above what its requests had reserved (lifetime)",
            &|e| e.overrun,
        )?;
        let windows: [(&str, &str, WindowField); 4] = [
            (
                "cloud_budget_cap_dollars",
                "Each budget cap, in US dollars",
                |w| w.cap,
            ),
            (
                "cloud_budget_spent_dollars",
                "US dollars settled in each cap's current window",
                |w| w.spent,
            ),
            (
                "cloud_budget_reserved_dollars",
                "US dollars reserved by requests in flight in each cap's current window",
                |w| w.reserved,
            ),
            (
                "cloud_budget_remaining_dollars",
                "US dollars left in each cap's current window (cap less spent and reserved)",
                |w| w.remaining,
            ),
        ];
        for (name, help, get) in windows {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for w in &snapshot.windows {
                let labels = WindowLabels {
                    scope: match &w.scope {
                        baton_budget::Scope::Global => "global".to_string(),
                        baton_budget::Scope::Endpoint(e) => format!("endpoint:{e}"),
                    },
                    period: w.period.as_str(),
                };
                ConstGauge::new(dollars(get(w))).encode(family.encode_family(&labels)?)?;
            }
        }
        let open = ConstGauge::new(snapshot.open.len() as i64);
        open.encode(encoder.encode_descriptor(
            "cloud_open_reservations",
            "Budget reservations not yet settled (requests in flight here and on the other coordinators)",
            None,
            open.metric_type(),
        )?)?;
        let status = self.budget.replica().status();
        let gauges = [
            (
                "replica_leader",
                "1 when this coordinator leads the coordinators' raft group (which replicates the budget ledger), else 0",
                i64::from(status.is_leader),
            ),
            (
                "replica_leader_known",
                "1 when this coordinator knows a raft leader (0 during an election or without quorum: budget decisions wait)",
                i64::from(status.leader.is_some()),
            ),
            (
                "replica_term",
                "The raft term this coordinator is in (it rises with each election)",
                i64::try_from(status.term).unwrap_or(i64::MAX),
            ),
            (
                "replica_applied_index",
                "The index of the last raft log entry applied to the state here",
                i64::try_from(status.applied.unwrap_or(0)).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

//! The `[budget]` table of the coordinator's config: where the ledger lives (the coordinator's
//! replicated-state database, unless `replica.data` names it), which time zone aligns the
//! windows, and the caps. Validated once, by [`BudgetConfig::validate`], at start.
//!
//! ```toml
//! [budget]
//! ledger = "/var/lib/baton/ledger.redb"
//! time_zone = "America/New_York"
//! caps = [
//!   { period = "day", cap_usd = 50.0 },
//!   { period = "hour", cap_usd = 5.0, endpoint = "openai" },
//! ]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::tz::TimeZone;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::money::Usd;
use crate::window::{Period, Scope};

/// One hard dollar cap: what `endpoint` (or every endpoint, when unset) may spend per window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapConfig {
    /// The window the cap resets on: "hour", "day" or "month", calendar-aligned in
    /// `budget.time_zone`.
    pub period: Period,
    /// The most that may be spent (settled plus reserved) in one window, in US dollars.
    pub cap_usd: f64,
    /// The cloud endpoint this cap limits, by its configured name. Default: unset, a global cap
    /// on all cloud endpoints together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl CapConfig {
    /// Global, or the named endpoint.
    pub fn scope(&self) -> Scope {
        match &self.endpoint {
            None => Scope::Global,
            Some(name) => Scope::Endpoint(name.clone()),
        }
    }

    /// The cap as an exact amount; `None` where `cap_usd` is not a valid amount.
    pub fn cap(&self) -> Option<Usd> {
        Usd::from_dollars(self.cap_usd).filter(|cap| *cap > Usd::ZERO)
    }
}

/// The cloud budget: the ledger file, the zone that aligns windows, and the caps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// The ledger's database file (redb), created if missing; its directory must exist.
    /// Default: empty, which [`validate`](BudgetConfig::validate) rejects: a ledger that
    /// survives restarts is what makes the caps hold, so its place is the operator's choice.
    pub ledger: PathBuf,
    /// IANA time zone name (e.g. "Europe/Berlin") whose civil hours, days and months the
    /// windows follow. Default "UTC".
    pub time_zone: String,
    /// The caps; each request is reserved against every global cap and every cap of its
    /// endpoint. Default: none (cloud spend is recorded but unlimited).
    pub caps: Vec<CapConfig>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ledger: PathBuf::new(),
            time_zone: "UTC".to_string(),
            caps: Vec::new(),
        }
    }
}

impl BudgetConfig {
    /// Checks every value; an error names its key, e.g. field `budget.caps[1].cap_usd`, reason
    /// "must be a positive number of dollars".
    pub fn validate(&self) -> Result<()> {
        if self.ledger.as_os_str().is_empty() {
            return Err(Error::invalid_config(
                "budget.ledger",
                "must name the ledger file (it records cloud spend across restarts)",
            ));
        }
        self.validate_caps()
    }

    /// The time zone and the caps, for a ledger kept elsewhere (the coordinators' replicated
    /// state names its own file).
    pub fn validate_caps(&self) -> Result<()> {
        self.time_zone()?;
        let mut seen: BTreeMap<(Scope, Period), usize> = BTreeMap::new();
        for (i, cap) in self.caps.iter().enumerate() {
            if cap.cap().is_none() {
                return Err(Error::invalid_config(
                    format!("budget.caps[{i}].cap_usd"),
                    format!(
                        "must be a positive number of dollars, at most one billion (got {})",
                        cap.cap_usd
                    ),
                ));
            }
            if cap.endpoint.as_ref().is_some_and(|e| e.trim().is_empty()) {
                return Err(Error::invalid_config(
                    format!("budget.caps[{i}].endpoint"),
                    "must name a cloud endpoint, or be left out for a global cap",
                ));
            }
            if let Some(first) = seen.insert((cap.scope(), cap.period), i) {
                return Err(Error::invalid_config(
                    format!("budget.caps[{i}]"),
                    format!(
                        "repeats the {} cap ({}) of budget.caps[{first}]; one cap per scope and period",
                        cap.period,
                        cap.scope()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The configured zone.
    pub fn time_zone(&self) -> Result<TimeZone> {
        TimeZone::get(&self.time_zone).map_err(|e| {
            Error::invalid_config(
                "budget.time_zone",
                format!("{:?} is not a known IANA time zone ({e})", self.time_zone),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> BudgetConfig {
        BudgetConfig {
            ledger: PathBuf::from("ledger.redb"),
            time_zone: "Europe/Berlin".into(),
            caps: vec![
                CapConfig {
                    period: Period::Day,
                    cap_usd: 5.0,
                    endpoint: None,
                },
                CapConfig {
                    period: Period::Hour,
                    cap_usd: 1.0,
                    endpoint: Some("openai".into()),
                },
            ],
        }
    }

    fn bad_field(config: &BudgetConfig) -> Option<String> {
        match config.validate() {
            Err(Error::InvalidConfig { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn valid_config_passes() {
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn empty_ledger_path_names_budget_ledger() {
        let config = BudgetConfig {
            ledger: PathBuf::new(),
            ..valid()
        };
        assert_eq!(bad_field(&config).as_deref(), Some("budget.ledger"));
    }

    #[test]
    fn unknown_time_zone_names_budget_time_zone() {
        let config = BudgetConfig {
            time_zone: "Mars/Olympus_Mons".into(),
            ..valid()
        };
        assert_eq!(bad_field(&config).as_deref(), Some("budget.time_zone"));
    }

    #[test]
    fn bad_cap_amounts_name_their_index() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e9] {
            let mut config = valid();
            config.caps[1].cap_usd = bad;
            assert_eq!(
                bad_field(&config).as_deref(),
                Some("budget.caps[1].cap_usd"),
                "cap_usd = {bad}"
            );
        }
        let mut config = valid();
        config.caps[1].cap_usd = -1.0;
        let message = config.validate().err().map(|e| e.to_string());
        assert_eq!(
            message.as_deref(),
            Some(
                "invalid configuration: budget.caps[1].cap_usd: must be a positive number of dollars, at most one billion (got -1)"
            )
        );
    }

    #[test]
    fn blank_endpoint_names_its_key() {
        let mut config = valid();
        config.caps[1].endpoint = Some(" ".into());
        assert_eq!(
            bad_field(&config).as_deref(),
            Some("budget.caps[1].endpoint")
        );
    }

    #[test]
    fn duplicate_scope_and_period_names_the_repeat() {
        let mut config = valid();
        config.caps.push(CapConfig {
            period: Period::Day,
            cap_usd: 9.0,
            endpoint: None,
        });
        assert_eq!(bad_field(&config).as_deref(), Some("budget.caps[2]"));
        // The same period for another scope is fine.
        config.caps[2].endpoint = Some("openai".into());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn default_is_utc_with_no_caps_and_needs_a_ledger() {
        let config = BudgetConfig::default();
        assert_eq!(config.time_zone, "UTC");
        assert!(config.caps.is_empty());
        assert_eq!(bad_field(&config).as_deref(), Some("budget.ledger"));
    }

    #[test]
    fn json_schema_documents_every_key() {
        let schema =
            serde_json::to_string(&schemars::schema_for!(BudgetConfig)).unwrap_or_default();
        for key in [
            "ledger",
            "time_zone",
            "caps",
            "cap_usd",
            "endpoint",
            "period",
            "month",
        ] {
            assert!(schema.contains(key), "{key} missing from {schema}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let json =
            r#"{"ledger": "x", "caps": [{"period": "day", "cap_usd": 1.0, "endpoit": "a"}]}"#;
        assert!(serde_json::from_str::<BudgetConfig>(json).is_err());
        let json = r#"{"ledger": "x", "caps": [{"period": "week", "cap_usd": 1.0}]}"#;
        assert!(serde_json::from_str::<BudgetConfig>(json).is_err());
        let json = r#"{"ledger": "x", "caps": [{"period": "day", "cap_usd": 1.5}]}"#;
        let parsed = serde_json::from_str::<BudgetConfig>(json).ok();
        assert_eq!(parsed.map(|c| c.time_zone), Some("UTC".to_string()));
    }
}

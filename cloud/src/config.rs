//! One cloud endpoint's settings: a `[[coordinator.cloud.endpoints]]` table of the config file,
//! validated once at start.
//!
//! The struct holds the *name* of the key's environment variable or the *path* of its file,
//! never the key, so serializing it (`baton config show`, the JSON Schema) cannot leak one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::ApiKey;

/// How the key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthHeader {
    /// `Authorization: Bearer KEY` (OpenAI, Groq, Together, baton).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure).
    ApiKey,
}

/// An OpenAI-compatible endpoint the coordinator may spill requests to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The endpoint's name: unique among endpoints, 1 to 64 of `a-z 0-9 _ -`; it labels
    /// metrics and ledger entries. Required.
    pub name: String,
    /// The URL before `/chat/completions` and `/completions`, e.g.
    /// "https://api.groq.com/openai/v1"; http or https, no query, no credentials. Required.
    pub base_url: String,
    /// The environment variable holding the API key, read once at start. Set at most one of
    /// `api_key_env` and `api_key_file`; neither means no auth header (another baton on the
    /// LAN). Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A file holding the API key (surrounding whitespace trimmed), re-read whenever its
    /// modification time or length changes, for short-lived tokens. Its contents are never
    /// printed. Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// How the key is sent: "bearer" (`Authorization: Bearer KEY`) or "api-key"
    /// (`api-key: KEY`, as Azure wants). Default "bearer".
    #[serde(default)]
    pub auth_header: AuthHeader,
    /// Served model name -> the endpoint's name for it; at least one. Requests for other
    /// models never go to this endpoint. Required.
    pub models: BTreeMap<String, String>,
    /// Price of prompt tokens, in USD per million tokens (finite, >= 0). Required.
    pub input_usd_per_mtok: f64,
    /// Price of prompt tokens the endpoint served from its prompt cache, in USD per million
    /// tokens (finite, >= 0). Default: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Price of generated tokens, in USD per million tokens (finite, >= 0). Required.
    pub output_usd_per_mtok: f64,
    /// Requests in flight to this endpoint at once (> 0); beyond it the endpoint is full and
    /// placement looks elsewhere. Default 16.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Longest wait for a TCP (and TLS) connection (a duration: "5s", "500ms"; > 0). Default
    /// 5s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Longest wait from sending the request to the first content (or finish) chunk, on top
    /// of `connect_timeout` (a duration; > 0). Covers the endpoint's queue and prefill.
    /// Default 30s.
    #[serde(default = "default_first_token_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub first_token_timeout: Duration,
    /// Longest gap between chunks once the first token arrived (a duration; > 0). Default
    /// 30s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
}

fn default_max_concurrent() -> usize {
    16
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_first_token_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

impl EndpointConfig {
    /// An endpoint with no key, no models, zero prices and the default limits and timeouts;
    /// the caller fills in the rest.
    pub fn new(name: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            api_key_env: None,
            api_key_file: None,
            auth_header: AuthHeader::Bearer,
            models: BTreeMap::new(),
            input_usd_per_mtok: 0.0,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 0.0,
            max_concurrent: default_max_concurrent(),
            connect_timeout: default_connect_timeout(),
            first_token_timeout: default_first_token_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }

    /// Checks every field, and that the key can be read now. `index` is the endpoint's
    /// position in the list: errors name the key as `cloud.endpoints[<index>].<field>`.
    /// Names' uniqueness across the list is [`validate_endpoints`]' job.
    pub fn validate(&self, index: usize) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(Error::InvalidConfig {
                field: format!("cloud.endpoints[{index}].{field}"),
                reason,
            })
        };
        if let Err(reason) = check_name(&self.name) {
            return bad("name", reason);
        }
        if let Err(reason) = parse_base_url(&self.base_url) {
            return bad("base_url", reason);
        }
        if self.models.is_empty() {
            return bad("models", "at least one model is required".into());
        }
        if let Some((served, remote)) = self
            .models
            .iter()
            .find(|(served, remote)| served.is_empty() || remote.is_empty())
        {
            return bad(
                "models",
                format!("{served:?} = {remote:?}: model names must not be empty"),
            );
        }
        let prices = [
            ("input_usd_per_mtok", Some(self.input_usd_per_mtok)),
            ("cached_input_usd_per_mtok", self.cached_input_usd_per_mtok),
            ("output_usd_per_mtok", Some(self.output_usd_per_mtok)),
        ];
        for (field, price) in prices {
            if let Some(price) = price
                && !(price.is_finite() && price >= 0.0)
            {
                return bad(field, format!("{price} is not a finite price >= 0"));
            }
        }
        if self.max_concurrent == 0 {
            return bad("max_concurrent", "must be positive".into());
        }
        let timeouts = [
            ("connect_timeout", self.connect_timeout),
            ("first_token_timeout", self.first_token_timeout),
            ("idle_timeout", self.idle_timeout),
        ];
        for (field, timeout) in timeouts {
            if timeout.is_zero() {
                return bad(field, "must be positive".into());
            }
        }
        let key_field = match (&self.api_key_env, &self.api_key_file) {
            (Some(_), Some(_)) => {
                return bad(
                    "api_key_env",
                    "set one of api_key_env and api_key_file, not both".into(),
                );
            }
            (Some(_), None) => "api_key_env",
            (None, Some(_)) => "api_key_file",
            (None, None) => return Ok(()),
        };
        match ApiKey::new(self) {
            Ok(_) => Ok(()),
            Err(Error::Key { reason, .. }) => bad(key_field, reason),
            Err(other) => Err(other),
        }
    }

    /// Price of cached prompt tokens in USD per million: the configured one, else the input
    /// price.
    pub fn cached_input_price(&self) -> f64 {
        self.cached_input_usd_per_mtok
            .unwrap_or(self.input_usd_per_mtok)
    }
}

/// Validates every endpoint of the list and that their names are unique.
pub fn validate_endpoints(endpoints: &[EndpointConfig]) -> Result<()> {
    let mut names = BTreeSet::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        endpoint.validate(index)?;
        if !names.insert(endpoint.name.as_str()) {
            return Err(Error::InvalidConfig {
                field: format!("cloud.endpoints[{index}].name"),
                reason: format!("{:?} names an earlier endpoint too", endpoint.name),
            });
        }
    }
    Ok(())
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not 1 to 64 of a-z 0-9 _ -"))
    }
}

/// The base URL, parsed, without a trailing slash. Reasons never quote the URL: one with
/// credentials in it would otherwise print them.
pub(crate) fn parse_base_url(base_url: &str) -> std::result::Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(base_url.trim_end_matches('/'))
        .map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold credentials: use api_key_env or api_key_file".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment: paths are appended to it".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> EndpointConfig {
        let mut c = EndpointConfig::new("groq", "https://api.groq.com/openai/v1");
        c.models
            .insert("llama-8b".into(), "llama-3.1-8b-instant".into());
        c.input_usd_per_mtok = 0.05;
        c.output_usd_per_mtok = 0.08;
        c
    }

    fn field_of(c: &EndpointConfig) -> Option<String> {
        match c.validate(2) {
            Err(Error::InvalidConfig { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn a_complete_endpoint_validates() {
        assert!(valid().validate(0).is_ok());
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        /// Breaks one field of a valid config.
        type Break = fn(&mut EndpointConfig);
        let cases: Vec<(&str, Break)> = vec![
            ("name", |c| c.name = "Groq!".into()),
            ("name", |c| c.name = String::new()),
            ("base_url", |c| c.base_url = "ftp://x/v1".into()),
            ("base_url", |c| c.base_url = "not a url".into()),
            ("base_url", |c| c.base_url = "https://u:p@x/v1".into()),
            ("base_url", |c| {
                c.base_url = "https://x/v1?api-version=1".into()
            }),
            ("models", |c| c.models.clear()),
            ("input_usd_per_mtok", |c| c.input_usd_per_mtok = -1.0),
            ("output_usd_per_mtok", |c| c.output_usd_per_mtok = f64::NAN),
            ("cached_input_usd_per_mtok", |c| {
                c.cached_input_usd_per_mtok = Some(f64::INFINITY)
            }),
            ("max_concurrent", |c| c.max_concurrent = 0),
            ("idle_timeout", |c| c.idle_timeout = Duration::ZERO),
            ("api_key_env", |c| {
                c.api_key_env = Some("A".into());
                c.api_key_file = Some("/k".into());
            }),
            ("api_key_env", |c| {
                c.api_key_env = Some("BATON_CLOUD_TEST_SURELY_UNSET".into())
            }),
            ("api_key_file", |c| {
                c.api_key_file = Some("/nonexistent/baton/key".into())
            }),
        ];
        for (field, break_it) in cases {
            let mut c = valid();
            break_it(&mut c);
            assert_eq!(
                field_of(&c).as_deref(),
                Some(format!("cloud.endpoints[2].{field}").as_str()),
                "{c:?}"
            );
        }
    }

    #[test]
    fn unreadable_key_file_error_names_the_path() {
        let mut c = valid();
        c.api_key_file = Some("/nonexistent/baton/key".into());
        let msg = c
            .validate(0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("/nonexistent/baton/key"), "{msg}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = validate_endpoints(&[valid(), valid()]).err();
        assert!(
            matches!(err, Some(Error::InvalidConfig { ref field, .. }) if field == "cloud.endpoints[1].name"),
            "{err:?}"
        );
    }

    #[test]
    fn cached_price_defaults_to_the_input_price() {
        let mut c = valid();
        assert_eq!(c.cached_input_price(), 0.05);
        c.cached_input_usd_per_mtok = Some(0.01);
        assert_eq!(c.cached_input_price(), 0.01);
    }

    #[test]
    fn defaults_fill_a_minimal_table_and_unknown_keys_are_refused() -> anyhow::Result<()> {
        let json = serde_json::json!({
            "name": "azure",
            "base_url": "https://x.openai.azure.com/openai/v1",
            "api_key_file": "/run/secrets/azure",
            "auth_header": "api-key",
            "models": {"gpt": "gpt-4o-mini"},
            "input_usd_per_mtok": 0.15,
            "output_usd_per_mtok": 0.6,
            "idle_timeout": "250ms",
        });
        let c: EndpointConfig = serde_json::from_value(json.clone())?;
        assert_eq!(c.auth_header, AuthHeader::ApiKey);
        assert_eq!(c.max_concurrent, 16);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.first_token_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_millis(250));

        let round: EndpointConfig = serde_json::from_value(serde_json::to_value(&c)?)?;
        assert_eq!(round, c);

        let mut unknown = json;
        unknown["api_key"] = "sk-inline".into();
        assert!(serde_json::from_value::<EndpointConfig>(unknown).is_err());
        Ok(())
    }

    #[test]
    fn schema_documents_every_field() -> anyhow::Result<()> {
        let schema = serde_json::to_value(schemars::schema_for!(EndpointConfig))?;
        let props = schema["properties"]
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("no properties"))?;
        for (name, prop) in props {
            assert!(
                prop.get("description").is_some(),
                "{name} has no description"
            );
        }
        Ok(())
    }
}

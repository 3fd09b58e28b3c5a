//! A worker's CPU priority, for a host whose cores it shares with other roles: a decode worker
//! that runs below a prefill worker leaves it the cores while a prompt computes, so time to
//! first token does not wait behind decode steps (measured in BENCHMARKS.md, "Prefix caching").

use std::io;

/// Lowers the CPU priority of every thread of this process to `nice` (0 to 19; higher runs
/// less). Returns how many threads it changed.
///
/// Linux keeps a nice value per thread and a new thread inherits its creator's, so each thread
/// that exists now is changed (`/proc/self/task`) and every later one inherits it. Raising a
/// priority needs privileges; this only lowers it.
#[cfg(target_os = "linux")]
pub fn lower_priority(nice: u8) -> io::Result<usize> {
    let mut changed = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let name = entry?.file_name();
        let Ok(tid) = name.to_string_lossy().parse::<libc::id_t>() else {
            continue;
        };
        // SAFETY: setpriority changes one thread's nice value and touches no memory of ours.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, i32::from(nice.min(19))) } != 0 {
            let e = io::Error::last_os_error();
            // A thread that ended since the listing has nothing to change.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
            continue;
        }
        changed += 1;
    }
    Ok(changed)
}

/// Elsewhere the nice value is the process's.
#[cfg(all(unix, not(target_os = "linux")))]
pub fn lower_priority(nice: u8) -> io::Result<usize> {
    // SAFETY: setpriority changes this process's nice value and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, i32::from(nice.min(19))) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(1)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The nice value of thread `tid`, from /proc (field 19 of its stat line).
    fn nice_of(tid: &str) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(16)
            .expect("nice")
            .parse()
            .expect("a number")
    }

    #[test]
    fn every_thread_now_and_later_runs_at_the_lower_priority() {
        // A child process, so the test binary's other threads keep their priority.
        if std::env::var_os("BATON_PRIORITY_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().expect("exe"))
                .args([
                    "--exact",
                    "priority::tests::every_thread_now_and_later_runs_at_the_lower_priority",
                    "--nocapture",
                ])
                .env("BATON_PRIORITY_CHILD", "1")
                .output()
                .expect("run the child");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{stdout}");
            assert!(
                stdout.contains("1 passed"),
                "the child ran the test: {stdout}"
            );
            return;
        }
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let before = std::thread::spawn(move || {
            let _ = parked.recv();
        });
        assert!(lower_priority(7).expect("lowered") >= 2);
        let later = std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            nice_of(&tid.to_string())
        });
        assert_eq!(
            later.join().expect("later thread"),
            7,
            "a later thread inherits"
        );
        for entry in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let tid = entry.expect("task").file_name();
            assert_eq!(nice_of(&tid.to_string_lossy()), 7, "thread {tid:?}");
        }
        stop.send(()).expect("wake");
        before.join().expect("earlier thread");
    }
}

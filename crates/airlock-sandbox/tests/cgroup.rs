//! Real cgroups, as root, on the layout this machine has (detect() picks it; on the
//! development container that is v1 beside a controller-less v2 hierarchy). Each test
//! starts real processes in a call's group and asserts what the kernel did to them.
//! The v2 code paths are unit-tested against a fake tree in src/cgroup.rs.
//!
//! Every test uses its own parent group, named after the test and this process, and a
//! guard removes it (killing what is left) even when the test fails. Each script is a
//! `sh` that waits on stdin, so its pid is placed in the group before it runs anything.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use airlock_sandbox::cgroup::{CgroupError, CgroupLimits, CgroupRoot, CgroupVersion};
use nix::sys::prctl::set_child_subreaper;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Pid, Uid};
use std::os::unix::process::ExitStatusExt;

const PYTHON: &str = "/usr/bin/python3";

/// Limits that no test reaches except the one under test.
const ROOMY: CgroupLimits = CgroupLimits {
    memory_bytes: 512 << 20,
    pids: 64,
    cpu_quota_percent: 100,
};

/// Root, and this test process is a subreaper, so the orphans of a killed tree are
/// ours to wait for (and their exit status to assert).
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        assert!(Uid::effective().is_root(), "the cgroup tests need root");
        set_child_subreaper(true).expect("become a subreaper");
    });
}

/// The test's own parent group; dropping it sweeps and removes it.
struct TestRoot {
    name: String,
}

impl TestRoot {
    fn new(test: &str) -> (TestRoot, CgroupRoot) {
        init();
        let name = format!("airlock-test-{}-{test}", std::process::id());
        let root = CgroupRoot::detect(&name).expect("detect");
        (TestRoot { name }, root)
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        if let Ok(root) = CgroupRoot::detect(&self.name) {
            let _ = root.remove();
        }
    }
}

/// `sh -c 'read go; <script>'`: waits until `go()`. Killed and reaped on drop.
struct Script {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Script {
    fn new(script: &str) -> Script {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read go; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Script { child, stdout }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("release the script");
        stdin.flush().expect("release the script");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the script's output");
        line.trim_end().to_string()
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the script") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "the script ran over {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_sigkilled(status: ExitStatus) {
    assert_eq!(status.signal(), Some(libc_sigkill()), "{status:?}");
}

fn libc_sigkill() -> i32 {
    Signal::SIGKILL as i32
}

fn group_dirs(files: &[PathBuf]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| {
            f.parent()
                .expect("a procs file is in a group")
                .to_path_buf()
        })
        .collect()
}

#[test]
fn detect_reports_this_machines_layout() {
    let (_guard, root) = TestRoot::new("detect");
    // This machine: v1 memory, pids, cpu, cpuacct and freezer; v2 has only hugetlb.
    assert_eq!(root.version(), CgroupVersion::V1);
    let features = root.features();
    assert!(features.swap_limit, "memory.memsw.* is present here");
    assert!(features.freezer);
    assert!(
        !features.oom_group_kill && !features.kill_file,
        "v1 has neither"
    );
    let dirs = root.dirs();
    assert_eq!(dirs.len(), 5, "{dirs:?}");
    for dir in &dirs {
        assert!(dir.is_dir(), "{}", dir.display());
    }
    let report = root.probe().to_string();
    for controller in ["memory", "pids", "cpu", "cpuacct", "freezer"] {
        assert!(report.contains(&format!("\n{controller} ")), "{report}");
    }
    // Idempotent, as a restarted daemon.
    let again = CgroupRoot::detect(&_guard.name).expect("detect again");
    assert_eq!(again.dirs(), dirs);
}

#[test]
fn add_pid_places_the_process_in_every_controller() {
    let (_guard, root) = TestRoot::new("place");
    let call = root.create("call", &ROOMY).expect("create");
    let mut script = Script::new("cat /proc/self/cgroup");
    call.add_pid(script.pid()).expect("add_pid");
    assert_eq!(call.pids().expect("pids"), vec![script.pid()]);
    script.go();
    let mut seen = Vec::new();
    loop {
        let line = script.line();
        if line.is_empty() {
            break;
        }
        seen.push(line);
    }
    for controller in ["memory", "pids", "cpu", "cpuacct", "freezer"] {
        let line = seen
            .iter()
            .find(|l| l.split(':').nth(1) == Some(controller))
            .unwrap_or_else(|| panic!("no {controller} line in {seen:?}"));
        let want = format!("/{}/call", _guard.name);
        assert!(
            line.ends_with(&want),
            "{controller}: {line}, want ...{want}"
        );
    }
    assert!(script.wait(Duration::from_secs(10)).success());
}

/// 64 MiB limit, a script that allocates and fills 200 MiB: the kernel kills it with
/// SIGKILL, and stats say so.
#[test]
fn memory_limit_kills_and_is_reported() {
    let (_guard, root) = TestRoot::new("memory");
    let limit: u64 = 64 << 20;
    let limits = CgroupLimits {
        memory_bytes: limit,
        ..ROOMY
    };
    let call = root.create("call", &limits).expect("create");
    let mut script = Script::new(&format!(
        "exec {PYTHON} -c 'b = b\"x\" * (200 << 20); print(\"survived\", len(b))'"
    ));
    call.add_pid(script.pid()).expect("add_pid");
    script.go();
    let status = script.wait(Duration::from_secs(30));
    assert_sigkilled(status);
    assert_eq!(script.line(), "", "the script must not get to print");
    let stats = call.stats().expect("stats");
    eprintln!("memory limit {limit}: {stats:?}");
    assert!(stats.oom_killed, "{stats:?}");
    assert!(!stats.pids_limit_hit, "{stats:?}");
    assert!(
        stats.memory_peak_bytes >= limit * 9 / 10 && stats.memory_peak_bytes <= limit,
        "peak {} for a limit of {limit}",
        stats.memory_peak_bytes
    );
    call.remove().expect("remove");
}

/// Within its limit the same kind of script survives and oom_killed stays false, so
/// the test above proves the limit, not a broken script.
#[test]
fn memory_within_limit_is_not_an_oom() {
    let (_guard, root) = TestRoot::new("memory-ok");
    let limits = CgroupLimits {
        memory_bytes: 64 << 20,
        ..ROOMY
    };
    let call = root.create("call", &limits).expect("create");
    let mut script = Script::new(&format!(
        "exec {PYTHON} -c 'b = b\"x\" * (20 << 20); print(\"survived\", len(b))'"
    ));
    call.add_pid(script.pid()).expect("add_pid");
    script.go();
    assert!(script.wait(Duration::from_secs(30)).success());
    assert_eq!(script.line(), format!("survived {}", 20 << 20));
    let stats = call.stats().expect("stats");
    assert!(!stats.oom_killed, "{stats:?}");
    assert!(stats.memory_peak_bytes >= 20 << 20, "{stats:?}");
}

/// pids limit 16 and a fork loop: the 16th process cannot be created (EAGAIN), after
/// exactly 15 children beside the script itself.
#[test]
fn pids_limit_stops_forks() {
    let (_guard, root) = TestRoot::new("pids");
    let limits = CgroupLimits { pids: 16, ..ROOMY };
    let call = root.create("call", &limits).expect("create");
    let mut script = Script::new(&format!(
        "exec {PYTHON} -c '
import errno, os, signal, sys
n = 0
while n < 100:
    try:
        pid = os.fork()
    except OSError as e:
        print(errno.errorcode[e.errno], n, flush=True)
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    n += 1
else:
    print(\"no limit\", n, flush=True)
sys.stdin.readline()
'"
    ));
    call.add_pid(script.pid()).expect("add_pid");
    script.go();
    assert_eq!(script.line(), "EAGAIN 15");
    assert_eq!(call.pids().expect("pids").len(), 16);
    let stats = call.stats().expect("stats");
    assert!(stats.pids_limit_hit, "{stats:?}");
    assert!(!stats.oom_killed, "{stats:?}");
    call.kill_all().expect("kill_all");
    assert_sigkilled(script.wait(Duration::from_secs(10)));
    assert_eq!(call.pids().expect("pids"), Vec::<i32>::new());
}

/// A 20% quota and one second of busy loop: the group got at most about a fifth of the
/// wall time and was throttled. Unthrottled the ratio is about 1 on an idle core; the
/// bound (0.3) leaves room for a loaded machine, where the ratio only gets smaller.
#[test]
fn cpu_quota_throttles() {
    let (_guard, root) = TestRoot::new("cpu");
    let limits = CgroupLimits {
        cpu_quota_percent: 20,
        ..ROOMY
    };
    let call = root.create("call", &limits).expect("create");
    let mut script = Script::new(&format!(
        "exec {PYTHON} -c '
import time
t = time.monotonic()
while time.monotonic() - t < 1.0:
    pass
'"
    ));
    call.add_pid(script.pid()).expect("add_pid");
    let started = Instant::now();
    script.go();
    assert!(script.wait(Duration::from_secs(30)).success());
    let wall = started.elapsed();
    let stats = call.stats().expect("stats");
    let ratio = stats.cpu_usage_usec as f64 / wall.as_micros() as f64;
    eprintln!("cpu quota 20%: {wall:?} wall, ratio {ratio:.3}, {stats:?}");
    assert!(
        ratio <= 0.3,
        "cpu {} us over {wall:?} wall = {ratio:.2}, quota 20%",
        stats.cpu_usage_usec
    );
    assert!(stats.cpu_throttled_periods > 0, "{stats:?}");
    assert!(stats.cpu_usage_usec >= 20_000, "it ran: {stats:?}");
    assert!(!stats.oom_killed && !stats.pids_limit_hit, "{stats:?}");
}

/// kill_all kills the whole tree: the script, its children and an orphaned grandchild.
#[test]
fn kill_all_kills_a_process_tree() {
    let (_guard, root) = TestRoot::new("kill");
    let call = root.create("call", &ROOMY).expect("create");
    let mut script =
        Script::new("sleep 1000 & sleep 1000 & sh -c 'sleep 1000 & wait' & echo started; wait");
    call.add_pid(script.pid()).expect("add_pid");
    script.go();
    assert_eq!(script.line(), "started");
    // sh, two sleeps, the inner sh and its sleep.
    let started = Instant::now();
    let pids = loop {
        let pids = call.pids().expect("pids");
        if pids.len() == 5 {
            break pids;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    call.kill_all().expect("kill_all");
    assert_eq!(call.pids().expect("pids"), Vec::<i32>::new());
    assert_sigkilled(script.wait(Duration::from_secs(10)));
    // The others were orphaned to us (a subreaper): each died of SIGKILL.
    for pid in pids.into_iter().filter(|&p| p != script.pid()) {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
            other => panic!("pid {pid}: {other:?}"),
        }
    }
}

/// remove() kills what is left and leaves no directory in any controller.
#[test]
fn remove_leaves_nothing() {
    let (_guard, root) = TestRoot::new("remove");
    let call = root.create("call", &ROOMY).expect("create");
    let dirs = group_dirs(&call.procs_files());
    assert_eq!(dirs.len(), 5, "{dirs:?}");
    let mut script = Script::new("exec sleep 1000");
    call.add_pid(script.pid()).expect("add_pid");
    script.go();
    call.remove().expect("remove");
    assert_sigkilled(script.wait(Duration::from_secs(10)));
    for dir in dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// A group that exists is refused, not reused (its counters would be stale).
#[test]
fn create_refuses_an_existing_group() {
    let (_guard, root) = TestRoot::new("exists");
    let call = root.create("call", &ROOMY).expect("create");
    match root.create("call", &ROOMY) {
        Err(CgroupError::Exists { path }) => assert!(path.ends_with("call"), "{path:?}"),
        other => panic!("{other:?}"),
    }
    assert!(group_dirs(&call.procs_files()).iter().all(|d| d.is_dir()));
    call.remove().expect("remove");
}

/// A daemon that crashed left two groups with processes in them; the restarted daemon's
/// sweep kills the processes and removes the groups.
#[test]
fn sweep_removes_leftovers_with_processes() {
    let (guard, root) = TestRoot::new("sweep");
    let mut scripts = Vec::new();
    let mut dirs = Vec::new();
    for name in ["left-2", "left-1"] {
        let call = root.create(name, &ROOMY).expect("create");
        let mut script = Script::new("exec sleep 1000");
        call.add_pid(script.pid()).expect("add_pid");
        script.go();
        dirs.extend(group_dirs(&call.procs_files()));
        scripts.push(script);
        // The crash: the daemon never removes it.
        std::mem::forget(call);
    }
    drop(root);
    let restarted = CgroupRoot::detect(&guard.name).expect("detect after the crash");
    assert_eq!(
        restarted.sweep().expect("sweep"),
        vec!["left-1".to_string(), "left-2".to_string()]
    );
    for script in &mut scripts {
        assert_sigkilled(script.wait(Duration::from_secs(10)));
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    assert_eq!(
        restarted.sweep().expect("sweep again"),
        Vec::<String>::new()
    );
}

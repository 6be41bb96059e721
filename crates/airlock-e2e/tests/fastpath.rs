//! The warm path (issue 7): each Python call's process is cloned from a pre-initialised
//! interpreter and then sandboxed. These cases prove, through SQL against a real cluster
//! and the real daemon, that the calls really are warm, that no process serves two
//! calls or sees another call's state, that the sandbox is complete before the call's
//! first byte is read, and that a broken warm path falls back to cold starts. The escape
//! suite (`e2e.rs`) runs with the warm path on by default.

use std::{
    fs,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use airlock_e2e::{eventually, printed_folder, Cluster, Daemon, DaemonSettings};
use libtest_mimic::{Arguments, Failed, Trial};
use postgres::Client;

const FIRST_UID: u32 = 63000;
const WORKERS: u32 = 4;

struct Env {
    daemon: Daemon,
    cluster: Cluster,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get().expect("set up in main")
}

type TestResult = Result<(), Failed>;

fn ensure(cond: bool, msg: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

fn analyst() -> Client {
    env().cluster.connect("analyst").0
}

/// Runs `script` and returns its one text output column, one string per row.
fn py_text(client: &mut Client, script: &str) -> Result<Vec<String>, Failed> {
    let sql = "SELECT * FROM airlock.execute_external_script('python', $1) AS r(v text)";
    let rows = client
        .query(sql, &[&script])
        .map_err(|e| Failed::from(format!("call failed: {e:?}")))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// A script whose output is one row: `expr` as text.
fn one(expr: &str) -> String {
    format!("OutputDataSet = pd.DataFrame({{'v': [str({expr})]}})")
}

/// True in a warm call: the process's main module is the zygote's, not the shim's.
const IS_WARM: &str = "__import__('sys').modules['__main__'].__file__.endswith('airlock_warm.py')";

/// Waits until the daemon logged that its Python interpreter is ready.
fn wait_until_warm(daemon: &Daemon) -> TestResult {
    ensure(
        eventually(Duration::from_secs(30), || {
            daemon.log().matches("warm starts ready").count()
                > daemon.log().matches("warm starts unavailable").count()
        }),
        format!("the warm path never became ready; log:\n{}", daemon.log()),
    )
}

// ---------------------------------------------------------------------------- cases

/// The default config is warm: the call's process already had the zygote's module
/// and pandas imported before the script ran.
fn calls_are_cloned_from_the_preinitialised_interpreter() -> TestResult {
    let mut c = analyst();
    for _ in 0..3 {
        let out = py_text(&mut c, &one(IS_WARM))?;
        ensure(
            out == ["True"],
            format!("expected a warm call, got {out:?}"),
        )?;
    }
    Ok(())
}

/// A pooled/warm process serves exactly one call: whatever a call leaves in the
/// interpreter (a module attribute, a builtin, a file in /tmp, an environment variable,
/// a thread) is not there in the next call, every call is pid 1 of a pid namespace of
/// its own, and its process is new.
fn no_process_serves_two_calls_or_sees_anothers_state() -> TestResult {
    let mut c = analyst();
    let leave = "
import sys, os, builtins, threading, time
sys.modules['airlock_runtime'].LEFTOVER = 'secret-1'
builtins.LEFTOVER = 'secret-2'
os.environ['LEFTOVER'] = 'secret-3'
open('/tmp/leftover', 'w').write('secret-4')
threading.Thread(target=time.sleep, args=(30,), name='leftover', daemon=True).start()
OutputDataSet = pd.DataFrame({'v': [str(os.getpid()) + ' ' + open('/proc/self/stat').read().split()[21] + ' ' + os.readlink('/proc/self/ns/pid')]})
";
    let look = "
import sys, os, builtins, threading
seen = []
if hasattr(sys.modules['airlock_runtime'], 'LEFTOVER'): seen.append('module')
if hasattr(builtins, 'LEFTOVER'): seen.append('builtin')
if 'LEFTOVER' in os.environ: seen.append('env')
if os.path.exists('/tmp/leftover'): seen.append('tmp')
if any(t.name == 'leftover' for t in threading.enumerate()): seen.append('thread')
seen.append(str(os.getpid()) + ' ' + open('/proc/self/stat').read().split()[21] + ' ' + os.readlink('/proc/self/ns/pid'))
OutputDataSet = pd.DataFrame({'v': seen})
";
    // Each call's process is pid 1 of its own pid namespace, and no two calls report the
    // same process: (start time in clock ticks since boot, pid namespace) differ. Either
    // alone can repeat: sandboxes prepared in parallel start in the same tick, and the
    // kernel reuses a namespace's inode number once it is gone.
    let mut seen = std::collections::HashSet::new();
    for round in 0..3 {
        let first = py_text(&mut c, leave)?;
        let second = py_text(&mut c, look)?;
        ensure(
            second.len() == 1,
            format!("round {round}: the next call saw the previous call's state: {second:?}"),
        )?;
        for out in [&first[0], &second[0]] {
            let (pid, process) = out.split_once(' ').ok_or("format")?;
            ensure(pid == "1", format!("pid 1 of its own namespace: {out}"))?;
            ensure(
                seen.insert(process.to_owned()),
                format!("round {round}: a process served two calls ({process})"),
            )?;
        }
    }
    Ok(())
}

/// The sandbox is complete before the call's data is read: the script's first
/// statement, and the runtime before it, run with seccomp filtering, no_new_privs, no
/// capabilities, the worker uid and Landlock already in force (the zygote clones the
/// process, the Rust steps confine it, and only then does Python read fd 3).
fn the_sandbox_is_complete_before_the_call_runs() -> TestResult {
    let mut c = analyst();
    let script = "
import os
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
out = [k + '=' + status[k].split()[0] for k in ('Seccomp', 'NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd', 'Uid')]
try:
    os.listdir('/')
    out.append('root-listable')
except PermissionError:
    out.append('landlock')
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out.append('unshare-denied' if libc.unshare(0x10000000) == -1 and ctypes.get_errno() == 1 else 'unshare-allowed')
out.append('fds=' + ','.join(sorted(os.listdir('/proc/self/fd'), key=int)))
OutputDataSet = pd.DataFrame({'v': out})
";
    let out = py_text(&mut c, script)?;
    let uid = out.iter().find(|l| l.starts_with("Uid=")).ok_or("uid")?;
    let uid: u32 = uid[4..].parse().map_err(|_| "uid")?;
    ensure(
        (FIRST_UID..FIRST_UID + WORKERS).contains(&uid),
        format!("runs as a worker: {out:?}"),
    )?;
    for want in [
        "Seccomp=2",
        "NoNewPrivs=1",
        "CapEff=0000000000000000",
        "CapPrm=0000000000000000",
        "CapBnd=0000000000000000",
        "landlock",
        "unshare-denied",
    ] {
        ensure(out.iter().any(|l| l == want), format!("{want} in {out:?}"))?;
    }
    // 0-3 as in a cold sandbox, plus what the runtime itself opened by now (the print
    // pipe and the listing's own fd): nothing of the zygote's.
    let fds = out.iter().find(|l| l.starts_with("fds=")).ok_or("fds")?;
    ensure(fds.starts_with("fds=0,1,2,3"), format!("fds: {fds}"))?;
    Ok(())
}

/// Random numbers are not shared between calls cloned from the same interpreter.
fn random_state_is_fresh_in_every_call() -> TestResult {
    let mut c = analyst();
    let script = one("(np.random.rand(), __import__('random').random())");
    let a = py_text(&mut c, &script)?;
    let b = py_text(&mut c, &script)?;
    ensure(a != b, format!("two calls drew the same numbers: {a:?}"))
}

/// The environment is exactly the call's: HOME is this call's session folder, and
/// nothing of the zygote's own environment remains.
fn environment_is_the_calls_own() -> TestResult {
    let mut c = analyst();
    let script = "
import os
OutputDataSet = pd.DataFrame({'v': sorted(k + '=' + v for k, v in os.environ.items())})
";
    let env = py_text(&mut c, script)?;
    let home = env.iter().find(|l| l.starts_with("HOME=")).ok_or("HOME")?;
    let cwd = py_text(&mut c, &one("__import__('os').getcwd()"))?;
    ensure(
        home.starts_with("HOME=/sessions/") && cwd[0].starts_with("/sessions/"),
        format!("HOME {home}, cwd {cwd:?}"),
    )?;
    ensure(
        !env.iter().any(|l| l.starts_with("JE_ARROW_MALLOC_CONF")),
        format!("the zygote's own environment leaked: {env:?}"),
    )
}

/// Concurrent calls each get a sandbox of their own.
fn concurrent_warm_calls_each_get_their_own_sandbox() -> TestResult {
    let handles: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(|| {
                let mut c = analyst();
                py_text(
                    &mut c,
                    // A namespace's inode number is reused once it is gone, so the
                    // start time of its init tells instances apart; the sleep keeps the
                    // calls alive together.
                    &one(&format!(
                        "(__import__('os').readlink('/proc/self/ns/pid'), \
                         open('/proc/1/stat').read().split()[21], {IS_WARM}, \
                         __import__('time').sleep(0.3))"
                    )),
                )
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for h in handles {
        let out = h.join().map_err(|_| "thread panicked")??;
        ensure(out[0].contains("True"), format!("not warm: {out:?}"))?;
        ensure(seen.insert(out[0].clone()), format!("shared: {out:?}"))?;
    }
    Ok(())
}

/// The escape cases that matter most for a cloned process, warm: no secrets in
/// /proc/self/environ of the call and no host paths in its memory map.
fn no_daemon_path_in_the_memory_map() -> TestResult {
    let mut c = analyst();
    let out = py_text(
        &mut c,
        "OutputDataSet = pd.DataFrame({'v': sorted({l.split()[-1] for l in open('/proc/self/maps') if '/' in l.split()[-1]})})",
    )?;
    let exe = airlock_e2e::airlockd_bin();
    let exe_dir = exe
        .parent()
        .ok_or("exe dir")?
        .to_string_lossy()
        .into_owned();
    ensure(
        !out.iter().any(|p| p.starts_with(&exe_dir)),
        format!("a host path of the daemon's is mapped: {out:?}"),
    )
}

/// A wall-clock kill of a warm call is reported as the limit and leaves nothing.
fn timeout_of_a_warm_call_is_reported() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let sql = "SELECT * FROM airlock.execute_external_script('python', $1) AS r(v text)";
    let started = Instant::now();
    let err = c
        .query(
            sql,
            &[&"import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(60)"],
        )
        .err()
        .ok_or("expected the wall-clock limit")?;
    let db = err.as_db_error().ok_or("a server error")?;
    ensure(
        db.code().code() == "54000" && started.elapsed() < Duration::from_secs(20),
        format!("{} {}", db.code().code(), db.message()),
    )?;
    let daemon = &env().daemon;
    let folder = printed_folder(&notices, Duration::ZERO).ok_or("no folder printed")?;
    let host = daemon
        .sessions_dir()
        .join(folder.trim_start_matches("/sessions/"));
    ensure(
        eventually(Duration::from_secs(10), || !host.exists()),
        format!("session folder {} left behind", host.display()),
    )?;
    // And the next call is warm again.
    let out = py_text(&mut c, &one(IS_WARM))?;
    ensure(out == ["True"], format!("after a timeout: {out:?}"))
}

/// Dead zygotes cost no call: the next call starts cold with the same sandbox, and the
/// daemon brings the warm path back.
fn a_killed_interpreter_falls_back_to_cold_then_recovers() -> TestResult {
    let daemon = &env().daemon;
    let zygotes = find_zygotes(daemon.pid());
    ensure(
        zygotes.len() == 2,
        format!("expected the default two zygotes under the daemon, found {zygotes:?}"),
    )?;
    let before = daemon.log().matches("warm starts unavailable").count();
    for zygote in zygotes {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(zygote),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill: {e}"))?;
    }
    // Each zygote's death is logged once the spawner has seen it.
    ensure(
        eventually(Duration::from_secs(10), || {
            daemon.log().matches("warm starts unavailable").count() >= before + 2
        }),
        "the daemon did not notice",
    )?;
    let mut c = analyst();
    let out = py_text(&mut c, &one(IS_WARM))?;
    ensure(
        out == ["False"],
        format!("expected a cold call, got {out:?}"),
    )?;
    // Restarted at a later call (after the backoff) and warm again.
    ensure(
        eventually(
            Duration::from_secs(40),
            || matches!(py_text(&mut c, &one(IS_WARM)).as_deref(), Ok([v]) if v == "True"),
        ),
        format!("never warm again; log:\n{}", daemon.log()),
    )
}

/// A daemon configured with `warm_pool = 0` starts every call cold, and with
/// `prepared = 0` builds each call's sandbox when the call arrives.
fn warm_pool_zero_turns_it_off() -> TestResult {
    let daemon = Daemon::start(settings(FIRST_UID + 100));
    daemon.crash();
    let config = daemon.dir.path().join("airlockd.toml");
    let text = fs::read_to_string(&config).map_err(|e| e.to_string())?;
    let text = text.replacen(
        "[runtimes.r]",
        "warm_pool = 0\nprepared = 0\n[runtimes.r]",
        1,
    );
    fs::write(&config, text).map_err(|e| e.to_string())?;
    daemon.restart();
    let cluster = Cluster::start(&daemon.socket, true);
    setup_roles(&cluster);
    let mut c = cluster.connect("analyst").0;
    thread::sleep(Duration::from_secs(2));
    let out = py_text(&mut c, &one(IS_WARM));
    cluster.stop();
    let log = daemon.log();
    daemon.stop();
    let out = out?;
    ensure(
        out == ["False"],
        format!("expected a cold call, got {out:?}"),
    )?;
    ensure(
        !log.contains("warm starts ready"),
        "a zygote started although warm_pool = 0",
    )?;
    ensure(
        log.contains("prepared=false") && !log.contains("prepared=true"),
        "a call took a prepared sandbox although prepared = 0",
    )
}

/// Seconds since the call's process started, as the script sees it: a prepared
/// sandbox was started before the call arrived.
const AGE: &str = "(lambda s, u: float(u.split()[0]) - int(s.split(')')[-1].split()[19]) / __import__('os').sysconf('SC_CLK_TCK'))(open('/proc/self/stat').read(), open('/proc/uptime').read())";

/// After a pause, a call (of either language) is served by a sandbox prepared ahead: its
/// process is older than the call, the daemon logs it as prepared, and it is confined
/// like any other (the rest of this suite and the escape suite run on prepared
/// sandboxes too).
fn calls_take_sandboxes_prepared_ahead() -> TestResult {
    let daemon = &env().daemon;
    thread::sleep(Duration::from_millis(1500));
    let before = daemon.log().matches("prepared=true").count();
    let mut c = analyst();
    let out = py_text(&mut c, &one(AGE))?;
    let age: f64 = out[0].parse().map_err(|_| format!("age: {out:?}"))?;
    ensure(
        age > 1.0,
        format!("the call's process is {age} s old: built for the call, not ahead of it"),
    )?;
    // R, another caller: its first call prepares sandboxes for it, its second takes one.
    let (mut r, _) = env().cluster.connect("r_analyst");
    let script = "s <- strsplit(readLines('/proc/self/stat'), ') ')[[1]][2]
start <- as.numeric(strsplit(s, ' ')[[1]][20]) / 100
up <- as.numeric(strsplit(readLines('/proc/uptime'), ' ')[[1]][1])
OutputDataSet <- data.frame(v = up - start)";
    let r_age = |r: &mut Client| -> Result<f64, Failed> {
        let rows = r
            .query(
                "SELECT * FROM airlock.execute_external_script('R', $1) AS r(v float8)",
                &[&script],
            )
            .map_err(|e| airlock_e2e::describe(&e))?;
        Ok(rows[0].get(0))
    };
    r_age(&mut r)?;
    thread::sleep(Duration::from_millis(1500));
    let age = r_age(&mut r)?;
    ensure(
        age > 1.0,
        format!("the R call's process is {age} s old: built for the call"),
    )?;
    ensure(
        eventually(Duration::from_secs(2), || {
            daemon.log().matches("prepared=true").count() >= before + 2
        }),
        "the daemon did not log both calls as prepared",
    )
}

/// A sandbox that waited while one caller's scripts ran as its worker uid never serves
/// another caller: when the uid goes to a new caller, those sandboxes are discarded and
/// the new caller's call gets a sandbox built for it.
fn a_sandbox_prepared_under_one_caller_never_serves_another() -> TestResult {
    let daemon = &env().daemon;
    let mut a = analyst();
    py_text(&mut a, &one("1"))?;
    // a's refills finish (bound to a); a holds no uid now.
    thread::sleep(Duration::from_millis(1500));
    let discarded = "a prepared sandbox waited while another caller held its uid; discarded";
    let before = daemon.log().matches(discarded).count();
    let (mut b, _) = env().cluster.connect("analyst_b");
    let out = py_text(&mut b, &one(AGE))?;
    let age: f64 = out[0].parse().map_err(|_| format!("age: {out:?}"))?;
    ensure(
        age < 1.0,
        format!(
            "the new caller got a sandbox {age} s old, prepared while another caller held its uid"
        ),
    )?;
    ensure(daemon.log().matches(discarded).count() > before, {
        let log = daemon.log();
        let calls: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("call started") || l.contains("discarded") || l.contains("prepare")
            })
            .collect();
        format!(
            "the previous caller's prepared sandboxes were not discarded; calls:\n{}",
            calls[calls.len().saturating_sub(14)..].join("\n")
        )
    })
}

/// A prepared sandbox that died while it waited (killed from outside here) is never
/// handed to a call: the call gets another, and succeeds.
fn a_prepared_sandbox_killed_while_waiting_is_never_used() -> TestResult {
    let daemon = &env().daemon;
    // A call binds the uid's waiting sandboxes to this caller and refills them; once the
    // refills are done, every sandbox init waiting (pid 1 of its own pid namespace,
    // running as a worker uid; no call runs now) is killed.
    let mut c = analyst();
    let uid: u32 = py_text(&mut c, &one("__import__('os').getuid()"))?[0]
        .parse()
        .map_err(|_| "uid")?;
    // The two Python sandboxes of the refill (for this caller's uid) are up once two warm
    // inits of that uid stay for a while.
    two_python_sandboxes_wait(uid)?;
    thread::sleep(Duration::from_millis(300));
    let waiting = python_inits(uid);
    ensure(!waiting.is_empty(), "no prepared sandbox to kill")?;
    for pid in &waiting {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    ensure(
        eventually(Duration::from_secs(5), || {
            waiting
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        }),
        "the killed sandboxes were not reaped",
    )?;
    // The exit notices travel zygote -> spawner -> daemon.
    thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let out = py_text(&mut c, &one("1 + 1"))?;
        ensure(out == ["2"], format!("after the kill: {out:?}"))?;
    }
    ensure(
        daemon
            .log()
            .contains("a prepared sandbox died before its call; discarded"),
        {
            let log = daemon.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("call started") || l.contains("discarded"))
                .collect();
            format!(
                "the dead sandboxes were not discarded; calls:\n{}",
                lines[lines.len().saturating_sub(8)..].join("\n")
            )
        },
    )
}

/// A call that takes a prepared sandbox while another waits for its uid prepares the
/// next one once it has ended, not while it runs: the build would take a core from it.
/// Watched here as processes: during a call of two seconds the uid has its call's
/// sandbox and the one still waiting, no third; after the call, two wait again.
fn a_call_prepares_the_next_sandbox_once_it_has_ended() -> TestResult {
    let mut c = analyst();
    let uid: u32 = py_text(&mut c, &one("__import__('os').getuid()"))?[0]
        .parse()
        .map_err(|_| "uid")?;
    two_python_sandboxes_wait(uid)?;
    let call = thread::spawn(move || {
        let mut c = analyst();
        py_text(
            &mut c,
            &one("(__import__('time').sleep(2), __import__('os').getuid())[1]"),
        )
    });
    // Watched from well after the hand-over (a build takes tens of ms) to before the end.
    thread::sleep(Duration::from_millis(500));
    let mut most = 0;
    for _ in 0..10 {
        most = most.max(python_inits(uid).len());
        thread::sleep(Duration::from_millis(100));
    }
    let out = call.join().map_err(|_| "the call's thread panicked")??;
    ensure(
        out == [uid.to_string()],
        format!("the call ran as uid {out:?}, the caller's sandboxes wait for {uid}"),
    )?;
    ensure(
        most == 2,
        format!(
            "during the call uid {uid} had {most} Python sandboxes: 2 expected (the call's \
             and one waiting); 3 means the next was prepared while the call ran"
        ),
    )?;
    two_python_sandboxes_wait(uid)
}

/// Waits (up to 20 s) until two Python sandboxes wait for `uid` and stay.
fn two_python_sandboxes_wait(uid: u32) -> TestResult {
    let mut stable = 0;
    ensure(
        eventually(Duration::from_secs(20), || {
            stable = if python_inits(uid).len() == 2 {
                stable + 1
            } else {
                0
            };
            stable >= 5
        }),
        format!(
            "uid {uid} never had two Python sandboxes waiting (it has {})",
            python_inits(uid).len()
        ),
    )
}

/// Host pids of Python sandbox inits (cloned from the warm interpreter) running as `uid`.
fn python_inits(uid: u32) -> Vec<i32> {
    sandbox_inits()
        .into_iter()
        .filter(|p| {
            let warm = fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("airlock_warm.py"));
            let ours = fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                    == Some(uid)
            });
            warm && ours
        })
        .collect()
}

/// Host pids of sandbox inits running as a worker uid of this suite's daemon.
fn sandbox_inits() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().collect::<Vec<_>>())
            };
            let uid_ok = field("Uid:")
                .and_then(|v| v.first()?.parse::<u32>().ok())
                .is_some_and(|u| (FIRST_UID..FIRST_UID + WORKERS).contains(&u));
            // NSpid: the host pid, then 1 in the sandbox's own namespace.
            let init = field("NSpid:").is_some_and(|v| v.len() == 2 && v[1] == "1");
            uid_ok && init
        })
        .collect()
}

/// Stopping the daemon (SIGTERM) kills its prepared sandboxes and removes their session
/// folders (tmpfs mounts) and cgroups: nothing of them outlives it.
fn stopping_the_daemon_removes_its_prepared_sandboxes() -> TestResult {
    let daemon = Daemon::start(settings(FIRST_UID + 200));
    let sessions = daemon.sessions_dir();
    let mounted = || {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(sessions.to_string_lossy().as_ref()))
            .count()
    };
    let first = FIRST_UID + 200;
    let workers_running = || {
        fs::read_dir("/proc").map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    fs::read_to_string(e.path().join("status")).is_ok_and(|st| {
                        st.lines()
                            .find_map(|l| l.strip_prefix("Uid:"))
                            .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                            .is_some_and(|u| (first..first + WORKERS).contains(&u))
                    })
                })
                .count()
        })
    };
    // Two Python and one R sandbox are prepared for the first worker uid.
    let prepared = eventually(Duration::from_secs(60), || {
        workers_running() >= 3 && mounted() >= 3
    });
    let before = (workers_running(), mounted());
    daemon.stop();
    ensure(
        prepared,
        format!("the daemon never prepared its sandboxes (processes, mounts): {before:?}"),
    )?;
    ensure(
        mounted() == 0,
        format!("{} session mounts outlived the daemon", mounted()),
    )?;
    ensure(
        eventually(Duration::from_secs(5), || workers_running() == 0),
        format!(
            "{} processes of the worker uids outlived the daemon",
            workers_running()
        ),
    )
}

/// The zygotes under the daemon (children of its spawner).
fn find_zygotes(daemon_pid: u32) -> Vec<i32> {
    let ppid = |pid: i32| -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let is_zygote = String::from_utf8_lossy(&cmd).contains("airlock_warm.py");
            let spawner = ppid(pid)?;
            (is_zygote && ppid(spawner)? == daemon_pid as i32).then_some(pid)
        })
        .collect()
}

fn settings(first_uid: u32) -> DaemonSettings {
    DaemonSettings {
        first_uid,
        count: WORKERS,
        wall_clock_seconds: 4.0,
        cpu_seconds: 10,
        memory_mib: 512,
        pids: 64,
        queue_timeout_seconds: 30.0,
    }
}

fn setup_roles(cluster: &Cluster) {
    let (mut c, _) = cluster.connect("postgres");
    c.batch_execute(
        "CREATE ROLE analyst LOGIN;
         GRANT airlock_script_executor TO analyst;
         CREATE ROLE r_analyst LOGIN;
         GRANT airlock_r_executor TO r_analyst;
         CREATE ROLE analyst_b LOGIN;
         GRANT airlock_script_executor TO analyst_b;",
    )
    .expect("setting up roles");
}

fn main() {
    let args = Arguments::from_args();
    let daemon = Daemon::start(settings(FIRST_UID));
    let cluster = Cluster::start(&daemon.socket, true);
    setup_roles(&cluster);
    if let Err(e) = wait_until_warm(&daemon) {
        // Nothing outlives the run, not even a failed start.
        cluster.stop();
        daemon.stop();
        panic!("{e:?}");
    }
    if ENV.set(Env { daemon, cluster }).is_err() {
        unreachable!("main runs once");
    }
    macro_rules! trials {
        ($($f:ident),* $(,)?) => {
            vec![$(Trial::test(stringify!($f), $f)),*]
        };
    }
    // The interpreter-killing case runs last: the others check warm calls.
    let mut trials = trials![
        calls_are_cloned_from_the_preinitialised_interpreter,
        no_process_serves_two_calls_or_sees_anothers_state,
        the_sandbox_is_complete_before_the_call_runs,
        random_state_is_fresh_in_every_call,
        environment_is_the_calls_own,
        concurrent_warm_calls_each_get_their_own_sandbox,
        no_daemon_path_in_the_memory_map,
        timeout_of_a_warm_call_is_reported,
        warm_pool_zero_turns_it_off,
        calls_take_sandboxes_prepared_ahead,
        a_sandbox_prepared_under_one_caller_never_serves_another,
        a_prepared_sandbox_killed_while_waiting_is_never_used,
        a_call_prepares_the_next_sandbox_once_it_has_ended,
        stopping_the_daemon_removes_its_prepared_sandboxes,
    ];
    let mut args = args;
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, std::mem::take(&mut trials));
    let last = libtest_mimic::run(
        &args,
        trials![a_killed_interpreter_falls_back_to_cold_then_recovers],
    );
    let env = env();
    let failed = conclusion.has_failed() || last.has_failed();
    airlock_e2e::stop_suite(&env.cluster, &env.daemon, failed);
    conclusion.exit_if_failed();
    last.exit_if_failed();
}

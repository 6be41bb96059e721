//! Real sandboxes, started as root: each test runs a shell or Python inside one and
//! asserts what it observed, written to the data socket (fd 3) or the session folder.
//!
//! Every sandbox is waited for (or killed and reaped when its handle drops) and its
//! mounts live only in its own mount namespace, so nothing is left behind on the host
//! beyond the temporary directories, which each fixture removes.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use airlock_protocol::spawner::{
    CgroupJoin, ExitStatus, FromSpawner, RoMount, SpawnRequest, ToSpawner, WarmSpec,
};
use airlock_sandbox::cgroup::{CgroupLimits, CgroupRoot, CgroupVersion};
use airlock_sandbox::{
    recv_message, run_spawner, send_message, spawn, SandboxError, MAX_MESSAGE_LEN,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{chown, setgroups, Gid, Uid};

/// The worker identity of these tests: neither root nor Postgres (101 on Debian).
const WORKER: u32 = 61000;

/// Root, with no supplementary groups (a sandbox would inherit them; `spawn` refuses).
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        assert!(
            Uid::effective().is_root(),
            "the sandbox tests need root (user namespaces with a mapped worker uid)"
        );
        setgroups(&[]).expect("drop supplementary groups");
    });
}

/// A private temp directory holding the (empty) root mountpoint and a session folder
/// owned by the worker.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        init();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "airlock-sandbox-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(dir.join("root")).unwrap();
        let session = dir.join("session");
        fs::create_dir(&session).unwrap();
        fs::set_permissions(&session, fs::Permissions::from_mode(0o700)).unwrap();
        chown(
            &session,
            Some(Uid::from_raw(WORKER)),
            Some(Gid::from_raw(WORKER)),
        )
        .unwrap();
        Fixture { dir }
    }

    fn session(&self) -> PathBuf {
        self.dir.join("session")
    }

    fn request(&self, argv: &[&str]) -> SpawnRequest {
        SpawnRequest {
            call_id: 1,
            uid: WORKER,
            gid: WORKER,
            root_mountpoint: self.dir.join("root"),
            session_dir: self.session(),
            session_target: "/session".into(),
            ro_mounts: vec![
                RoMount {
                    host: "/usr".into(),
                    target: "/usr".into(),
                },
                RoMount {
                    host: "/etc/ld.so.cache".into(),
                    target: "/etc/ld.so.cache".into(),
                },
            ],
            symlinks: [
                ("/bin", "usr/bin"),
                ("/lib", "usr/lib"),
                ("/lib64", "usr/lib64"),
                ("/sbin", "usr/sbin"),
            ]
            .iter()
            .map(|(l, t)| (l.into(), t.into()))
            .collect(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/usr/bin".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            hostname: "airlock-test".into(),
            tmp_size_bytes: 8 << 20,
            cgroup: None,
            cpu_rlimit_seconds: 0,
            warm: None,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> Vec<&str> {
    vec!["/usr/bin/sh", "-c", script]
}

/// Python with stdout redirected to the data socket.
fn py(script: &str) -> String {
    format!("import os, sys, errno\nsys.stdout = os.fdopen(3, 'w')\n{script}")
}

fn data_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// Runs `req` to completion: what it wrote to fd 3, and how it exited.
fn run(req: &SpawnRequest) -> (String, ExitStatus) {
    let (ours, theirs) = data_pair();
    let mut sandbox = spawn(req, theirs).expect("spawn");
    let mut out = String::new();
    fs::File::from(ours).read_to_string(&mut out).unwrap();
    let status = sandbox.wait().expect("wait");
    (out, status)
}

fn run_ok(req: &SpawnRequest) -> String {
    let (out, status) = run(req);
    assert_eq!(status, ExitStatus::Code { code: 0 }, "output: {out}");
    out
}

/// The pid namespace of a host pid, e.g. `pid:[4026532301]`.
fn pid_ns(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Host pids whose pid namespace is `ns`.
fn processes_in(ns: &Path) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| pid_ns(*pid).as_deref() == Some(ns))
        .collect()
}

/// Reads from `fd` until `want` has been seen.
fn read_until(fd: &OwnedFd, want: &str) -> String {
    let mut file = fs::File::from(fd.try_clone().unwrap());
    let mut got = String::new();
    let mut buf = [0u8; 256];
    while !got.contains(want) {
        let n = file.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before {want:?}; got {got:?}");
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    got
}

#[test]
fn runs_as_the_worker_never_root() {
    let fx = Fixture::new();
    let out = run_ok(&fx.request(&sh(
        "{ id -u; id -g; id -G; id -un; cat /proc/self/uid_map /proc/self/gid_map; } >&3",
    )));
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["61000"],
            vec!["61000"],
            vec!["61000"],
            vec!["airlock"],
            vec!["61000", "61000", "1"],
            vec!["61000", "61000", "1"],
        ],
        "uid, gid, groups (no supplementary ones), name, and only the worker mapped"
    );
}

#[test]
fn has_no_capabilities_and_no_new_privs() {
    let fx = Fixture::new();
    let out = run_ok(&fx.request(&sh("grep -E '^(Cap|NoNewPrivs)' /proc/self/status >&3")));
    assert_eq!(
        out,
        "CapInh:\t0000000000000000\n\
         CapPrm:\t0000000000000000\n\
         CapEff:\t0000000000000000\n\
         CapBnd:\t0000000000000000\n\
         CapAmb:\t0000000000000000\n\
         NoNewPrivs:\t1\n"
    );
}

#[test]
fn is_pid_1_and_sees_only_its_own_processes() {
    let fx = Fixture::new();
    let script =
        py("print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))");
    let out = run_ok(&fx.request(&["/usr/bin/python3", "-c", &script]));
    assert_eq!(out, "1 [1]\n");
}

#[test]
fn host_directories_do_not_exist() {
    let fx = Fixture::new();
    let out = run_ok(&fx.request(&sh(
        "for p in /root /var/lib/postgresql /home /etc/shadow /run /var; do \
           if [ -e $p ]; then echo \"$p exists\"; else echo \"$p absent\"; fi; \
         done >&3",
    )));
    assert_eq!(
        out,
        "/root absent\n/var/lib/postgresql absent\n/home absent\n/etc/shadow absent\n\
         /run absent\n/var absent\n"
    );
}

#[test]
fn root_usr_dev_and_etc_are_read_only() {
    let fx = Fixture::new();
    let script = py(
        "for p in ['/usr/airlock-x', '/airlock-x', '/etc/passwd', '/etc/airlock-x', '/dev/airlock-x']:\n\
         \x20   try:\n\
         \x20       open(p, 'w')\n\
         \x20       print(p, 'written')\n\
         \x20   except OSError as e:\n\
         \x20       print(p, errno.errorcode[e.errno])\n",
    );
    let out = run_ok(&fx.request(&["/usr/bin/python3", "-c", &script]));
    assert_eq!(
        out,
        "/usr/airlock-x EROFS\n/airlock-x EROFS\n/etc/passwd EROFS\n/etc/airlock-x EROFS\n\
         /dev/airlock-x EROFS\n"
    );
}

#[test]
fn every_mount_is_nosuid_and_only_scratch_mounts_are_writable() {
    let fx = Fixture::new();
    let mut req = fx.request(&sh("cat /proc/self/mountinfo >&3"));
    // Host /dev has mounts below it (/dev/shm, /dev/pts, writable on the host): the
    // read-only flag must reach them too.
    req.ro_mounts.push(RoMount {
        host: "/dev".into(),
        target: "/mnt/hostdev".into(),
    });
    let out = run_ok(&req);
    let mounts: Vec<(String, Vec<String>)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let opts = f[5]
                .split(',')
                .filter(|o| ["ro", "rw", "nosuid", "nodev", "noexec"].contains(o))
                .map(String::from)
                .collect();
            (f[4].to_string(), opts)
        })
        .collect();
    let opts_of = |mp: &str| {
        mounts
            .iter()
            .find(|(m, _)| m == mp)
            .map(|(_, o)| o.join(","))
            .unwrap_or_else(|| panic!("no mount at {mp}: {out}"))
    };
    assert_eq!(opts_of("/"), "ro,nosuid,nodev");
    assert_eq!(opts_of("/usr"), "ro,nosuid,nodev");
    assert_eq!(opts_of("/etc/ld.so.cache"), "ro,nosuid,nodev");
    assert_eq!(opts_of("/dev"), "ro,nosuid,noexec");
    assert_eq!(opts_of("/dev/null"), "rw,nosuid,noexec");
    assert_eq!(opts_of("/dev/urandom"), "rw,nosuid,noexec");
    assert_eq!(opts_of("/proc"), "rw,nosuid,nodev,noexec");
    assert_eq!(opts_of("/tmp"), "rw,nosuid,nodev");
    assert_eq!(opts_of("/session"), "rw,nosuid,nodev");
    assert_eq!(opts_of("/mnt/hostdev/shm"), "ro,nosuid,nodev");
    for (mp, opts) in &mounts {
        assert!(opts.contains(&"nosuid".to_string()), "{mp}: {opts:?}");
        if mp.starts_with("/mnt/hostdev") {
            assert_eq!(opts[..3], ["ro", "nosuid", "nodev"], "{mp}");
        }
    }
    assert_eq!(
        mounts.len(),
        13 + mounts
            .iter()
            .filter(|(m, _)| m.starts_with("/mnt/hostdev/"))
            .count(),
        "/, /usr, /etc/ld.so.cache, /mnt/hostdev, /dev, 5 nodes, /proc, /tmp, /session: {out}"
    );
}

#[test]
fn passwd_and_group_hold_only_the_worker() {
    let fx = Fixture::new();
    let out = run_ok(&fx.request(&sh("cat /etc/passwd /etc/group >&3")));
    assert_eq!(
        out,
        "airlock:x:61000:61000:airlock:/session:/usr/sbin/nologin\nairlock:x:61000:\n"
    );
}

#[test]
fn session_is_the_writable_cwd_and_tmp_is_private_and_writable() {
    let fx = Fixture::new();
    fs::write(fx.dir.join("outside"), "secret").unwrap();
    let out = run_ok(&fx.request(&sh(
        "{ pwd; echo hi > note.txt && echo wrote; echo t > /tmp/t && cat /tmp/t; \
           stat -c '%a %U' /tmp /session; ls -A /tmp; } >&3",
    )));
    assert_eq!(out, "/session\nwrote\nt\n1777 airlock\n700 airlock\nt\n");
    let note = fx.session().join("note.txt");
    assert_eq!(fs::read_to_string(&note).unwrap(), "hi\n");
    assert_eq!(fs::metadata(&note).unwrap().uid(), WORKER);
}

/// The network namespace holds only a loopback that is down; inet sockets are refused
/// before that matters, by the seccomp filter (EPERM, not ENETUNREACH).
#[test]
fn only_loopback_exists_and_it_is_down() {
    let fx = Fixture::new();
    let script = py("import socket\n\
         print([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])\n\
         try:\n\
         \x20   socket.create_connection(('127.0.0.1', 5432), timeout=5)\n\
         \x20   print('connected')\n\
         except OSError as e:\n\
         \x20   print(errno.errorcode[e.errno])\n");
    let out = run_ok(&fx.request(&["/usr/bin/python3", "-c", &script]));
    assert_eq!(out, "['lo']\nEPERM\n");
}

#[test]
fn environment_is_exactly_the_requested_one_with_home_the_session() {
    let fx = Fixture::new();
    let mut req = fx.request(&sh("cat /proc/$$/environ >&3"));
    req.env = vec![
        ("LANG".into(), "C.UTF-8".into()),
        ("TZ".into(), "Europe/Paris".into()),
        ("LC_TIME".into(), "two words".into()),
    ];
    assert_eq!(
        run_ok(&req),
        "LANG=C.UTF-8\0TZ=Europe/Paris\0LC_TIME=two words\0HOME=/session\0"
    );
}

#[test]
fn environment_outside_the_allowlist_is_refused_before_cloning() {
    let fx = Fixture::new();
    let mut req = fx.request(&["/usr/bin/true"]);
    req.env
        .push(("PGPASSFILE".into(), "/var/lib/postgresql/.pgpass".into()));
    let (_ours, theirs) = data_pair();
    let err = spawn(&req, theirs).unwrap_err();
    assert!(matches!(err, SandboxError::EnvNotAllowed { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid spawn request: environment variable \"PGPASSFILE\" is not on the sandbox's allowlist"
    );
}

#[test]
fn only_fds_0_to_3_are_open_with_dev_null_and_the_socket() {
    let fx = Fixture::new();
    // An fd this process holds without CLOEXEC must not reach the sandbox.
    let leak = fs::File::open("/etc/hostname").unwrap();
    let leak_fd: OwnedFd = leak.into();
    nix::fcntl::fcntl(
        &leak_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    // Python as the runtime itself (a shell would park fds of its own while
    // redirecting); it scans before opening anything.
    let script = "import os\n\
        fds = []\n\
        for fd in range(4096):\n\
        \x20   try:\n\
        \x20       os.fstat(fd)\n\
        \x20       fds.append(fd)\n\
        \x20   except OSError:\n\
        \x20       pass\n\
        links = [os.readlink('/proc/self/fd/%d' % fd) for fd in fds]\n\
        os.write(3, ('%s\\n%s\\n' % (fds, links[:3])).encode())\n\
        os.write(3, links[3].split('[')[0].encode())\n";
    let out = run_ok(&fx.request(&["/usr/bin/python3", "-c", script]));
    drop(leak_fd);
    assert_eq!(
        out,
        "[0, 1, 2, 3]\n['/dev/null', '/dev/null', '/dev/null']\nsocket:"
    );
}

#[test]
fn hostname_is_the_requested_one() {
    let fx = Fixture::new();
    let out = run_ok(&fx.request(&sh("cat /proc/sys/kernel/hostname >&3")));
    assert_eq!(out, "airlock-test\n");
}

#[test]
fn nonexistent_program_fails_at_the_exec_step() {
    let fx = Fixture::new();
    let (_ours, theirs) = data_pair();
    let err = spawn(&fx.request(&["/nonexistent/runtime"]), theirs).unwrap_err();
    assert!(matches!(err, SandboxError::Exec { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "execve /nonexistent/runtime: ENOENT: No such file or directory"
    );
}

#[test]
fn missing_mount_source_fails_before_cloning() {
    let fx = Fixture::new();
    let mut req = fx.request(&["/usr/bin/true"]);
    req.ro_mounts.push(RoMount {
        host: "/nonexistent/runtime".into(),
        target: "/opt/runtime".into(),
    });
    let (_ours, theirs) = data_pair();
    let err = spawn(&req, theirs).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("stat ro mount source /nonexistent/runtime: "),
        "{err}"
    );
}

/// The init enters the call's cgroup as its first step, on the layout the daemon uses
/// on this host (v1: it writes `0` to each controller's `tasks` file; v2: it is cloned
/// into the group): the runtime's first line already sees the call's group.
#[test]
fn the_runtime_starts_inside_the_calls_cgroup() {
    let fx = Fixture::new();
    let name = format!("airlock-sandbox-test-{}", std::process::id());
    let root = CgroupRoot::detect(&name).expect("detect");
    let limits = CgroupLimits {
        memory_bytes: 256 << 20,
        pids: 64,
        cpu_quota_percent: 100,
    };
    let root_version = root.version();
    let call = root.create("call", &limits).expect("create");
    let mut req = fx.request(&sh("cat /proc/self/cgroup >&3"));
    req.cgroup = Some(call.join());
    let (out, status) = run(&req);
    call.remove().expect("remove the call group");
    root.remove().expect("remove the test root");
    assert_eq!(status, ExitStatus::Code { code: 0 }, "output: {out}");
    let controllers: &[&str] = match root_version {
        CgroupVersion::V1 => &["memory", "pids", "cpu"],
        // v2: the one unified line, "0::/path".
        CgroupVersion::V2 => &[""],
    };
    for controller in controllers {
        let line = out
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == *controller))
            })
            .unwrap_or_else(|| panic!("no {controller:?} line in {out:?}"));
        assert!(
            line.ends_with(&format!("/{name}/call")),
            "{controller}: {line}"
        );
    }
}

/// v2: the init is cloned straight into the group (`CLONE_INTO_CGROUP`). This machine
/// mounts a v2 hierarchy beside the v1 controllers; the test uses it directly.
#[test]
fn v2_the_runtime_is_cloned_into_the_calls_cgroup() {
    let fx = Fixture::new();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let v2 = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split(' ').nth(4))
        .expect("no cgroup2 mount on this machine");
    let own = fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no v2 line in /proc/self/cgroup");
    let rel = format!(
        "{}/airlock-sandbox-test-v2-{}",
        own.trim_end_matches('/'),
        std::process::id()
    );
    let dir = Path::new(v2).join(rel.trim_start_matches('/'));
    fs::create_dir(&dir).expect("create a v2 group");
    let mut req = fx.request(&sh("cat /proc/self/cgroup >&3"));
    req.cgroup = Some(CgroupJoin::V2 { dir: dir.clone() });
    let out = run(&req);
    fs::remove_dir(&dir).expect("remove the v2 group");
    assert_eq!(out.1, ExitStatus::Code { code: 0 }, "output: {}", out.0);
    assert!(
        out.0.lines().any(|l| l == format!("0::{rel}")),
        "want 0::{rel} in {:?}",
        out.0
    );
}

/// The init's own step fails when its write is refused (here a `tasks` "file" that
/// opens but refuses every write): the setup's error names the file and the errno, and
/// nothing runs.
#[test]
fn a_refused_cgroup_join_fails_the_spawn_naming_it() {
    let fx = Fixture::new();
    let mut req = fx.request(&["/usr/bin/true"]);
    req.cgroup = Some(CgroupJoin::V1 {
        tasks: vec!["/dev/full".into()],
    });
    let (_ours, theirs) = data_pair();
    let err = spawn(&req, theirs).unwrap_err();
    assert_eq!(
        err.to_string(),
        "move the sandbox init into its cgroup via /dev/full: No space left on device (os error 28)"
    );
}

/// A group that cannot be joined is the setup's error, naming the file; nothing runs.
#[test]
fn an_unjoinable_cgroup_fails_the_spawn_naming_it() {
    let fx = Fixture::new();
    let mut req = fx.request(&["/usr/bin/true"]);
    req.cgroup = Some(CgroupJoin::V1 {
        tasks: vec!["/nonexistent/cgroup/tasks".into()],
    });
    let (_ours, theirs) = data_pair();
    let err = spawn(&req, theirs).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("move the sandbox init into its cgroup via /nonexistent/cgroup/tasks: "),
        "{err}"
    );
}

#[test]
fn exit_code_is_reported() {
    let fx = Fixture::new();
    let (_, status) = run(&fx.request(&sh("exit 7")));
    assert_eq!(status, ExitStatus::Code { code: 7 });
}

#[test]
fn kill_takes_down_the_whole_sandbox_promptly() {
    let fx = Fixture::new();
    let (ours, theirs) = data_pair();
    let mut sandbox = spawn(
        &fx.request(&sh("sleep 1000 & sleep 1000 & echo started >&3; wait")),
        theirs,
    )
    .unwrap();
    read_until(&ours, "started\n");
    let ns = pid_ns(sandbox.pid).expect("sandbox pid namespace");
    assert_eq!(processes_in(&ns).len(), 3, "sh and two sleeps");

    let start = Instant::now();
    sandbox.kill().unwrap();
    assert_eq!(sandbox.wait().unwrap(), ExitStatus::Signal { signal: 9 });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(processes_in(&ns), Vec::<i32>::new());
    // Every holder of the data socket is gone.
    let mut rest = String::new();
    fs::File::from(ours).read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
}

/// The daemon's side of a spawner running on a thread of this process.
struct Daemon {
    sock: OwnedFd,
    buf: Vec<u8>,
}

impl Daemon {
    fn start() -> (Self, std::thread::JoinHandle<Result<(), SandboxError>>) {
        init();
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let thread = std::thread::spawn(move || run_spawner(theirs));
        (
            Daemon {
                sock: ours,
                buf: vec![0; MAX_MESSAGE_LEN],
            },
            thread,
        )
    }

    /// Sends a spawn request; returns our end of its data socket.
    fn spawn(&self, req: SpawnRequest) -> OwnedFd {
        let (ours, theirs) = data_pair();
        send_message(
            self.sock.as_fd(),
            &ToSpawner::Spawn(Box::new(req)),
            Some(theirs.as_fd()),
        )
        .unwrap();
        ours
    }

    fn recv(&mut self) -> FromSpawner {
        let (msg, fds) = recv_message::<FromSpawner>(self.sock.as_fd(), &mut self.buf)
            .unwrap()
            .expect("spawner closed its socket");
        assert!(fds.is_empty());
        msg
    }
}

#[test]
fn spawner_spawns_reports_exit_kills_and_refuses() {
    let fx = Fixture::new();
    let (mut daemon, thread) = Daemon::start();

    // Spawn, output, exit.
    let mut req = fx.request(&sh("echo hello >&3; exit 3"));
    req.call_id = 10;
    let data = daemon.spawn(req);
    let FromSpawner::Spawned {
        call_id: 10, pid, ..
    } = daemon.recv()
    else {
        panic!("expected Spawned for call 10");
    };
    assert!(pid > 1);
    let mut out = String::new();
    fs::File::from(data).read_to_string(&mut out).unwrap();
    assert_eq!(out, "hello\n");
    assert_eq!(
        daemon.recv(),
        FromSpawner::Exited {
            call_id: 10,
            status: ExitStatus::Code { code: 3 }
        }
    );

    // Kill.
    let mut req = fx.request(&sh("sleep 1000 & echo started >&3; wait"));
    req.call_id = 11;
    let data = daemon.spawn(req);
    assert!(matches!(
        daemon.recv(),
        FromSpawner::Spawned { call_id: 11, .. }
    ));
    read_until(&data, "started\n");
    let start = Instant::now();
    send_message(daemon.sock.as_fd(), &ToSpawner::Kill { call_id: 11 }, None).unwrap();
    assert_eq!(
        daemon.recv(),
        FromSpawner::Exited {
            call_id: 11,
            status: ExitStatus::Signal { signal: 9 }
        }
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // Killing a call that is gone is not an error.
    send_message(daemon.sock.as_fd(), &ToSpawner::Kill { call_id: 11 }, None).unwrap();

    // Failures are answered, not fatal.
    let mut req = fx.request(&["/nonexistent/runtime"]);
    req.call_id = 12;
    let _data = daemon.spawn(req);
    let FromSpawner::SpawnFailed { call_id: 12, error } = daemon.recv() else {
        panic!("expected SpawnFailed for call 12");
    };
    assert_eq!(
        error,
        "execve /nonexistent/runtime: ENOENT: No such file or directory"
    );
    let mut req = fx.request(&["/usr/bin/true"]);
    req.call_id = 13;
    send_message(daemon.sock.as_fd(), &ToSpawner::Spawn(Box::new(req)), None).unwrap();
    let FromSpawner::SpawnFailed { call_id: 13, error } = daemon.recv() else {
        panic!("expected SpawnFailed for call 13");
    };
    assert_eq!(
        error,
        "a spawn request carries exactly one fd (the data socket), this one carried 0"
    );

    drop(daemon);
    thread.join().unwrap().unwrap();
}

/// A zygote that takes a call and never answers: after the answer deadline the spawner
/// stops it and fails that call (its data socket went with the zygote), and a call
/// queued behind it (each zygote holds one call at a time) starts cold instead. Every
/// call gets exactly one answer. The zygote here is a stand-in speaking the protocol:
/// it reports ready, then ignores what it is sent.
#[test]
fn a_silent_zygote_fails_its_call_and_the_queued_one_starts_cold() {
    let fx = Fixture::new();
    let (mut daemon, thread) = Daemon::start();
    let silent = "import json, os, socket, time\n\
                  s = socket.socket(fileno=3)\n\
                  p = json.dumps({'type': 'ready', 'pid': os.getpid()}).encode()\n\
                  s.send((len(p) + 1).to_bytes(4, 'little') + b'\\x01' + p)\n\
                  time.sleep(3600)\n";
    let spec = WarmSpec {
        argv: vec!["/usr/bin/python3".into(), "-c".into(), silent.into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        count: 1,
    };
    send_message(daemon.sock.as_fd(), &ToSpawner::Prepare(spec.clone()), None).unwrap();
    match daemon.recv() {
        FromSpawner::Warm { ready: true, .. } => {}
        other => panic!("expected the stand-in zygote to be ready, got {other:?}"),
    }
    let warm = |call_id: u64| {
        let mut req = fx.request(&sh("echo cold >&3"));
        req.call_id = call_id;
        req.warm = Some(spec.clone());
        req
    };
    let started = Instant::now();
    let _handed = daemon.spawn(warm(20));
    let queued = daemon.spawn(warm(21));
    let mut answers = Vec::new();
    while answers.len() < 3 {
        match daemon.recv() {
            FromSpawner::Warm { ready: false, .. } => answers.push("stopped".to_string()),
            FromSpawner::SpawnFailed { call_id: 20, error } => {
                assert!(error.contains("stopped while starting"), "{error}");
                answers.push("20 failed".into());
            }
            FromSpawner::Spawned {
                call_id: 21,
                warm: false,
                ..
            } => answers.push("21 cold".into()),
            FromSpawner::Exited { call_id: 21, .. } => {}
            other => panic!("unexpected {other:?} (so far {answers:?})"),
        }
    }
    answers.sort();
    assert_eq!(answers, ["20 failed", "21 cold", "stopped"]);
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "the call failed before its answer deadline: {:?}",
        started.elapsed()
    );
    read_until(&queued, "cold\n");
    drop(daemon);
    thread.join().unwrap().unwrap();
}

#[test]
fn spawner_kills_everything_when_the_daemon_goes_away() {
    let fx = Fixture::new();
    let (mut daemon, thread) = Daemon::start();
    let mut req = fx.request(&sh("sleep 1000 & echo started >&3; wait"));
    req.call_id = 20;
    let data = daemon.spawn(req);
    let FromSpawner::Spawned { pid, .. } = daemon.recv() else {
        panic!("expected Spawned");
    };
    read_until(&data, "started\n");
    let ns = pid_ns(pid).expect("sandbox pid namespace");
    assert_eq!(processes_in(&ns).len(), 2);

    drop(daemon);
    thread.join().unwrap().unwrap();
    assert_eq!(processes_in(&ns), Vec::<i32>::new());
    let mut rest = String::new();
    fs::File::from(data).read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
}

/// Runs a Python script as the runtime and returns what it printed (to fd 3).
fn run_py(fx: &Fixture, script: &str) -> String {
    run_ok(&fx.request(&["/usr/bin/python3", "-c", &py(script)]))
}

/// Python helpers for the escape tests: `report(label, f)` prints `label ok` or `label
/// ERRNO`; `sysc(label, nr, *args)` makes a raw syscall through libc and reports it.
const ESCAPE_HELPERS: &str = "import ctypes, socket\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
def report(label, f):\n\
\x20   try:\n\
\x20       f()\n\
\x20       print(label, 'ok')\n\
\x20   except OSError as e:\n\
\x20       print(label, errno.errorcode[e.errno])\n\
def sysc(label, nr, *args):\n\
\x20   ctypes.set_errno(0)\n\
\x20   r = libc.syscall(nr, *args)\n\
\x20   if r == 0 and nr in (56,):\n\
\x20       os._exit(0)\n\
\x20   print(label, 'ok' if r != -1 else errno.errorcode[ctypes.get_errno()])\n";

#[test]
fn seccomp_refuses_namespaces_mounts_tracing_and_kernel_interfaces_with_eperm() {
    let fx = Fixture::new();
    // Each call is made so that without the filter it would succeed or fail otherwise
    // (checked by running this test with the filter switched off): unshare,
    // ptrace attach to our own child, keyctl, add_key, userfaultfd (user-mode only),
    // io_uring_setup, process_vm_readv and clone(CLONE_NEWNET) succeed; mount, umount2,
    // chroot, perf_event_open and open_by_handle_at fault on their NULL arguments
    // (EFAULT); setns on a socket and bpf are EINVAL; clone3 of size 0 is EINVAL. Only
    // pivot_root and clone(CLONE_NEWUSER) answer EPERM either way.
    let out = run_py(
        &fx,
        &format!(
            "{ESCAPE_HELPERS}\
sysc('unshare', 272, 0x10000000)\n\
sysc('mount', 165, None, None, None, 0, None)\n\
sysc('umount2', 166, None, 0)\n\
sysc('chroot', 161, None)\n\
sysc('pivot_root', 155, None, None)\n\
sysc('setns', 308, 3, 0)\n\
child = os.fork()\n\
if child == 0:\n\
\x20   os.execv('/usr/bin/sleep', ['sleep', '60'])\n\
sysc('ptrace attach', 101, 16, child, 0, 0)\n\
os.kill(child, 9)\n\
os.waitpid(child, 0)\n\
sysc('keyctl', 250, 0, -3, 1)\n\
sysc('add_key', 248, b'user', b'airlock', b'x', 1, -3)\n\
sysc('bpf', 321, 0, None, 0)\n\
sysc('perf_event_open', 298, None, 0, -1, -1, 0)\n\
sysc('userfaultfd', 323, 1)\n\
sysc('io_uring_setup', 425, 1, ctypes.create_string_buffer(120))\n\
sysc('process_vm_readv', 310, 1, None, 0, None, 0, 0)\n\
sysc('open_by_handle_at', 304, -100, None, 0)\n\
sysc('clone with CLONE_NEWUSER', 56, 0x10000000 | 17, None, None, None, None)\n\
sysc('clone with CLONE_NEWNET', 56, 0x40000000 | 17, None, None, None, None)\n\
sysc('clone3', 435, None, 0)\n"
        ),
    );
    assert_eq!(
        out,
        "unshare EPERM\nmount EPERM\numount2 EPERM\nchroot EPERM\npivot_root EPERM\nsetns EPERM\nptrace attach EPERM\nkeyctl EPERM\n\
         add_key EPERM\nbpf EPERM\nperf_event_open EPERM\nuserfaultfd EPERM\n\
         io_uring_setup EPERM\nprocess_vm_readv EPERM\nopen_by_handle_at EPERM\n\
         clone with CLONE_NEWUSER EPERM\nclone with CLONE_NEWNET EPERM\nclone3 ENOSYS\n"
    );
}

#[test]
fn seccomp_allows_only_unix_sockets() {
    let fx = Fixture::new();
    let out = run_py(
        &fx,
        &format!(
            "{ESCAPE_HELPERS}\
for name, family, kind in [\n\
\x20       ('AF_INET', socket.AF_INET, socket.SOCK_STREAM),\n\
\x20       ('AF_INET udp', socket.AF_INET, socket.SOCK_DGRAM),\n\
\x20       ('AF_INET6', socket.AF_INET6, socket.SOCK_STREAM),\n\
\x20       ('AF_NETLINK', socket.AF_NETLINK, socket.SOCK_RAW),\n\
\x20       ('AF_PACKET', socket.AF_PACKET, socket.SOCK_RAW),\n\
\x20       ('AF_UNIX', socket.AF_UNIX, socket.SOCK_STREAM)]:\n\
\x20   report(name, lambda: socket.socket(family, kind).close())\n\
report('socketpair AF_UNIX', lambda: [s.close() for s in socket.socketpair()])\n\
sysc('socketpair AF_INET', 53, socket.AF_INET, socket.SOCK_STREAM, 0, ctypes.create_string_buffer(8))\n"
        ),
    );
    assert_eq!(
        out,
        "AF_INET EPERM\nAF_INET udp EPERM\nAF_INET6 EPERM\nAF_NETLINK EPERM\nAF_PACKET EPERM\n\
         AF_UNIX ok\nsocketpair AF_UNIX ok\nsocketpair AF_INET EPERM\n"
    );
}

#[test]
fn fork_threads_and_subprocesses_still_work_under_the_filter() {
    let fx = Fixture::new();
    // clone3 is ENOSYS, so glibc's pthread_create and posix_spawn fall back to clone,
    // whose flags (no namespace) pass the filter.
    let out = run_py(
        &fx,
        "import subprocess, threading\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   os._exit(7)\n\
         print('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n\
         t = threading.Thread(target=lambda: print('thread ran'))\n\
         t.start(); t.join()\n\
         pid = os.posix_spawn('/usr/bin/sh', ['sh', '-c', 'exit 5'], {})\n\
         print('posix_spawn', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n\
         r = subprocess.run(['/usr/bin/python3', '-c', 'print(6 * 7)'], capture_output=True, text=True)\n\
         print('subprocess', r.returncode, r.stdout.strip())\n",
    );
    assert_eq!(out, "fork 7\nthread ran\nposix_spawn 5\nsubprocess 0 42\n");
}

#[test]
fn the_filter_and_landlock_are_inherited_by_child_processes() {
    let fx = Fixture::new();
    let child = "import ctypes, errno, os, socket\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        r = libc.unshare(0x10000000)\n\
        print('unshare', errno.errorcode[ctypes.get_errno()] if r else 'ok')\n\
        try:\n\
        \x20   socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
        \x20   print('AF_INET ok')\n\
        except OSError as e:\n\
        \x20   print('AF_INET', errno.errorcode[e.errno])\n\
        try:\n\
        \x20   os.listdir('/')\n\
        \x20   print('list / ok')\n\
        except OSError as e:\n\
        \x20   print('list /', errno.errorcode[e.errno])\n\
        print(''.join(l for l in open('/proc/self/status') if l.startswith('Seccomp')), end='')\n";
    // A grandchild through a shell, so inheritance across two execs is shown.
    let script = format!(
        "import subprocess\n\
         r = subprocess.run(['/usr/bin/sh', '-c', 'exec /usr/bin/python3 -c \"$0\"', {child:?}],\n\
         \x20   capture_output=True, text=True)\n\
         print(r.stdout + r.stderr, end='')\n"
    );
    let out = run_py(&fx, &script);
    assert_eq!(
        out,
        "unshare EPERM\nAF_INET EPERM\nlist / EACCES\nSeccomp:\t2\nSeccomp_filters:\t2\n"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_32_bit_syscall_kills_the_process() {
    let fx = Fixture::new();
    // `mov eax, 20; int 0x80; ret`: getpid through the i386 ABI. The filter checks the
    // architecture first and kills on a mismatch (SIGSYS); unfiltered it returns the pid.
    let child = "import ctypes, mmap\n\
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n\
        m.write(bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n\
        f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n\
        print('returned', f())\n";
    let out = run_py(
        &fx,
        &format!(
            "import subprocess\n\
             r = subprocess.run(['/usr/bin/python3', '-c', {child:?}], capture_output=True, text=True)\n\
             print(r.returncode, repr(r.stdout))\n"
        ),
    );
    assert_eq!(out, format!("{} ''\n", -libc_sigsys()));
}

/// SIGSYS on Linux (31 on x86_64 and aarch64).
fn libc_sigsys() -> i32 {
    nix::sys::signal::Signal::SIGSYS as i32
}

#[test]
fn landlock_allows_only_the_policy_even_where_the_mount_view_would_allow_more() {
    let fx = Fixture::new();
    // Each "EACCES" below is allowed by the mount view and file permissions (the root
    // tmpfs, /etc and /dev are 0755 directories; /proc/self/comm is the worker's own,
    // writable file) and refused only by Landlock: none is beneath a rule, or the rule
    // grants less.
    let out = run_py(
        &fx,
        &format!(
            "{ESCAPE_HELPERS}\
report('read /etc/passwd', lambda: open('/etc/passwd').read())\n\
report('read /usr/bin/python3', lambda: open('/usr/bin/python3', 'rb').read(4))\n\
report('read /etc/ld.so.cache', lambda: open('/etc/ld.so.cache', 'rb').read(4))\n\
report('list /usr', lambda: os.listdir('/usr'))\n\
report('list /', lambda: os.listdir('/'))\n\
report('list /etc', lambda: os.listdir('/etc'))\n\
report('list /dev', lambda: os.listdir('/dev'))\n\
report('list /proc', lambda: os.listdir('/proc'))\n\
report('read /proc/self/comm', lambda: open('/proc/self/comm').read())\n\
report('write /proc/self/comm', lambda: os.write(os.open('/proc/self/comm', os.O_WRONLY), b'x'))\n\
report('write /session', lambda: open('/session/f', 'w').write('x'))\n\
report('write /tmp', lambda: open('/tmp/f', 'w').write('x'))\n\
report('mkdir /tmp/d', lambda: os.mkdir('/tmp/d'))\n\
report('write /dev/null', lambda: open('/dev/null', 'w').write('x'))\n\
report('read /dev/urandom', lambda: open('/dev/urandom', 'rb').read(4))\n"
        ),
    );
    assert_eq!(
        out,
        "read /etc/passwd ok\nread /usr/bin/python3 ok\nread /etc/ld.so.cache ok\nlist /usr ok\n\
         list / EACCES\nlist /etc EACCES\nlist /dev EACCES\nlist /proc ok\n\
         read /proc/self/comm ok\nwrite /proc/self/comm EACCES\nwrite /session ok\n\
         write /tmp ok\nmkdir /tmp/d ok\nwrite /dev/null ok\nread /dev/urandom ok\n"
    );
}

#[test]
fn rlimits_are_the_policy_and_cannot_be_raised() {
    let fx = Fixture::new();
    // The values of policy::RLIMITS: no core dumps, 1024 files, 1 GiB per file, 300 s
    // of CPU per process.
    let out = run_py(
        &fx,
        "import resource\n\
         for name in ['RLIMIT_CORE', 'RLIMIT_NOFILE', 'RLIMIT_FSIZE', 'RLIMIT_CPU']:\n\
         \x20   print(name, *resource.getrlimit(getattr(resource, name)))\n\
         try:\n\
         \x20   resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))\n\
         \x20   print('raised')\n\
         except ValueError as e:\n\
         \x20   print('raise refused:', e)\n",
    );
    assert_eq!(
        out,
        "RLIMIT_CORE 0 0\nRLIMIT_NOFILE 1024 1024\nRLIMIT_FSIZE 1073741824 1073741824\n\
         RLIMIT_CPU 300 300\nraise refused: not allowed to raise maximum limit\n"
    );
}

#[test]
fn probe_reports_every_layer_enforced_on_this_kernel() {
    init();
    let layers = airlock_sandbox::probe();
    let names: Vec<String> = layers.iter().map(|l| l.layer.to_string()).collect();
    assert_eq!(
        names,
        [
            "user namespaces",
            "no_new_privs",
            "landlock",
            "seccomp filter"
        ]
    );
    for l in &layers {
        assert!(l.enforced, "{l}");
    }
    let landlock = &layers[2];
    assert!(
        landlock.detail.starts_with("kernel ABI ")
            && landlock.detail.ends_with(", the policy needs 6"),
        "{landlock}"
    );
    // The probe confined only its own thread: this one can still do what it filters.
    let inet = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    );
    assert!(inet.is_ok(), "{inet:?}");
    assert!(fs::read_dir("/").is_ok());
}

// --- R -------------------------------------------------------------------------------

/// Debian's R binary, run directly as the daemon runs it (crates/airlockd/src/runtime.rs).
const R_BIN: &str = "/usr/lib/R/bin/exec/R";
/// Where scripts/setup-r-runtime.sh installs the R runtime.
const R_PREFIX: &str = "/opt/airlock/runtimes/r";

/// The request the daemon makes for R: its extra read-only mounts and R_HOME.
fn r_request(fx: &Fixture, argv: &[&str], extra_mounts: &[&str]) -> SpawnRequest {
    let mut req = fx.request(argv);
    for path in ["/etc/R", "/etc/alternatives"].iter().chain(extra_mounts) {
        req.ro_mounts.push(RoMount {
            host: path.into(),
            target: path.into(),
        });
    }
    req.env.push(("R_HOME".into(), "/usr/lib/R".into()));
    req
}

#[test]
fn r_runs_inside_the_unchanged_sandbox() {
    if !Path::new(R_BIN).exists() {
        eprintln!("{R_BIN} is not installed; skipped");
        return;
    }
    let fx = Fixture::new();
    // LAPACK (solve) checks the BLAS/LAPACK libraries behind /etc/alternatives; bit64
    // and hms are the packages the shim loads.
    let script = format!(
        "exec {R_BIN} --vanilla --no-echo -e '\
         suppressPackageStartupMessages(library(bit64)); invisible(loadNamespace(\"hms\")); \
         x <- solve(matrix(c(2, 0, 0, 4), 2)); \
         cat(\"R ok\", x[2, 2], as.character(as.integer64(2)^40), tempdir() != \"\", \"\\n\")' >&3"
    );
    let out = run_ok(&r_request(&fx, &sh(&script), &[]));
    assert_eq!(out, "R ok 0.25 1099511627776 TRUE \n");
}

#[test]
fn the_installed_r_runtime_speaks_the_protocol_inside_the_sandbox() {
    use airlock_protocol::data::{FromRuntime, OutputColumn, ToRuntime};
    use airlock_protocol::{encode_control, FrameDecoder, FrameKind, PROTOCOL_VERSION};
    use std::io::Write;

    let shim = format!("{R_PREFIX}/shim/airlock_runtime.R");
    if !Path::new(&shim).exists() || !Path::new(R_BIN).exists() {
        eprintln!("the R runtime is not installed (scripts/setup-r-runtime.sh); skipped");
        return;
    }
    let fx = Fixture::new();
    let req = r_request(
        &fx,
        &[R_BIN, "--vanilla", "--no-echo", "-f", &shim],
        &[R_PREFIX],
    );
    let (ours, theirs) = data_pair();
    let mut sandbox = spawn(&req, theirs).expect("spawn");
    let mut sock = fs::File::from(ours);
    let start = ToRuntime::Start {
        version: PROTOCOL_VERSION,
        script: "print('hi'); OutputDataSet <- data.frame(a = 1:3)".into(),
        input_name: "InputDataSet".into(),
        output_name: "OutputDataSet".into(),
        has_input: false,
        max_print_bytes: 1 << 20,
        output_batch_rows: 65536,
        max_frame_bytes: 1 << 20,
        params: Default::default(),
        output_columns: vec![OutputColumn {
            name: "a".into(),
            pg_type: "int4".parse().unwrap(),
        }],
        output_params: None,
        rows_per_read: None,
    };
    sock.write_all(&encode_control(&start).unwrap()).unwrap();
    sock.write_all(&encode_control(&ToRuntime::InputEnd).unwrap())
        .unwrap();
    let mut bytes = Vec::new();
    sock.read_to_end(&mut bytes).unwrap();
    let status = sandbox.wait().expect("wait");
    let mut dec = FrameDecoder::new();
    dec.extend(&bytes);
    let mut kinds = Vec::new();
    let mut controls = Vec::new();
    while let Some(f) = dec.next_frame().unwrap() {
        kinds.push(f.kind);
        if f.kind == FrameKind::Control {
            controls.push(f.control::<FromRuntime>().unwrap());
        }
    }
    assert_eq!(
        controls,
        [
            FromRuntime::Print {
                text: "[1] \"hi\"\n".into()
            },
            FromRuntime::Done { rows: 3 }
        ]
    );
    assert_eq!(kinds.iter().filter(|k| **k == FrameKind::Arrow).count(), 1);
    assert_eq!(status, ExitStatus::Code { code: 0 });
}

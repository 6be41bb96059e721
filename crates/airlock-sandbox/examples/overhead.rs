//! The sandbox's overhead over a bare process, for bench/run.sh: runs `/usr/bin/true`
//! N times as a plain child (fork + exec) and N times in a full sandbox (namespaces, uid
//! mapping, root filesystem, Landlock, rlimits, seccomp; no cgroup, which the daemon adds
//! per call), and prints the medians and their difference in milliseconds as one JSON
//! line. Needs root.
//!
//!   cargo run --release -p airlock-sandbox --example overhead -- [N]

use std::{
    fs,
    os::{
        fd::OwnedFd,
        unix::fs::{chown, PermissionsExt},
    },
    path::PathBuf,
    process::Command,
    time::Instant,
};

use airlock_protocol::spawner::{RoMount, SpawnRequest};
use airlock_sandbox::spawn;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// A uid no account uses, as the daemon's workers.
const WORKER: u32 = 64_999;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    nix::unistd::setgroups(&[]).expect("drop supplementary groups (run as root)");
    let dir = std::env::temp_dir().join(format!("airlock-overhead-{}", std::process::id()));
    fs::create_dir_all(dir.join("root")).expect("mkdir");
    fs::create_dir_all(dir.join("session")).expect("mkdir");
    fs::set_permissions(dir.join("session"), fs::Permissions::from_mode(0o700)).expect("chmod");
    chown(dir.join("session"), Some(WORKER), Some(WORKER)).expect("chown");
    let req = SpawnRequest {
        call_id: 1,
        uid: WORKER,
        gid: WORKER,
        root_mountpoint: dir.join("root"),
        session_dir: dir.join("session"),
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
        ]
        .iter()
        .map(|(l, t)| (PathBuf::from(l), PathBuf::from(t)))
        .collect(),
        argv: vec!["/usr/bin/true".into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        hostname: "airlock".into(),
        tmp_size_bytes: 8 << 20,
        cgroup: None,
        cpu_rlimit_seconds: 0,
        warm: None,
    };
    let mut bare = Vec::with_capacity(n);
    let mut sandboxed = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = Command::new("/usr/bin/true").status().expect("run true");
        assert!(status.success());
        bare.push(t.elapsed().as_secs_f64() * 1000.0);

        let (_ours, theirs): (OwnedFd, OwnedFd) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let t = Instant::now();
        let mut sandbox = spawn(&req, theirs).expect("spawn a sandbox");
        sandbox.wait().expect("wait for the sandbox");
        sandboxed.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = fs::remove_dir_all(&dir);
    let (b, s) = (median(bare), median(sandboxed));
    println!(
        "{{\"runs\": {n}, \"bare_ms\": {b:.3}, \"sandboxed_ms\": {s:.3}, \"overhead_ms\": {:.3}}}",
        s - b
    );
}

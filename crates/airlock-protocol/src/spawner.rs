//! The spawner conversation: `airlockd` ⇄ its single-threaded sandbox spawner, over a
//! socketpair created when the daemon starts. Both ends are the daemon's own code; the
//! messages are typed all the same so the spawner can stay a small loop.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One bind mount of a host path into the sandbox, read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoMount {
    pub host: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
}

/// Everything the spawner needs to build one sandbox. The data socket travels beside
/// this message as `SCM_RIGHTS` and becomes fd 3 in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub call_id: u64,
    pub uid: u32,
    pub gid: u32,
    /// An empty directory owned by the daemon; each sandbox mounts its private root
    /// filesystem over it, in its own mount namespace, then pivots into it.
    pub root_mountpoint: PathBuf,
    /// The session folder on the host, already created (0700, owned by `uid`).
    pub session_dir: PathBuf,
    /// Where the session folder appears inside the sandbox; the working directory.
    pub session_target: PathBuf,
    /// Read-only mounts: the runtime, its libraries, the shim.
    pub ro_mounts: Vec<RoMount>,
    /// Symlinks to create in the sandbox root, `(link, target)`, e.g. `/bin -> usr/bin`.
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// Program and arguments, run with `execve` inside the sandbox.
    pub argv: Vec<String>,
    /// The complete environment of the runtime.
    pub env: Vec<(String, String)>,
    /// Hostname inside the sandbox's UTS namespace.
    pub hostname: String,
    /// Size of the sandbox's private /tmp, bytes.
    pub tmp_size_bytes: u64,
    /// The call's cgroup, which the sandbox init enters before any step of its setup.
    /// None: no cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupJoin>,
    /// RLIMIT_CPU of each process, seconds: a per-process backstop behind the daemon's
    /// per-call CPU accounting. 0 keeps the sandbox's default.
    pub cpu_rlimit_seconds: u64,
    /// The warm path: clone this call's sandbox from the pre-initialised interpreter
    /// started with this spec, if one is ready; otherwise start `argv` cold. The sandbox
    /// is the same either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmSpec>,
}

/// How a sandbox init enters its call's cgroup. Both ways avoid writing its pid from
/// outside, which takes the kernel's global threadgroup lock and, after a pause, waits
/// for an RCU grace period (6-15 ms measured on cgroup v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "snake_case")]
pub enum CgroupJoin {
    /// cgroup v1: the `tasks` file of each controller's group. The spawner opens them
    /// (as root) before the clone; the init writes `0` to each as its first step,
    /// moving itself, a single thread, which needs no global lock.
    V1 { tasks: Vec<PathBuf> },
    /// cgroup v2: the group's directory; the init is cloned straight into it
    /// (`clone3` with `CLONE_INTO_CGROUP`).
    V2 { dir: PathBuf },
}

/// How to start a pre-initialised interpreter (a zygote) for the warm path: a root
/// process outside any sandbox that imports its libraries once, runs no user code, and
/// clones each call's sandbox from itself (`runtimes/python/airlock_warm.py`). The
/// spawner gives it its socket as fd 3 and the sandbox library as fd 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// How many zygotes of this spec to keep: each clones one sandbox at a time, so
    /// more build more sandboxes at once.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Daemon → spawner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSpawner {
    Spawn(Box<SpawnRequest>),
    /// Start the pre-initialised interpreter of this spec now (if it is not running), so
    /// the first call is warm too.
    Prepare(WarmSpec),
    /// Kill the whole sandbox of this call (SIGKILL to its pid-namespace init).
    Kill {
        call_id: u64,
    },
}

/// How a sandbox's init process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitStatus {
    Code { code: i32 },
    Signal { signal: i32 },
}

/// Spawner → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromSpawner {
    /// `warm`: cloned from a pre-initialised interpreter rather than exec'd.
    Spawned {
        call_id: u64,
        pid: i32,
        #[serde(default)]
        warm: bool,
    },
    SpawnFailed {
        call_id: u64,
        error: String,
    },
    Exited {
        call_id: u64,
        status: ExitStatus,
    },
    /// A pre-initialised interpreter became ready, or stopped (with why), for the log.
    Warm {
        program: String,
        ready: bool,
        detail: String,
    },
}

/// Pre-initialised interpreter → spawner (the spawner sends it `ToSpawner::Spawn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromZygote {
    /// Libraries imported, single-threaded, waiting for calls.
    Ready {
        pid: i32,
    },
    /// The call's sandbox runs; a pidfd of its init travels beside this message.
    Spawned {
        call_id: u64,
        pid: i32,
    },
    SpawnFailed {
        call_id: u64,
        error: String,
    },
    /// The zygote is the sandbox init's parent: it reaps it and reports how it ended.
    Exited {
        call_id: u64,
        status: ExitStatus,
    },
}

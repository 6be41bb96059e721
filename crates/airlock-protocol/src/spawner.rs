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
    /// Files to write the sandbox init's pid to before it is released: the call's
    /// cgroup (`cgroup.procs` of each v1 controller, or the one v2 file). Empty: no
    /// cgroup.
    pub cgroup_procs: Vec<PathBuf>,
    /// RLIMIT_CPU of each process, seconds: a per-process backstop behind the daemon's
    /// per-call CPU accounting. 0 keeps the sandbox's default.
    pub cpu_rlimit_seconds: u64,
}

/// Daemon → spawner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToSpawner {
    Spawn(Box<SpawnRequest>),
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
    Spawned { call_id: u64, pid: i32 },
    SpawnFailed { call_id: u64, error: String },
    Exited { call_id: u64, status: ExitStatus },
}

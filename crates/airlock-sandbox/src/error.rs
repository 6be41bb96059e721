//! The crate's one error type: a variant per step that can fail, each naming the path or
//! resource and carrying the source error. The spawner sends `to_string()` of it to the
//! daemon as `SpawnFailed.error`, so messages say which step failed and the errno.

use std::io;
use std::path::PathBuf;

use airlock_protocol::ProtocolError;
use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    // Checking the request, before anything is created.
    #[error("invalid spawn request: {field} {path:?} must be an absolute path without `..`")]
    NotAbsolute { field: &'static str, path: PathBuf },
    #[error(
        "invalid spawn request: {field} {path:?} would be hidden by the sandbox's own {reserved}"
    )]
    Reserved {
        field: &'static str,
        path: PathBuf,
        reserved: &'static str,
    },
    #[error("invalid spawn request: {field} contains a NUL byte or a character it cannot hold")]
    BadString { field: &'static str },
    #[error("invalid spawn request: argv is empty")]
    EmptyArgv,
    #[error("invalid spawn request: hostname must be 1 to 64 bytes, got {len}")]
    BadHostname { len: usize },
    #[error(
        "invalid spawn request: refusing uid {uid} / gid {gid}; the runtime never runs as root"
    )]
    RootIdentity { uid: u32, gid: u32 },
    #[error("stat ro mount source {path}: {source}")]
    StatSource { path: PathBuf, source: io::Error },
    #[error(
        "invalid spawn request: environment variable {name:?} is not on the sandbox's allowlist"
    )]
    EnvNotAllowed { name: String },
    #[error("invalid spawn request: HOME is {home:?}, it must be the session folder {session:?}")]
    EnvHome { home: String, session: PathBuf },

    // Preparing the confinement, before the clone.
    #[error("compile the seccomp filter: {0}")]
    Seccomp(seccompiler::BackendError),
    #[error(
        "landlock does not fully enforce the sandbox's filesystem policy on this kernel, \
         refusing to run without it: {what}"
    )]
    LandlockNotEnforced { what: String },
    #[error("create the landlock ruleset: {source}")]
    LandlockRuleset { source: landlock::RulesetError },
    #[error("open {path} for its landlock rule: {source}")]
    LandlockOpen {
        path: PathBuf,
        source: landlock::PathFdError,
    },
    #[error("add the landlock rule for {path}: {source}")]
    LandlockRule {
        path: PathBuf,
        source: landlock::RulesetError,
    },

    // The calling process.
    #[error("read the caller's supplementary groups: {0}")]
    GetGroups(Errno),
    #[error("the caller has supplementary groups {groups:?}; a sandbox would inherit them (call setgroups(&[]) first)")]
    SupplementaryGroups { groups: Vec<u32> },
    #[error("drop the spawner's supplementary groups: {0}")]
    SetGroups(Errno),

    // The parent's side of spawn.
    #[error("create the {what} pipe: {source}")]
    Pipe { what: &'static str, source: Errno },
    #[error("clone the sandbox init: {0}")]
    Clone(Errno),
    #[error("duplicate the sandbox's pidfd for the warm path: {0}")]
    DupPidfd(io::Error),
    #[error("warm path: the spawn request is not valid JSON: {0}")]
    WarmRequest(serde_json::Error),
    #[error("write /proc/{pid}/{file}: {source}")]
    IdMap {
        pid: i32,
        file: &'static str,
        source: io::Error,
    },
    #[error("move the sandbox init into its cgroup via {path}: {source}")]
    JoinCgroup {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("release the sandbox init: {0}")]
    Release(Errno),
    #[error("read the sandbox setup result: {0}")]
    SetupResult(Errno),
    #[error("sandbox setup reported a malformed result ({len} bytes)")]
    MalformedResult { len: usize },

    // The child's steps, in order (see `setup`).
    #[error("reset signal dispositions: {0}")]
    ResetSignals(Errno),
    #[error("wait for the parent to write the id maps: {0}")]
    WaitForRelease(Errno),
    #[error("make all mounts private: {0}")]
    MakeMountsPrivate(Errno),
    #[error("mount tmpfs on {path}: {source}")]
    MountTmpfs { path: PathBuf, source: Errno },
    #[error("enter the sandbox root {path}: {source}")]
    EnterRoot { path: PathBuf, source: Errno },
    #[error("clone the mount tree of {path}: {source}")]
    CloneTree { path: PathBuf, source: Errno },
    #[error("set {attrs} on the mount tree of {path}: {source}")]
    SetMountAttrs {
        path: PathBuf,
        attrs: &'static str,
        source: Errno,
    },
    #[error("switch the file-creation identity to the worker: {0}")]
    FsIdentity(Errno),
    #[error("create {path} in the sandbox: {source}")]
    Create { path: PathBuf, source: Errno },
    #[error("bind {host} on {target}: {source}")]
    Bind {
        host: PathBuf,
        target: PathBuf,
        source: Errno,
    },
    #[error("symlink {link} -> {target}: {source}")]
    Symlink {
        link: PathBuf,
        target: PathBuf,
        source: Errno,
    },
    #[error("mount proc on /proc: {0}")]
    MountProc(Errno),
    #[error("write {path}: {source}")]
    WriteFile { path: &'static str, source: Errno },
    #[error("remount {path} read-only: {source}")]
    RemountReadOnly { path: &'static str, source: Errno },
    #[error("pivot_root into {path}: {source}")]
    PivotRoot { path: PathBuf, source: Errno },
    #[error("detach the host's root: {0}")]
    DetachOldRoot(Errno),
    #[error("chdir {path}: {source}")]
    Chdir { path: PathBuf, source: Errno },
    #[error("sethostname {name}: {source}")]
    SetHostname { name: String, source: Errno },
    #[error("setresgid {gid}: {source}")]
    SetGid { gid: u32, source: Errno },
    #[error("setresuid {uid}: {source}")]
    SetUid { uid: u32, source: Errno },
    #[error("drop the capability bounding set: {0}")]
    DropBoundingSet(Errno),
    #[error("clear ambient capabilities: {0}")]
    ClearAmbientCaps(Errno),
    #[error("clear effective, permitted and inheritable capabilities: {0}")]
    ClearCaps(Errno),
    #[error("set no_new_privs: {0}")]
    NoNewPrivs(Errno),
    #[error("set the parent-death signal: {0}")]
    ParentDeathSignal(Errno),
    #[error("add the landlock rule for {path} in the sandbox: {source}")]
    LandlockAddRule { path: PathBuf, source: Errno },
    #[error("restrict the sandbox with its landlock ruleset: {0}")]
    LandlockRestrict(Errno),
    #[error("install {what}: {source}")]
    InstallFds { what: &'static str, source: Errno },
    #[error("set {resource} to {value}: {source}")]
    SetRlimit {
        resource: &'static str,
        value: u64,
        source: Errno,
    },
    #[error("install the seccomp filter returning {action}: {source}")]
    ApplySeccomp { action: String, source: Errno },
    #[error("execve {path}: {source}")]
    Exec { path: String, source: Errno },
    #[error("sandbox setup failed at unknown step {code}: {source}")]
    UnknownStep { code: u32, source: Errno },

    // A running sandbox.
    #[error("send SIGKILL to sandbox pid {pid}: {source}")]
    Kill { pid: i32, source: Errno },
    #[error("wait for sandbox pid {pid}: {source}")]
    Wait { pid: i32, source: Errno },

    // The spawner loop and its socket.
    #[error("spawner socket {op}: {source}")]
    Socket { op: &'static str, source: Errno },
    #[error("spawner socket: message of {len} bytes or its fds were truncated")]
    Truncated { len: usize },
    #[error("spawner socket: a message of {len} bytes is not exactly one frame")]
    NotOneFrame { len: usize },
    #[error("spawner message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("poll the spawner socket and sandboxes: {0}")]
    Poll(Errno),
}

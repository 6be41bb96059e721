//! The fixed part of every sandbox, declared in one reviewed place with a reason per
//! entry. What varies per call (the runtime's read-only mounts, its symlinks, the
//! session folder, sizes) comes in the `SpawnRequest` from the daemon's configuration.

use std::ffi::CStr;

/// Options of the tmpfs that becomes the sandbox's `/`. Small: it only holds mountpoints,
/// symlinks and `/etc/passwd` + `/etc/group`, and it is read-only before the runtime
/// starts. `uid`/`gid` are appended per call: the root directory must belong to the only
/// mapped identity, or nothing could be created in it (see `setup::set_fs_identity`).
pub(crate) const ROOT_TMPFS_OPTS: &str = "size=16m,nr_inodes=4096,mode=0755";

/// Options of `/dev`: a tiny tmpfs holding the device nodes below and nothing else.
pub(crate) const DEV_TMPFS_OPTS: &CStr = c"size=64k,nr_inodes=64,mode=0755";

/// Device nodes bind-mounted from the host, `(host, target relative to the root)`.
/// Each is what a runtime legitimately opens; none gives access to hardware, a
/// terminal, or another process.
pub(crate) const DEV_NODES: [(&CStr, &CStr); 5] = [
    // Discarding output, `open("/dev/null")` in countless libraries.
    (c"/dev/null", c"dev/null"),
    // Zero-filled reads (mmap of anonymous memory in old code, dd).
    (c"/dev/zero", c"dev/zero"),
    // ENOSPC on write; harmless, expected to exist by some test suites.
    (c"/dev/full", c"dev/full"),
    // Randomness: Python's os.urandom falls back to it, R's RNG seeding reads it.
    (c"/dev/random", c"dev/random"),
    (c"/dev/urandom", c"dev/urandom"),
];

/// Symlinks in `/dev`, `(link relative to the root, target)`: the usual aliases of the
/// process's own fds, which resolve through the sandbox's own `/proc`.
pub(crate) const DEV_SYMLINKS: [(&CStr, &CStr); 4] = [
    (c"dev/fd", c"/proc/self/fd"),
    (c"dev/stdin", c"/proc/self/fd/0"),
    (c"dev/stdout", c"/proc/self/fd/1"),
    (c"dev/stderr", c"/proc/self/fd/2"),
];

/// Top-level paths the sandbox mounts itself; a request's mount or symlink below one of
/// them would be hidden, so it is refused.
pub(crate) const RESERVED: [&str; 3] = ["dev", "proc", "tmp"];

/// The worker's name in the sandbox's `/etc/passwd` and `/etc/group`.
pub(crate) const WORKER_NAME: &str = "airlock";

/// The worker's login shell: it never logs in.
pub(crate) const WORKER_SHELL: &str = "/usr/sbin/nologin";

/// Mode of the sandbox's `/etc/passwd` and `/etc/group`.
pub(crate) const ETC_FILE_MODE: u32 = 0o644;

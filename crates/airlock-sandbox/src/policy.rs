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

/// Names of the runtime's environment a request may set; anything else (PG*, the
/// daemon's variables, LD_PRELOAD, credentials) is refused before the clone. `HOME` must
/// be the session folder and is set to it when the request leaves it out.
pub(crate) const ENV_ALLOWED: [&str; 12] = [
    // Where programs are found; the runtime's own directories.
    "PATH",
    // The session folder (checked), so `~` and dotfiles land in it.
    "HOME",
    // The worker's name, for libraries that ask the environment instead of getpwuid.
    "USER",
    "LOGNAME",
    // Locale and time zone: formatting of numbers, dates, messages.
    "LANG",
    "LANGUAGE",
    "TZ",
    // The private /tmp.
    "TMPDIR",
    // Thread counts of the math libraries, so they stay within the pids and CPU limits.
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    // Where R's own files are (/usr/lib/R): the R binary is started directly, without
    // the bin/R shell wrapper that would otherwise set it, and cannot start without it.
    "R_HOME",
];

/// Prefixes of allowed environment names: the `LC_*` locale categories.
pub(crate) const ENV_ALLOWED_PREFIXES: [&str; 1] = ["LC_"];

/// When a denied syscall is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum When {
    /// Every call.
    Always,
    /// When the 32-bit argument `arg` is anything but `allowed`.
    ArgIsNot { arg: u8, allowed: u64 },
    /// When argument `arg` has any bit of `mask` set.
    ArgHasAnyOf { arg: u8, mask: u64 },
}

/// One entry of the seccomp denylist.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeniedSyscall {
    pub name: &'static str,
    pub nr: libc::c_long,
    pub when: When,
    /// What the call returns instead of running.
    pub errno: i32,
    /// Why the runtime never needs it, or what it would open up.
    #[cfg_attr(not(test), allow(dead_code))] // For reviewers; the policy's tests read it.
    pub reason: &'static str,
}

const fn deny(name: &'static str, nr: libc::c_long, reason: &'static str) -> DeniedSyscall {
    DeniedSyscall {
        name,
        nr,
        when: When::Always,
        errno: libc::EPERM,
        reason,
    }
}

/// Every namespace flag of clone/unshare. `CLONE_NEWTIME` (0x80) lies in clone(2)'s
/// exit-signal byte, where no valid signal (< 65) sets it, so denying it costs nothing.
pub(crate) const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

/// The seccomp policy: a denylist, applied last before `execve` and inherited by every
/// process of the sandbox.
///
/// A denylist (default allow) rather than an allowlist: the filter sits behind the
/// namespaces, the worker identity, the empty capability sets and Landlock, and its job
/// is to shut the kernel interfaces those layers leave reachable (new user namespaces,
/// io_uring, bpf, keyrings, ...). An allowlist would have to track every syscall that
/// CPython, R and every compiled extension they load ever make; a missing entry breaks
/// user code in ways users cannot diagnose.
///
/// Denied calls return EPERM rather than killing the process: the call does nothing
/// either way, and a script gets a clear `PermissionError` it can report, where a kill
/// would surface as a bare "runtime died of SIGSYS". `clone3` returns ENOSYS instead:
/// its flags are in a struct seccomp cannot read, so it is refused whole, and ENOSYS
/// (not EPERM) is what makes glibc fall back to `clone`, whose flags are checked.
///
/// The filter also checks the architecture (seccompiler does): a syscall made through
/// another ABI (32-bit `int 0x80` on x86_64) kills the process, since its numbers mean
/// other calls. x32 numbers share the native architecture value, so each entry is also
/// denied under its x32 number (see [`X32_ONLY_NUMBERS`]).
pub(crate) const DENIED_SYSCALLS: [DeniedSyscall; 35] = [
    // Filesystem view.
    deny(
        "mount",
        libc::SYS_mount,
        "rearranging the filesystem view is the sandbox's job, done before exec",
    ),
    deny(
        "umount2",
        libc::SYS_umount2,
        "unmounting could uncover what a mount hides",
    ),
    deny(
        "pivot_root",
        libc::SYS_pivot_root,
        "a second root change has no use and is a classic escape step",
    ),
    deny(
        "chroot",
        libc::SYS_chroot,
        "chroot tricks are a classic escape step; the root is already set",
    ),
    deny(
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "opens files by handle, bypassing path lookup and so the mount view (shocker)",
    ),
    deny(
        "name_to_handle_at",
        libc::SYS_name_to_handle_at,
        "the other half of open_by_handle_at; leaks inode handles",
    ),
    // Namespaces.
    deny(
        "unshare",
        libc::SYS_unshare,
        "a new user namespace hands out a full capability set and with it most of the kernel's attack surface",
    ),
    deny(
        "setns",
        libc::SYS_setns,
        "joining another namespace would leave the sandbox's",
    ),
    DeniedSyscall {
        name: "clone",
        nr: libc::SYS_clone,
        when: When::ArgHasAnyOf {
            arg: 0,
            mask: NAMESPACE_FLAGS,
        },
        errno: libc::EPERM,
        reason: "fork and threads stay allowed; new namespaces are refused as with unshare",
    },
    DeniedSyscall {
        name: "clone3",
        nr: libc::SYS_clone3,
        when: When::Always,
        errno: libc::ENOSYS,
        reason: "its flags are in memory seccomp cannot read; ENOSYS makes glibc fall back to clone",
    },
    // Other processes' memory.
    deny(
        "ptrace",
        libc::SYS_ptrace,
        "tracing reads and rewrites other processes; a runtime never needs it",
    ),
    deny(
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        "reads another process's memory",
    ),
    deny(
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        "writes another process's memory",
    ),
    // The kernel itself.
    deny(
        "kexec_load",
        libc::SYS_kexec_load,
        "loads a new kernel",
    ),
    deny(
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        "loads a new kernel",
    ),
    deny(
        "init_module",
        libc::SYS_init_module,
        "loads kernel code",
    ),
    deny(
        "finit_module",
        libc::SYS_finit_module,
        "loads kernel code",
    ),
    deny(
        "delete_module",
        libc::SYS_delete_module,
        "unloads kernel code",
    ),
    deny(
        "bpf",
        libc::SYS_bpf,
        "eBPF verifier and maps: a large, often exploited attack surface",
    ),
    deny(
        "perf_event_open",
        libc::SYS_perf_event_open,
        "a large, often exploited attack surface; side channels on other processes",
    ),
    deny(
        "userfaultfd",
        libc::SYS_userfaultfd,
        "stalls kernel code at chosen points, the usual tool for winning kernel races",
    ),
    deny(
        "keyctl",
        libc::SYS_keyctl,
        "kernel keyrings are not namespaced: keys could leak between calls",
    ),
    deny(
        "add_key",
        libc::SYS_add_key,
        "kernel keyrings are not namespaced",
    ),
    deny(
        "request_key",
        libc::SYS_request_key,
        "kernel keyrings are not namespaced; may run host upcalls",
    ),
    deny(
        "io_uring_setup",
        libc::SYS_io_uring_setup,
        "io_uring runs syscalls seccomp never sees, and is a large, often exploited surface",
    ),
    deny(
        "io_uring_enter",
        libc::SYS_io_uring_enter,
        "io_uring: see io_uring_setup",
    ),
    deny(
        "io_uring_register",
        libc::SYS_io_uring_register,
        "io_uring: see io_uring_setup",
    ),
    // The machine.
    deny(
        "reboot",
        libc::SYS_reboot,
        "restarts the machine (or the pid namespace)",
    ),
    deny("swapon", libc::SYS_swapon, "changes the host's swap"),
    deny("swapoff", libc::SYS_swapoff, "changes the host's swap"),
    deny(
        "acct",
        libc::SYS_acct,
        "switches the host's process accounting",
    ),
    deny(
        "quotactl",
        libc::SYS_quotactl,
        "reads and changes the host's disk quotas",
    ),
    deny(
        "quotactl_fd",
        libc::SYS_quotactl_fd,
        "quotactl by file descriptor: see quotactl",
    ),
    // Networking. The network namespace has only a loopback that is down; these close
    // the rest of the socket families' code (netlink, packet, ...) to the script.
    DeniedSyscall {
        name: "socket",
        nr: libc::SYS_socket,
        when: When::ArgIsNot {
            arg: 0,
            allowed: libc::AF_UNIX as u64,
        },
        errno: libc::EPERM,
        reason: "only AF_UNIX (the runtime's own socketpairs, multiprocessing); no inet, netlink or packet sockets",
    },
    DeniedSyscall {
        name: "socketpair",
        nr: libc::SYS_socketpair,
        when: When::ArgIsNot {
            arg: 0,
            allowed: libc::AF_UNIX as u64,
        },
        errno: libc::EPERM,
        reason: "as socket",
    },
];

/// Set on the syscall number by the x32 ABI (x86_64 only): the same call under another
/// number, checked by the same filter.
#[cfg(target_arch = "x86_64")]
pub(crate) const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;

/// Denied calls whose x32 number is not the native one with [`X32_SYSCALL_BIT`] (from
/// the kernel's arch/x86/entry/syscalls/syscall_64.tbl); the filter denies both.
#[cfg(target_arch = "x86_64")]
pub(crate) const X32_ONLY_NUMBERS: [(&str, libc::c_long); 4] = [
    ("ptrace", 521),
    ("kexec_load", 528),
    ("process_vm_readv", 539),
    ("process_vm_writev", 540),
];

/// One resource limit of the runtime, soft and hard alike (it cannot raise them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rlimit {
    pub name: &'static str,
    pub resource: libc::c_int,
    pub value: u64,
}

/// CPU seconds of each process of the sandbox (RLIMIT_CPU counts per process, so the
/// cgroup's CPU quota and the wall clock bound the whole tree). Should come from the
/// daemon's config, next to the wall-clock limit.
pub(crate) const CPU_SECONDS: u64 = 300;

/// Resource limits set before exec. RLIMIT_NPROC is deliberately absent: it counts every
/// process of the uid across the host, so concurrent calls of one worker would share it
/// and one call could starve another; the cgroup pids limit bounds each call instead.
pub(crate) const RLIMITS: [Rlimit; 4] = [
    // No core dumps: a dump of the runtime holds the script's data and lands outside
    // the sandbox's view of disk use.
    Rlimit {
        name: "RLIMIT_CORE",
        resource: libc::RLIMIT_CORE as libc::c_int,
        value: 0,
    },
    // Bounds fd exhaustion (and select()-sized bugs); plenty for a runtime.
    Rlimit {
        name: "RLIMIT_NOFILE",
        resource: libc::RLIMIT_NOFILE as libc::c_int,
        value: 1024,
    },
    // No single file beyond 1 GiB; writes past it fail with EFBIG (Python ignores
    // SIGXFSZ). The tmpfs and session sizes bound the total.
    Rlimit {
        name: "RLIMIT_FSIZE",
        resource: libc::RLIMIT_FSIZE as libc::c_int,
        value: 1 << 30,
    },
    // A spinning process is killed (SIGKILL at the hard limit) even if the wall clock
    // were not watched.
    Rlimit {
        name: "RLIMIT_CPU",
        resource: libc::RLIMIT_CPU as libc::c_int,
        value: CPU_SECONDS,
    },
];

/// The Landlock ABI whose access rights the policy handles: filesystem rights up to
/// IoctlDev (ABI 5), TCP bind/connect (ABI 4, none allowed), and scoping of abstract
/// Unix sockets and signals to the sandbox (ABI 6). ABI 7 adds only audit flags. A
/// kernel with less is refused, never silently given less (see `probe`).
pub(crate) const LANDLOCK_ABI: landlock::ABI = landlock::ABI::V6;

/// What the sandbox may do beneath a path in the Landlock ruleset. For a file rule
/// only the rights that apply to files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsAccess {
    /// Read, list and execute: the runtime's read-only mounts.
    ReadExec,
    /// Read and list: /proc, /etc/passwd, /etc/group.
    Read,
    /// Read and write, but neither list nor execute: the device nodes. Ioctl too, so
    /// `isatty(/dev/null)` answers ENOTTY and not EACCES; none of the five devices has
    /// an ioctl that does anything without capabilities.
    Device,
    /// Everything: the session folder and /tmp.
    ReadWrite,
}

/// Paths that exist only inside the sandbox: their inodes appear when the child mounts
/// or writes them, so the child adds their rules (after pivot_root, by absolute path).
/// Everything else in the ruleset is a host inode the parent adds: each request's
/// read-only mounts ([`FsAccess::ReadExec`]), the session folder
/// ([`FsAccess::ReadWrite`]) and [`DEV_NODES`] ([`FsAccess::Device`]). Nothing else is
/// reachable: not `/` itself, not `/etc` or `/dev` as directories.
///
/// `(absolute path in the sandbox, is a directory, access)`.
pub(crate) const LANDLOCK_IN_SANDBOX: [(&CStr, bool, FsAccess); 4] = [
    (c"/tmp", true, FsAccess::ReadWrite),
    (c"/proc", true, FsAccess::Read),
    (c"/etc/passwd", false, FsAccess::Read),
    (c"/etc/group", false, FsAccess::Read),
];

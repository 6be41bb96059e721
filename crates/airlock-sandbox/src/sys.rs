//! Every `unsafe` block of this crate: raw syscalls that `nix` does not wrap, or wraps
//! in a way the sandbox child cannot use.
//!
//! Return codes go through [`check`] (`-1` → [`Errno::last`]). The functions marked
//! *child-safe* are async-signal-safe: they allocate nothing and call no glibc function
//! that takes a lock, so they may run in the child of [`clone_sandbox_init`] even when the
//! parent was multithreaded.

use std::ffi::{c_char, c_int, c_long, CStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// Funnels a raw return value: `-1` means "see errno".
fn check(ret: c_long) -> Result<c_long, Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// `struct clone_args` of `clone3(2)`, second version (88 bytes, with `cgroup`, Linux
/// 5.7); libc does not define it.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), which the libc crate does not define for every
/// target.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Which side of [`clone_sandbox_init`] we are on.
pub(crate) enum Cloned {
    /// The new process. It must never return into the caller's frames: it ends in
    /// `execve` or `_exit`.
    Child,
    Parent {
        pid: i32,
        pidfd: OwnedFd,
    },
}

/// `clone3` with `flags | CLONE_PIDFD`, fork-like (no new stack), exit signal SIGCHLD;
/// with `cgroup` (a cgroup v2 directory) the child starts in that group
/// (`CLONE_INTO_CGROUP`).
pub(crate) fn clone_sandbox_init(flags: u64, cgroup: Option<&OwnedFd>) -> Result<Cloned, Errno> {
    let mut pidfd: c_int = -1;
    let mut args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        // An open fd is non-negative.
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid, initialised clone_args of the size we pass, and `pidfd`
    // (and the borrowed cgroup fd) outlive the call. Without CLONE_VM or a new stack this behaves like fork(): the
    // child gets a copy of this address space and returns here with 0. `spawn` sends the
    // child straight into `child_main`, which never returns and does only
    // async-signal-safe work, so glibc state copied from other threads (locks, the
    // thread list) is never touched. `spawn_in_place` (the warm path) returns into the
    // caller after the same steps; its contract requires a single-threaded caller, so
    // no other thread's lock can be held in the copy. (glibc's cached tid is not
    // updated by a raw clone; glibc >= 2.34 asks the kernel for the tid where it
    // signals itself.)
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    })?;
    if ret == 0 {
        return Ok(Cloned::Child);
    }
    // SAFETY: with CLONE_PIDFD and a successful clone3 the kernel stored a new, open,
    // close-on-exec pidfd in `pidfd` that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The kernel returns a pid_t, which always fits in i32.
    Ok(Cloned::Parent {
        pid: ret as i32,
        pidfd,
    })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: c_int) -> Result<(), Errno> {
    // SAFETY: a borrowed, open pidfd; a null siginfo is allowed and means "as kill()".
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// Child-safe. Resets every catchable signal to its default disposition and unblocks all
/// signals. Errors from the two glibc-reserved real-time signals (EINVAL) are expected.
pub(crate) fn reset_signals() -> Result<(), Errno> {
    for sig in 1..libc::SIGRTMAX() + 1 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler, so no Rust code can be run by a signal;
        // `signal` only reads its arguments.
        let ret = unsafe { libc::signal(sig, libc::SIG_DFL) };
        if ret == libc::SIG_ERR {
            let e = Errno::last();
            if e != Errno::EINVAL {
                return Err(e);
            }
        }
    }
    // SAFETY: an all-zero sigset_t is a valid (then explicitly emptied) set, and a null
    // old-set pointer is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()).into())?;
    }
    Ok(())
}

/// Child-safe. `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC |
/// AT_RECURSIVE)`: a detached copy of the mount tree at `path`.
pub(crate) fn open_tree_clone(path: &CStr) -> Result<OwnedFd, Errno> {
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Child-safe. `mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, {attr_set})`: adds
/// `attr_set` (MOUNT_ATTR_*) to every mount of a detached tree, clearing nothing, so the
/// flags a user namespace locks stay as they are.
pub(crate) fn mount_setattr_tree(tree: BorrowedFd<'_>, attr_set: u64) -> Result<(), Errno> {
    mount_setattr(
        tree.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
        attr_set,
    )
}

/// Child-safe. `mount_setattr(AT_FDCWD, path, 0, {attr_set})` on one mount.
pub(crate) fn mount_setattr_path(path: &CStr, attr_set: u64) -> Result<(), Errno> {
    mount_setattr(libc::AT_FDCWD, path, 0, attr_set)
}

fn mount_setattr(dirfd: RawFd, path: &CStr, flags: c_int, attr_set: u64) -> Result<(), Errno> {
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated, `attr` is a valid mount_attr and we pass its
    // exact size; both outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

/// Child-safe. `move_mount(tree, "", AT_FDCWD, to, MOVE_MOUNT_F_EMPTY_PATH)`: attaches a
/// detached tree at `to`.
pub(crate) fn move_mount(tree: BorrowedFd<'_>, to: &CStr) -> Result<(), Errno> {
    // SAFETY: both strings are NUL-terminated and outlive the call; `tree` is open.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Child-safe. The raw `setresgid` syscall. glibc's wrapper would try to signal every
/// thread it believes exists, and in a child cloned from a multithreaded process that
/// list is stale; the syscall changes the calling thread, which here is the whole
/// process.
pub(crate) fn setresgid(gid: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

/// Child-safe. The raw `setresuid` syscall; see [`setresgid`].
pub(crate) fn setresuid(uid: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

/// Child-safe. The raw `setfsuid` / `setfsgid` syscalls; they report failure only by
/// not changing the value, so each is called twice and the second answer checked.
pub(crate) fn set_fs_identity(uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments; these syscalls cannot fail with -1.
    let (fsgid, fsuid) = unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        let fsgid = libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
        let fsuid = libc::syscall(libc::SYS_setfsuid, uid);
        (fsgid, fsuid)
    };
    if fsgid != c_long::from(gid) || fsuid != c_long::from(uid) {
        return Err(Errno::EPERM);
    }
    Ok(())
}

/// Child-safe. Drops every capability from the bounding set (needs CAP_SETPCAP, so it
/// must come before the capability sets are cleared). Stops at the first number the
/// kernel does not know (EINVAL).
pub(crate) fn drop_bounding_set() -> Result<(), Errno> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if ret == -1 {
            let e = Errno::last();
            if e == Errno::EINVAL && cap > 0 {
                return Ok(());
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Child-safe. Clears the ambient capability set.
pub(crate) fn clear_ambient_caps() -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        }
        .into(),
    )
    .map(drop)
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0-31,
/// 32-63).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Child-safe. Empties the effective, permitted and inheritable sets, then reads them
/// back and fails with EPERM if anything is left.
pub(crate) fn clear_caps() -> Result<(), Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and the two data structs v3 requires, valid for the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })?;
    // SAFETY: as above; capget writes at most two data structs.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    if data
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0)
    {
        return Err(Errno::EPERM);
    }
    Ok(())
}

/// Child-safe. `dup2(old, new)`; the copy at `new` is not close-on-exec.
pub(crate) fn dup2(old: RawFd, new: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 on integers; it closes whatever `new` was, which the caller intends
    // (the child owns its whole fd table).
    check(unsafe { libc::dup2(old, new) }.into()).map(drop)
}

/// Child-safe. A close-on-exec duplicate of `fd` numbered `min` or above.
pub(crate) fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: fcntl on integers.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) }.into()).map(|f| f as RawFd)
}

/// Child-safe. Clears FD_CLOEXEC on `fd`.
pub(crate) fn clear_cloexec(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: fcntl on integers.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }.into()).map(drop)
}

/// Child-safe. One `write` to a raw fd (the result pipe, whose 12-byte records are
/// below PIPE_BUF and so written whole or not at all).
pub(crate) fn write_raw(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for reads of its length; writing to a closed or wrong fd
    // is an error return, never memory unsafety.
    check(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) } as c_long).map(|n| n as usize)
}

/// Child-safe. `_exit`: ends the process without running destructors or atexit
/// handlers, none of which belong to the child.
pub(crate) fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit takes an integer and never returns; skipping destructors is the
    // point (they would act on the parent's objects copied into the child).
    unsafe { libc::_exit(code) }
}

/// Child-safe. Closes every fd from `first` to `last` inclusive.
pub(crate) fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range on integers. Closing fds other code holds as OwnedFd is
    // harmless here: the child never runs their destructors (it ends in execve/_exit).
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) }).map(drop)
}

/// Child-safe. `execve`; returns only on failure.
///
/// `argv` and `envp` must be null-terminated arrays of pointers to NUL-terminated
/// strings that live at least as long as the call; [`crate::plan::Plan`] builds them.
pub(crate) fn execve(path: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
    let terminated = |a: &[*const c_char]| a.last().is_some_and(|p| p.is_null());
    if !terminated(argv) || !terminated(envp) {
        return Errno::EINVAL;
    }
    // SAFETY: `path` is NUL-terminated; both arrays end in a null pointer (checked
    // above) and point at strings owned by the Plan, which outlives this call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

/// `landlock_create_ruleset(2)`'s flag asking for the kernel's ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;

/// `LANDLOCK_RULE_PATH_BENEATH`, the rule type of [`LandlockPathBeneath`].
const LANDLOCK_RULE_PATH_BENEATH: c_int = 1;

/// `struct landlock_path_beneath_attr`; packed in the kernel's UAPI. libc lacks it.
#[repr(C, packed)]
struct LandlockPathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version: ENOSYS when it is not built in, EOPNOTSUPP when it
/// is built but not enabled at boot.
pub(crate) fn landlock_abi() -> Result<i32, Errno> {
    // SAFETY: a null attr with size 0 and the VERSION flag only queries the version.
    let v = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    })?;
    // ABI versions are small positive integers.
    Ok(v as i32)
}

/// Child-safe. Allows `access` (LANDLOCK_ACCESS_FS_* bits) beneath the file or directory
/// `parent` in the ruleset `ruleset`.
pub(crate) fn landlock_add_path_rule(
    ruleset: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    access: u64,
) -> Result<(), Errno> {
    let attr = LandlockPathBeneath {
        allowed_access: access,
        parent_fd: parent.as_raw_fd(),
    };
    // SAFETY: `attr` is a valid path_beneath attr that outlives the call; the kernel
    // copies it and keeps a reference to `parent`'s inode, not to the fd.
    check(unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const LandlockPathBeneath,
            0u32,
        )
    })
    .map(drop)
}

/// Child-safe. Restricts the calling thread (and everything it later starts) to
/// `ruleset`. Needs no_new_privs (or CAP_SYS_ADMIN) first.
pub(crate) fn landlock_restrict_self(ruleset: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) })
        .map(drop)
}

/// Child-safe. Installs a seccomp filter on the calling thread; it is inherited across
/// fork, clone and execve. Needs no_new_privs (or CAP_SYS_ADMIN) first.
pub(crate) fn seccomp_set_filter(program: &[seccompiler::sock_filter]) -> Result<(), Errno> {
    let len = u16::try_from(program.len()).map_err(|_| Errno::EINVAL)?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is repr(C) with the kernel's layout (u16, u8, u8,
        // u32), the same as libc's; the kernel only reads through the pointer.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `prog` points at `len` valid instructions that outlive the call; the
    // kernel copies the program.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0u32,
            &prog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

/// Child-safe. Sets the soft and hard limit of `resource` (RLIMIT_*) to `value`, with the
/// raw `prlimit64` syscall on the calling process.
pub(crate) fn set_rlimit(resource: c_int, value: u64) -> Result<(), Errno> {
    let limit = libc::rlimit64 {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: pid 0 is the caller; `limit` is valid for the call; a null old-limit
    // pointer is allowed.
    check(unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            resource,
            &limit as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    })
    .map(drop)
}

/// `clone3(NULL, 0)`: EINVAL from the kernel (a zero size is too small), ENOSYS under
/// the sandbox's seccomp filter. Creates no process either way.
pub(crate) fn clone3_invalid() -> Errno {
    // SAFETY: a null pointer with size 0 is rejected before the kernel reads anything.
    match check(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) }) {
        Ok(_) => Errno::UnknownErrno,
        Err(e) => e,
    }
}

/// Arranges for `cmd`'s child to hold `fds[0]` as fd 3 and `fds[1]` as fd 4 (not
/// close-on-exec), and no fd above 4: the warm path's interpreter gets its spawner
/// socket and the sandbox library, and nothing else of the spawner's.
pub(crate) fn pass_fds_3_and_4(cmd: &mut std::process::Command, fds: [RawFd; 2]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; it calls only fcntl, dup2 and
    // close_range, which are async-signal-safe, allocate nothing and take no lock. Both
    // fds are first moved above 4 so neither dup2 can overwrite the other's source.
    unsafe {
        cmd.pre_exec(move || {
            let high = |fd: RawFd| check(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) as c_long);
            let (a, b) = (high(fds[0])?, high(fds[1])?);
            check(libc::dup2(a as RawFd, 3) as c_long)?;
            check(libc::dup2(b as RawFd, 4) as c_long)?;
            check(libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0))?;
            Ok(())
        });
    }
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open on an integer; on success the kernel returns a new fd that
    // nothing else owns.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: a fresh fd from the kernel, owned by nobody else; fds fit in i32.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One received datagram: its length, the fds attached to it (close-on-exec), and
/// whether the kernel cut the data or the fds short.
pub(crate) struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub truncated: bool,
}

/// `recvmsg` of one message with up to 4 SCM_RIGHTS fds, `MSG_CMSG_CLOEXEC`.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    let mut truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: SCM_RIGHTS installed this fd in our table just now;
                        // nothing else knows its number, so we are its only owner.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        // MSG_CTRUNC: some fds were dropped by the kernel (the ones delivered are
        // in the part nix refuses to parse; they leak until exit, which is rare and
        // bounded by the sender's bug).
        Err(_) => truncated = true,
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}

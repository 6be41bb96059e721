//! Building a sandbox inside the current process, as an ordered script: one function
//! per step, each saying what it defends against.
//!
//! Everything here runs in the child of `clone`, between the clone and `execve`, so it
//! is async-signal-safe: no allocation, no glibc call that takes a lock. It reads the
//! [`Plan`] prepared before the clone and reports a failure as a fixed-size [`Failure`]
//! (step, item index, errno) that the parent turns into a [`SandboxError`].
//!
//! The steps are split so that a later pre-initialised interpreter can build the
//! sandbox in a process it forked itself: [`enter_sandbox`] (namespaces' contents:
//! filesystem, hostname), [`become_worker`] (identity, capabilities, no_new_privs),
//! [`restrict_filesystem`] (Landlock), [`install_fds`], [`set_rlimits`],
//! [`apply_seccomp`] (last: nothing after it but exec), then [`exec_runtime`].

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use airlock_protocol::spawner::{CgroupJoin, SpawnRequest};
use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag, AT_FDCWD};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;
use nix::sys::stat::{mkdirat, umask, Mode};
use nix::unistd::{chdir, pivot_root, sethostname, symlinkat, write};

use crate::plan::{Plan, Target};
use crate::policy::{
    DEV_NODES, DEV_SYMLINKS, DEV_TMPFS_OPTS, ETC_FILE_MODE, LANDLOCK_IN_SANDBOX, RLIMITS,
};
use crate::SandboxError;
use crate::{seccomp, sys};

/// The data socket's number in the runtime.
pub const DATA_FD: RawFd = 3;

/// The steps that can fail, in the order they run. The discriminant is what crosses the
/// result pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    ResetProcessState = 1,
    WaitForRelease,
    JoinCgroup,
    MakeMountsPrivate,
    MountRootTmpfs,
    EnterRoot,
    CloneRoTree,
    SetRoTreeAttrs,
    CloneDevTree,
    SetDevTreeAttrs,
    CloneSessionTree,
    SetSessionTreeAttrs,
    SetFsIdentity,
    CreateRoMountpoint,
    AttachRoMount,
    CreateSymlink,
    CreateDevDir,
    MountDevTmpfs,
    CreateDevNode,
    AttachDevNode,
    CreateDevSymlink,
    RemountDevReadOnly,
    CreateProcDir,
    MountProc,
    CreateTmpDir,
    MountTmp,
    CreateSessionMountpoint,
    AttachSession,
    CreateEtcDir,
    WritePasswd,
    WriteGroup,
    RemountRootReadOnly,
    PivotRoot,
    DetachOldRoot,
    EnterSession,
    SetHostname,
    SetGid,
    SetUid,
    DropBoundingSet,
    ClearAmbientCaps,
    ClearCaps,
    NoNewPrivs,
    ParentDeathSignal,
    AddLandlockRule,
    RestrictLandlock,
    InstallFds,
    SetRlimit,
    ApplySeccomp,
    Exec,
}

impl Step {
    const ALL: [Step; 49] = [
        Step::ResetProcessState,
        Step::WaitForRelease,
        Step::JoinCgroup,
        Step::MakeMountsPrivate,
        Step::MountRootTmpfs,
        Step::EnterRoot,
        Step::CloneRoTree,
        Step::SetRoTreeAttrs,
        Step::CloneDevTree,
        Step::SetDevTreeAttrs,
        Step::CloneSessionTree,
        Step::SetSessionTreeAttrs,
        Step::SetFsIdentity,
        Step::CreateRoMountpoint,
        Step::AttachRoMount,
        Step::CreateSymlink,
        Step::CreateDevDir,
        Step::MountDevTmpfs,
        Step::CreateDevNode,
        Step::AttachDevNode,
        Step::CreateDevSymlink,
        Step::RemountDevReadOnly,
        Step::CreateProcDir,
        Step::MountProc,
        Step::CreateTmpDir,
        Step::MountTmp,
        Step::CreateSessionMountpoint,
        Step::AttachSession,
        Step::CreateEtcDir,
        Step::WritePasswd,
        Step::WriteGroup,
        Step::RemountRootReadOnly,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::EnterSession,
        Step::SetHostname,
        Step::SetGid,
        Step::SetUid,
        Step::DropBoundingSet,
        Step::ClearAmbientCaps,
        Step::ClearCaps,
        Step::NoNewPrivs,
        Step::ParentDeathSignal,
        Step::AddLandlockRule,
        Step::RestrictLandlock,
        Step::InstallFds,
        Step::SetRlimit,
        Step::ApplySeccomp,
        Step::Exec,
    ];

    fn from_code(code: u32) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u32 == code)
    }
}

/// A failed step: which one, which item of its list (mount, symlink, device node), and
/// the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub step: Step,
    pub index: u32,
    pub errno: Errno,
}

/// Size of an encoded [`Failure`] on the result pipe.
pub(crate) const FAILURE_LEN: usize = 12;

type StepResult = Result<(), Failure>;

/// `map_err` helper: the failure of `step` on item `index`.
fn at(step: Step, index: usize) -> impl FnOnce(Errno) -> Failure {
    move |errno| Failure {
        step,
        // Lists come from one SpawnRequest; they never hold 2^32 items.
        index: index as u32,
        errno,
    }
}

fn failed(step: Step) -> impl FnOnce(Errno) -> Failure {
    at(step, 0)
}

impl Failure {
    pub(crate) fn encode(self) -> [u8; FAILURE_LEN] {
        let mut out = [0u8; FAILURE_LEN];
        out[..4].copy_from_slice(&(self.step as u32).to_le_bytes());
        out[4..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..].copy_from_slice(&(self.errno as i32).to_le_bytes());
        out
    }

    /// Turns an encoded failure into the error naming the step, its path and the errno.
    pub(crate) fn decode(bytes: &[u8; FAILURE_LEN], req: &SpawnRequest) -> SandboxError {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (code, index) = (word(0), word(4) as usize);
        let errno = Errno::from_raw(word(8) as i32);
        match Step::from_code(code) {
            Some(step) => describe(step, index, errno, req),
            None => SandboxError::UnknownStep {
                code,
                source: errno,
            },
        }
    }
}

/// The error for `step` failing on item `index` of its list in `req`.
fn describe(step: Step, index: usize, errno: Errno, req: &SpawnRequest) -> SandboxError {
    let source = errno;
    let ro_host = || {
        req.ro_mounts
            .get(index)
            .map(|m| m.host.clone())
            .unwrap_or_default()
    };
    let ro_target = || {
        req.ro_mounts
            .get(index)
            .map(|m| m.target.clone())
            .unwrap_or_default()
    };
    let dev_host = || {
        let host = DEV_NODES.get(index).map_or(c"?", |d| d.0);
        PathBuf::from(OsStr::from_bytes(host.to_bytes()))
    };
    let in_root = |c: &CStr| Path::new("/").join(OsStr::from_bytes(c.to_bytes()));
    match step {
        Step::ResetProcessState => SandboxError::ResetSignals(errno),
        Step::WaitForRelease => SandboxError::WaitForRelease(errno),
        Step::JoinCgroup => SandboxError::JoinCgroup {
            path: match &req.cgroup {
                Some(CgroupJoin::V1 { tasks }) => tasks.get(index).cloned().unwrap_or_default(),
                Some(CgroupJoin::V2 { dir }) => dir.clone(),
                None => PathBuf::new(),
            },
            source: source.into(),
        },
        Step::MakeMountsPrivate => SandboxError::MakeMountsPrivate(errno),
        Step::MountRootTmpfs => SandboxError::MountTmpfs {
            path: req.root_mountpoint.clone(),
            source,
        },
        Step::EnterRoot => SandboxError::EnterRoot {
            path: req.root_mountpoint.clone(),
            source,
        },
        Step::CloneRoTree => SandboxError::CloneTree {
            path: ro_host(),
            source,
        },
        Step::SetRoTreeAttrs => SandboxError::SetMountAttrs {
            path: ro_host(),
            attrs: "ro,nosuid,nodev",
            source,
        },
        Step::CloneDevTree => SandboxError::CloneTree {
            path: dev_host(),
            source,
        },
        Step::SetDevTreeAttrs => SandboxError::SetMountAttrs {
            path: dev_host(),
            attrs: "nosuid,noexec",
            source,
        },
        Step::CloneSessionTree => SandboxError::CloneTree {
            path: req.session_dir.clone(),
            source,
        },
        Step::SetSessionTreeAttrs => SandboxError::SetMountAttrs {
            path: req.session_dir.clone(),
            attrs: "nosuid,nodev",
            source,
        },
        Step::SetFsIdentity => SandboxError::FsIdentity(errno),
        Step::CreateRoMountpoint => SandboxError::Create {
            path: ro_target(),
            source,
        },
        Step::AttachRoMount => SandboxError::Bind {
            host: ro_host(),
            target: ro_target(),
            source,
        },
        Step::CreateSymlink => {
            let (link, target) = req.symlinks.get(index).cloned().unwrap_or_default();
            SandboxError::Symlink {
                link,
                target,
                source,
            }
        }
        Step::CreateDevDir => SandboxError::Create {
            path: "/dev".into(),
            source,
        },
        Step::MountDevTmpfs => SandboxError::MountTmpfs {
            path: "/dev".into(),
            source,
        },
        Step::CreateDevNode => SandboxError::Create {
            path: dev_host(),
            source,
        },
        Step::AttachDevNode => SandboxError::Bind {
            host: dev_host(),
            target: dev_host(),
            source,
        },
        Step::CreateDevSymlink => {
            let (link, target) = DEV_SYMLINKS.get(index).copied().unwrap_or((c"?", c"?"));
            SandboxError::Symlink {
                link: in_root(link),
                target: PathBuf::from(OsStr::from_bytes(target.to_bytes())),
                source,
            }
        }
        Step::RemountDevReadOnly => SandboxError::RemountReadOnly {
            path: "/dev",
            source,
        },
        Step::CreateProcDir => SandboxError::Create {
            path: "/proc".into(),
            source,
        },
        Step::MountProc => SandboxError::MountProc(errno),
        Step::CreateTmpDir => SandboxError::Create {
            path: "/tmp".into(),
            source,
        },
        Step::MountTmp => SandboxError::MountTmpfs {
            path: "/tmp".into(),
            source,
        },
        Step::CreateSessionMountpoint => SandboxError::Create {
            path: req.session_target.clone(),
            source,
        },
        Step::AttachSession => SandboxError::Bind {
            host: req.session_dir.clone(),
            target: req.session_target.clone(),
            source,
        },
        Step::CreateEtcDir => SandboxError::Create {
            path: "/etc".into(),
            source,
        },
        Step::WritePasswd => SandboxError::WriteFile {
            path: "/etc/passwd",
            source,
        },
        Step::WriteGroup => SandboxError::WriteFile {
            path: "/etc/group",
            source,
        },
        Step::RemountRootReadOnly => SandboxError::RemountReadOnly { path: "/", source },
        Step::PivotRoot => SandboxError::PivotRoot {
            path: req.root_mountpoint.clone(),
            source,
        },
        Step::DetachOldRoot => SandboxError::DetachOldRoot(errno),
        Step::EnterSession => SandboxError::Chdir {
            path: req.session_target.clone(),
            source,
        },
        Step::SetHostname => SandboxError::SetHostname {
            name: req.hostname.clone(),
            source,
        },
        Step::SetGid => SandboxError::SetGid {
            gid: req.gid,
            source,
        },
        Step::SetUid => SandboxError::SetUid {
            uid: req.uid,
            source,
        },
        Step::DropBoundingSet => SandboxError::DropBoundingSet(errno),
        Step::ClearAmbientCaps => SandboxError::ClearAmbientCaps(errno),
        Step::ClearCaps => SandboxError::ClearCaps(errno),
        Step::NoNewPrivs => SandboxError::NoNewPrivs(errno),
        Step::ParentDeathSignal => SandboxError::ParentDeathSignal(errno),
        Step::AddLandlockRule => SandboxError::LandlockAddRule {
            path: LANDLOCK_IN_SANDBOX
                .get(index)
                .map(|(p, _, _)| PathBuf::from(OsStr::from_bytes(p.to_bytes())))
                .unwrap_or_default(),
            source,
        },
        Step::RestrictLandlock => SandboxError::LandlockRestrict(errno),
        Step::InstallFds => SandboxError::InstallFds {
            what: match index {
                0 => "the result pipe above fd 3",
                1 => "the data socket as fd 3",
                2 => "/dev/null as fds 0-2",
                _ => "only fds 0-3 (close_range)",
            },
            source,
        },
        Step::SetRlimit => {
            let (resource, value) = RLIMITS.get(index).map_or(("?", 0), |r| (r.name, r.value));
            SandboxError::SetRlimit {
                resource,
                value,
                source,
            }
        }
        Step::ApplySeccomp => SandboxError::ApplySeccomp {
            action: seccomp::errnos()
                .get(index)
                .map_or_else(|| "?".into(), |e| format!("{}", Errno::from_raw(*e))),
            source,
        },
        Step::Exec => SandboxError::Exec {
            path: req.argv.first().cloned().unwrap_or_default(),
            source,
        },
    }
}

/// The fds the child is handed by `spawn`. All are the parent's, inherited by the clone.
pub(crate) struct ChildFds<'a> {
    pub data: BorrowedFd<'a>,
    pub release_read: BorrowedFd<'a>,
    pub release_write: RawFd,
    pub result_read: RawFd,
    pub result_write: BorrowedFd<'a>,
}

/// The whole life of the sandbox init between `clone` and `execve`. Never returns: it
/// execs the runtime, or reports the failed step on the result pipe and exits 127.
pub(crate) fn child_main(plan: &mut Plan, fds: ChildFds<'_>) -> ! {
    let (failure, result_fd) = match child_setup(plan, fds) {
        Ok(result_fd) => (exec_runtime(plan), result_fd),
        Err(failed) => failed,
    };
    report_and_exit(failure, result_fd)
}

/// The warm path's sandbox init: the same steps as [`child_main`], in the same order,
/// but instead of exec it closes the result pipe (EOF tells the parent every step is in
/// force) and returns, so the pre-initialised interpreter that cloned it goes on to run
/// the call inside the finished sandbox. On failure it reports and exits like
/// [`child_main`]; it returns only when fully confined.
pub(crate) fn child_in_place(plan: &mut Plan, fds: ChildFds<'_>) {
    match child_setup(plan, fds) {
        Ok(result_fd) => {
            // Nothing else of the setup is open any more (`install_fds` closed it all).
            let _ = nix::unistd::close(result_fd);
        }
        Err((failure, result_fd)) => report_and_exit(failure, result_fd),
    }
}

/// Every step up to and including seccomp; returns the result pipe's fd (above 3).
fn child_setup(plan: &mut Plan, fds: ChildFds<'_>) -> Result<RawFd, (Failure, RawFd)> {
    // The parent's ends of the two pipes: without closing them here, EOF on the release
    // pipe could never be seen if the parent died.
    let _ = nix::unistd::close(fds.release_write);
    let _ = nix::unistd::close(fds.result_read);
    let mut result_fd = fds.result_write.as_raw_fd();
    let steps = (|| {
        reset_process_state()?;
        wait_for_release(fds.release_read)?;
        join_cgroup(plan)?;
        enter_sandbox(plan)?;
        become_worker(plan)?;
        restrict_filesystem(plan)?;
        result_fd = install_fds(fds.data.as_raw_fd(), result_fd)?;
        set_rlimits(plan)?;
        apply_seccomp(plan)
    })();
    match steps {
        Ok(()) => Ok(result_fd),
        Err(failure) => Err((failure, result_fd)),
    }
}

fn report_and_exit(failure: Failure, result_fd: RawFd) -> ! {
    // Best effort: if the parent is gone there is nobody to tell.
    let _ = sys::write_raw(result_fd, &failure.encode());
    sys::exit_now(127)
}

/// Signals and umask come from whoever started the spawner (Rust's runtime ignores
/// SIGPIPE, and an ignored signal survives exec); the runtime gets the defaults, all
/// signals unblocked, and umask 022.
fn reset_process_state() -> StepResult {
    sys::reset_signals().map_err(failed(Step::ResetProcessState))?;
    umask(Mode::from_bits_truncate(0o022));
    Ok(())
}

/// Until the parent has written the uid and gid maps the child is an unmapped identity;
/// nothing it creates or mounts could be owned correctly. Blocks until released; EOF
/// means the parent gave up (and will kill us).
fn wait_for_release(release: BorrowedFd<'_>) -> StepResult {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(release, &mut byte) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(failed(Step::WaitForRelease)(Errno::EPIPE)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(failed(Step::WaitForRelease)(e)),
        }
    }
}

/// Before anything of the sandbox is built, the init enters the call's cgroup, so all
/// of its setup and everything of the runtime's is within the call's memory, pids and
/// CPU limits and accounting. On cgroup v1 it moves itself, a single thread, by writing
/// `0` to each controller's `tasks` file (opened by the spawner as root): a pid written
/// from outside would take the kernel's global threadgroup lock, whose write side waits
/// for an RCU grace period (6-15 ms after a pause). On v2 the clone already placed it
/// there (`CLONE_INTO_CGROUP`).
fn join_cgroup(plan: &Plan) -> StepResult {
    for (i, tasks) in plan.cgroup_tasks.iter().enumerate() {
        match write(tasks, b"0") {
            Ok(1) => {}
            Ok(_) => return Err(at(Step::JoinCgroup, i)(Errno::EIO)),
            Err(e) => return Err(at(Step::JoinCgroup, i)(e)),
        }
    }
    Ok(())
}

/// Builds the sandbox's filesystem and hostname in the current process, which must
/// already be alone in fresh user, mount, pid, network, IPC and UTS namespaces (with
/// its uid/gid maps written) and hold all capabilities there. Ends inside the new root,
/// in the session folder.
pub(crate) fn enter_sandbox(plan: &mut Plan) -> StepResult {
    make_mounts_private()?;
    mount_root_tmpfs(plan)?;
    enter_root(plan)?;
    clone_source_trees(plan)?;
    set_fs_identity(plan)?;
    attach_ro_mounts(plan)?;
    create_symlinks(plan)?;
    build_dev(plan)?;
    mount_proc()?;
    mount_tmp(plan)?;
    attach_session(plan)?;
    write_etc_identity(plan)?;
    remount_root_read_only()?;
    pivot_into_root()?;
    enter_session(plan)?;
    set_hostname(plan)
}

/// Without this, mounts made below would propagate back to the host's mount namespace
/// (shared subtrees), and host mounts would keep appearing inside the sandbox.
fn make_mounts_private() -> StepResult {
    mount(
        None::<&CStr>,
        c"/",
        None::<&CStr>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&CStr>,
    )
    .map_err(failed(Step::MakeMountsPrivate))
}

/// The sandbox's `/` is a fresh, empty, size-limited tmpfs: nothing of the host is
/// visible in it unless a step below puts it there.
fn mount_root_tmpfs(plan: &Plan) -> StepResult {
    mount(
        Some(c"tmpfs"),
        plan.root.as_c_str(),
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(plan.root_tmpfs_opts.as_c_str()),
    )
    .map_err(failed(Step::MountRootTmpfs))
}

/// Every later path is relative to the new root, so none can name a host path by
/// mistake (the host sources are the only absolute paths, and only opened, never
/// created).
fn enter_root(plan: &Plan) -> StepResult {
    chdir(plan.root.as_c_str()).map_err(failed(Step::EnterRoot))
}

/// Clones every host tree the sandbox will see (the read-only runtime, device nodes,
/// the session folder) while path lookups still run as host root, so the daemon's
/// private parent directories (0700) stay closed to the worker. Each clone gets its
/// restrictions before it is attached: read-only, no setuid, no device nodes. Adding
/// flags with mount_setattr clears none, so the flags a user namespace locks are kept,
/// and AT_RECURSIVE covers mounts below the source too.
fn clone_source_trees(plan: &mut Plan) -> StepResult {
    use libc::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    for (i, (m, slot)) in plan
        .ro_mounts
        .iter()
        .zip(plan.trees.ro.iter_mut())
        .enumerate()
    {
        let tree = sys::open_tree_clone(&m.host).map_err(at(Step::CloneRoTree, i))?;
        sys::mount_setattr_tree(
            tree.as_fd(),
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
        .map_err(at(Step::SetRoTreeAttrs, i))?;
        *slot = Some(tree);
    }
    for (i, ((host, _), slot)) in DEV_NODES.iter().zip(plan.trees.dev.iter_mut()).enumerate() {
        let tree = sys::open_tree_clone(host).map_err(at(Step::CloneDevTree, i))?;
        sys::mount_setattr_tree(tree.as_fd(), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
            .map_err(at(Step::SetDevTreeAttrs, i))?;
        *slot = Some(tree);
    }
    let tree =
        sys::open_tree_clone(&plan.session_source).map_err(failed(Step::CloneSessionTree))?;
    sys::mount_setattr_tree(tree.as_fd(), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        .map_err(failed(Step::SetSessionTreeAttrs))?;
    plan.trees.session = Some(tree);
    Ok(())
}

/// The kernel refuses to create files for an identity the user namespace does not map
/// (EOVERFLOW), and root is deliberately not mapped: files of the skeleton are created
/// as the worker. They stay immutable to it: the root is remounted read-only below.
fn set_fs_identity(plan: &Plan) -> StepResult {
    sys::set_fs_identity(plan.uid, plan.gid).map_err(failed(Step::SetFsIdentity))
}

/// Only the listed host paths exist in the sandbox, each read-only.
fn attach_ro_mounts(plan: &Plan) -> StepResult {
    for (i, (m, tree)) in plan.ro_mounts.iter().zip(&plan.trees.ro).enumerate() {
        create_mountpoint(&m.target, m.is_dir).map_err(at(Step::CreateRoMountpoint, i))?;
        let tree = tree
            .as_ref()
            .ok_or(Errno::EBADF)
            .map_err(at(Step::AttachRoMount, i))?;
        sys::move_mount(tree.as_fd(), &m.target.rel).map_err(at(Step::AttachRoMount, i))?;
    }
    Ok(())
}

/// The usual merged-/usr aliases (`/bin -> usr/bin`) so interpreters find their loader
/// and libraries at the paths compiled into them.
fn create_symlinks(plan: &Plan) -> StepResult {
    for (i, s) in plan.symlinks.iter().enumerate() {
        create_parents(&s.link).map_err(at(Step::CreateSymlink, i))?;
        symlinkat(s.points_to.as_c_str(), AT_FDCWD, s.link.rel.as_c_str())
            .map_err(at(Step::CreateSymlink, i))?;
    }
    Ok(())
}

/// `/dev` holds five harmless device nodes and the fd aliases, nothing else: no disks,
/// no terminals, no /dev/shm shared with the host. Its tmpfs is read-only once built.
fn build_dev(plan: &Plan) -> StepResult {
    mkdir(c"dev").map_err(failed(Step::CreateDevDir))?;
    mount(
        Some(c"tmpfs"),
        c"dev",
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(DEV_TMPFS_OPTS),
    )
    .map_err(failed(Step::MountDevTmpfs))?;
    for (i, ((_, target), tree)) in DEV_NODES.iter().zip(&plan.trees.dev).enumerate() {
        create_file(target).map_err(at(Step::CreateDevNode, i))?;
        let tree = tree
            .as_ref()
            .ok_or(Errno::EBADF)
            .map_err(at(Step::AttachDevNode, i))?;
        sys::move_mount(tree.as_fd(), target).map_err(at(Step::AttachDevNode, i))?;
    }
    for (i, (link, points_to)) in DEV_SYMLINKS.iter().enumerate() {
        symlinkat(*points_to, AT_FDCWD, *link).map_err(at(Step::CreateDevSymlink, i))?;
    }
    sys::mount_setattr_path(c"dev", libc::MOUNT_ATTR_RDONLY)
        .map_err(failed(Step::RemountDevReadOnly))
}

/// A fresh procfs of the sandbox's own pid namespace: the runtime sees only its own
/// processes, never the host's (or Postgres's) command lines and environments.
fn mount_proc() -> StepResult {
    mkdir(c"proc").map_err(failed(Step::CreateProcDir))?;
    mount(
        Some(c"proc"),
        c"proc",
        Some(c"proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&CStr>,
    )
    .map_err(failed(Step::MountProc))
}

/// A private, size-limited scratch space: the script cannot fill the host's /tmp or
/// read other sessions' files there.
fn mount_tmp(plan: &Plan) -> StepResult {
    mkdir(c"tmp").map_err(failed(Step::CreateTmpDir))?;
    mount(
        Some(c"tmpfs"),
        c"tmp",
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(plan.tmp_opts.as_c_str()),
    )
    .map_err(failed(Step::MountTmp))
}

/// The session folder is the only writable host path, and carries no setuid binaries
/// or device nodes.
fn attach_session(plan: &Plan) -> StepResult {
    create_mountpoint(&plan.session_target, true).map_err(failed(Step::CreateSessionMountpoint))?;
    let tree = plan
        .trees
        .session
        .as_ref()
        .ok_or(Errno::EBADF)
        .map_err(failed(Step::AttachSession))?;
    sys::move_mount(tree.as_fd(), &plan.session_target.rel).map_err(failed(Step::AttachSession))
}

/// The host's account databases never enter the sandbox; the worker gets a name (some
/// libraries fail without one) and a home, the session folder. O_EXCL refuses a request
/// that also mounted these files.
fn write_etc_identity(plan: &Plan) -> StepResult {
    mkdir(c"etc").map_err(failed(Step::CreateEtcDir))?;
    write_new_file(c"etc/passwd", &plan.passwd).map_err(failed(Step::WritePasswd))?;
    write_new_file(c"etc/group", &plan.group).map_err(failed(Step::WriteGroup))
}

/// Nothing in the sandbox's own tree is writable: no planting files next to the runtime,
/// no replacing /etc/passwd.
fn remount_root_read_only() -> StepResult {
    mount(
        None::<&CStr>,
        c".",
        None::<&CStr>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&CStr>,
    )
    .map_err(failed(Step::RemountRootReadOnly))
}

/// A chroot can be escaped by a process that keeps a handle on the old root; after
/// pivot_root and detaching the old root, the host's filesystem is not reachable from
/// this mount namespace at all.
fn pivot_into_root() -> StepResult {
    pivot_root(c".", c".").map_err(failed(Step::PivotRoot))?;
    umount2(c".", MntFlags::MNT_DETACH).map_err(failed(Step::DetachOldRoot))?;
    chdir(c"/").map_err(failed(Step::DetachOldRoot))
}

/// The script starts in its session folder, so relative paths land there.
fn enter_session(plan: &Plan) -> StepResult {
    chdir(plan.session_abs.as_c_str()).map_err(failed(Step::EnterSession))
}

/// The host's name is not leaked to the script (the UTS namespace is private anyway).
fn set_hostname(plan: &Plan) -> StepResult {
    sethostname(OsStr::from_bytes(&plan.hostname)).map_err(failed(Step::SetHostname))
}

/// Gives up every privilege: the runtime runs as the worker uid/gid (never 0; root is
/// not even mapped), with no capabilities in any set, a bounding set that cannot give
/// any back, no_new_privs so no exec can gain privileges, and SIGKILL if the spawner
/// dies.
pub(crate) fn become_worker(plan: &Plan) -> StepResult {
    sys::setresgid(plan.gid).map_err(failed(Step::SetGid))?;
    sys::setresuid(plan.uid).map_err(failed(Step::SetUid))?;
    // Needs CAP_SETPCAP, so it comes before the capability sets are emptied.
    sys::drop_bounding_set().map_err(failed(Step::DropBoundingSet))?;
    sys::clear_ambient_caps().map_err(failed(Step::ClearAmbientCaps))?;
    sys::clear_caps().map_err(failed(Step::ClearCaps))?;
    nix::sys::prctl::set_no_new_privs().map_err(failed(Step::NoNewPrivs))?;
    // After the uid change, which clears the parent-death signal.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(failed(Step::ParentDeathSignal))
}

/// Landlock: beneath the runtime's read-only mounts the sandbox may only read and
/// execute, beneath the session folder and /tmp it may write, it may read /proc and its
/// /etc/passwd and /etc/group, use the five device nodes, and nothing else. This holds
/// even where the mount view would allow more (a writable /proc file, a directory of the
/// root tmpfs, a host path a future mount exposes by mistake). The rules on host inodes
/// are in the ruleset already; those on the sandbox's own mounts are added here, now
/// that they exist. Needs no_new_privs (set by [`become_worker`]).
pub(crate) fn restrict_filesystem(plan: &Plan) -> StepResult {
    let ruleset = plan.landlock.ruleset.as_fd();
    for (i, (path, access)) in plan.landlock.in_sandbox.iter().enumerate() {
        let fd = open(
            *path,
            OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(at(Step::AddLandlockRule, i))?;
        sys::landlock_add_path_rule(ruleset, fd.as_fd(), *access)
            .map_err(at(Step::AddLandlockRule, i))?;
    }
    sys::landlock_restrict_self(ruleset).map_err(failed(Step::RestrictLandlock))
}

/// The runtime holds exactly four fds: /dev/null as 0-2, the data socket as 3. Nothing
/// the spawner (or another thread of it) had open leaks in. The result pipe is kept,
/// close-on-exec, above 3 to report an exec failure; returns its new number.
pub(crate) fn install_fds(data: RawFd, result: RawFd) -> Result<RawFd, Failure> {
    let result = if result <= DATA_FD {
        sys::dup_above(result, DATA_FD + 1).map_err(at(Step::InstallFds, 0))?
    } else {
        result
    };
    if data == DATA_FD {
        sys::clear_cloexec(DATA_FD).map_err(at(Step::InstallFds, 1))?;
    } else {
        sys::dup2(data, DATA_FD).map_err(at(Step::InstallFds, 1))?;
    }
    let null = open(
        c"/dev/null",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(at(Step::InstallFds, 2))?
    .into_raw_fd();
    for fd in 0..DATA_FD {
        if fd == null {
            sys::clear_cloexec(fd).map_err(at(Step::InstallFds, 2))?;
        } else {
            sys::dup2(null, fd).map_err(at(Step::InstallFds, 2))?;
        }
    }
    // `result` > 3, and fds are non-negative, so these casts are exact.
    let first = (DATA_FD + 1) as u32;
    let result_u = result as u32;
    if result_u > first {
        sys::close_range(first, result_u - 1).map_err(at(Step::InstallFds, 3))?;
    }
    sys::close_range(result_u + 1, u32::MAX).map_err(at(Step::InstallFds, 3))?;
    Ok(result)
}

/// Resource limits the runtime cannot raise: no core dumps, bounded open files, file
/// size and CPU time (see `policy::RLIMITS`).
pub(crate) fn set_rlimits(plan: &Plan) -> StepResult {
    for (i, limit) in RLIMITS.iter().enumerate() {
        // CPU time comes from the request (the daemon's config); the rest is policy.
        let value = if limit.resource == libc::RLIMIT_CPU as libc::c_int {
            plan.cpu_seconds
        } else {
            limit.value
        };
        sys::set_rlimit(limit.resource, value).map_err(at(Step::SetRlimit, i))?;
    }
    Ok(())
}

/// The seccomp filter, last before exec so the runtime and everything it starts inherit
/// it: namespaces, mounts, ptrace, io_uring, bpf, keyrings, module loading and non-Unix
/// sockets are refused (see `policy::DENIED_SYSCALLS`). Needs no_new_privs (set by
/// [`become_worker`]).
pub(crate) fn apply_seccomp(plan: &Plan) -> StepResult {
    for (i, (_, program)) in plan.seccomp.programs.iter().enumerate() {
        sys::seccomp_set_filter(program).map_err(at(Step::ApplySeccomp, i))?;
    }
    Ok(())
}

/// Replaces this process with the runtime, with exactly the request's environment:
/// nothing of the daemon's environment (paths, credentials) is passed on. Returns only
/// on failure.
pub(crate) fn exec_runtime(plan: &Plan) -> Failure {
    failed(Step::Exec)(sys::execve(&plan.program, &plan.argv_ptrs, &plan.env_ptrs))
}

fn mkdir(path: &CStr) -> Result<(), Errno> {
    match mkdirat(AT_FDCWD, path, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

fn create_parents(t: &Target) -> Result<(), Errno> {
    t.parents.iter().try_for_each(|p| mkdir(p))
}

/// An empty directory or file to mount on; an existing one (inside an earlier
/// read-only mount) is used as it is.
fn create_mountpoint(t: &Target, is_dir: bool) -> Result<(), Errno> {
    create_parents(t)?;
    if is_dir {
        mkdir(&t.rel)
    } else {
        create_file(&t.rel)
    }
}

fn create_file(path: &CStr) -> Result<(), Errno> {
    openat(
        AT_FDCWD,
        path,
        OFlag::O_CREAT | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o444),
    )
    .map(drop)
}

fn write_new_file(path: &CStr, mut contents: &[u8]) -> Result<(), Errno> {
    let fd = openat(
        AT_FDCWD,
        path,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(ETC_FILE_MODE),
    )?;
    while !contents.is_empty() {
        match write(&fd, contents) {
            Ok(n) => contents = &contents[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_protocol::spawner::RoMount;

    fn request() -> SpawnRequest {
        SpawnRequest {
            call_id: 1,
            uid: 61000,
            gid: 61000,
            root_mountpoint: "/run/airlock/root".into(),
            session_dir: "/var/lib/airlock/s".into(),
            session_target: "/session".into(),
            ro_mounts: vec![RoMount {
                host: "/usr".into(),
                target: "/usr".into(),
            }],
            symlinks: vec![("/bin".into(), "usr/bin".into())],
            argv: vec!["/nonexistent".into()],
            env: vec![],
            hostname: "airlock".into(),
            tmp_size_bytes: 1 << 20,
            cgroup: None,
            cpu_rlimit_seconds: 0,
            warm: None,
        }
    }

    fn message(step: Step, index: u32, errno: Errno) -> String {
        let bytes = Failure { step, index, errno }.encode();
        Failure::decode(&bytes, &request()).to_string()
    }

    #[test]
    fn every_step_code_round_trips() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(*step as u32, i as u32 + 1, "{step:?} out of order in ALL");
            assert_eq!(Step::from_code(*step as u32), Some(*step));
        }
        assert_eq!(Step::from_code(0), None);
    }

    #[test]
    fn failures_name_the_step_the_path_and_the_errno() {
        assert_eq!(
            message(Step::MountProc, 0, Errno::EPERM),
            "mount proc on /proc: EPERM: Operation not permitted"
        );
        assert_eq!(
            message(Step::Exec, 0, Errno::ENOENT),
            "execve /nonexistent: ENOENT: No such file or directory"
        );
        assert_eq!(
            message(Step::AttachRoMount, 0, Errno::EINVAL),
            "bind /usr on /usr: EINVAL: Invalid argument"
        );
        assert_eq!(
            message(Step::CreateSymlink, 0, Errno::EEXIST),
            "symlink /bin -> usr/bin: EEXIST: File exists"
        );
        assert_eq!(
            message(Step::AttachDevNode, 3, Errno::EPERM),
            "bind /dev/random on /dev/random: EPERM: Operation not permitted"
        );
        assert_eq!(
            message(Step::CreateDevSymlink, 0, Errno::EROFS),
            "symlink /dev/fd -> /proc/self/fd: EROFS: Read-only file system"
        );
    }

    #[test]
    fn unknown_step_codes_are_reported_not_trusted() {
        let mut bytes = Failure {
            step: Step::Exec,
            index: 0,
            errno: Errno::EIO,
        }
        .encode();
        bytes[..4].copy_from_slice(&999u32.to_le_bytes());
        assert_eq!(
            Failure::decode(&bytes, &request()).to_string(),
            "sandbox setup failed at unknown step 999: EIO: I/O error"
        );
    }
}

//! Starting one sandbox: clone into fresh namespaces, map the worker identity, release
//! the child, and learn whether it reached `execve`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use airlock_protocol::spawner::{ExitStatus, SpawnRequest};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getgroups, pipe2, read, write};

use crate::plan::Plan;
use crate::setup::{self, ChildFds, Failure, FAILURE_LEN};
use crate::sys::{self, Cloned};
use crate::SandboxError;

/// A running sandbox: its init process (the runtime), pid 1 of its own pid namespace.
/// Killing it kills every process of the sandbox.
///
/// Dropping a `Sandbox` that was not waited for kills and reaps it, so neither a
/// process nor a zombie outlives its handle.
#[derive(Debug)]
pub struct Sandbox {
    /// The init's pid in the spawner's pid namespace.
    pub pid: i32,
    pub pidfd: OwnedFd,
    reaped: bool,
}

impl Sandbox {
    /// Sends SIGKILL to the sandbox's init, which takes the whole pid namespace with it.
    /// Killing a sandbox that already exited is not an error.
    pub fn kill(&self) -> Result<(), SandboxError> {
        match sys::pidfd_send_signal(self.pidfd.as_fd(), Signal::SIGKILL as i32) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(SandboxError::Kill {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits for the init to exit and reaps it. The kernel reports the init's exit only
    /// once every other process of its pid namespace is gone. Call it when the pidfd is
    /// readable to avoid blocking.
    pub fn wait(&mut self) -> Result<ExitStatus, SandboxError> {
        loop {
            match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED) {
                Ok(WaitStatus::Exited(_, code)) => {
                    self.reaped = true;
                    return Ok(ExitStatus::Code { code });
                }
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    self.reaped = true;
                    return Ok(ExitStatus::Signal {
                        signal: signal as i32,
                    });
                }
                // Stops and continues are not asked for (no WSTOPPED / WCONTINUED).
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(SandboxError::Wait {
                        pid: self.pid,
                        source,
                    })
                }
            }
        }
    }
}

impl Sandbox {
    /// Gives up the handle without killing the sandbox: the caller (the warm path's
    /// interpreter, through `ffi`) waits for it and kills it itself. If the pidfd
    /// cannot be duplicated (out of fds) the sandbox is killed and that is the error.
    pub fn into_parts(mut self) -> Result<(i32, OwnedFd), SandboxError> {
        let pidfd = self.pidfd.try_clone().map_err(SandboxError::DupPidfd)?;
        self.reaped = true;
        Ok((self.pid, pidfd))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

/// The namespaces every sandbox gets. Network: only a loopback interface, down. IPC:
/// no SysV objects shared with Postgres. UTS: its own hostname. Pid: the runtime is
/// pid 1 and sees only its descendants. Mount and user: see `setup`.
pub(crate) const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWUSER
    .union(CloneFlags::CLONE_NEWNS)
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS);

/// Starts the runtime of `req` in a new sandbox, `data_fd` as its fd 3. Returns once the
/// runtime has been exec'd, or with the step that failed (`"mount proc on /proc: EPERM:
/// …"`).
///
/// Everything the child applies is prepared here first: the Landlock ruleset (refused
/// with [`SandboxError::LandlockNotEnforced`] if this kernel would enforce less than the
/// policy; never silently weaker) and the compiled seccomp filters.
///
/// Meant to be called from a single-threaded process: the spawner (see
/// [`crate::run_spawner`]). The caller must be root in the initial user namespace and
/// must have no supplementary groups (checked: the sandbox would inherit them). The
/// sandbox gets SIGKILL when the *thread* that called `spawn` exits.
///
/// Between clone and exec the child does only async-signal-safe work on a plan built
/// here beforehand, so a multithreaded caller (a test harness) is sound; but the child
/// then briefly holds copies of every fd other threads opened, until it closes all but
/// fds 0-3 just before exec.
pub fn spawn(req: &SpawnRequest, data_fd: OwnedFd) -> Result<Sandbox, SandboxError> {
    match start(req, data_fd, ChildEnd::Exec)? {
        Forked::Parent(sandbox) => Ok(sandbox),
        // `ChildEnd::Exec` never returns in the child.
        Forked::InSandbox => unreachable!("the cold sandbox init execs or exits"),
    }
}

/// Which side of [`spawn_in_place`] the caller is on.
#[derive(Debug)]
pub enum Forked {
    /// The caller's process, with the new sandbox's handle.
    Parent(Sandbox),
    /// The new process, returned into the caller's code inside the finished sandbox:
    /// fresh namespaces, the worker identity, Landlock, rlimits and seccomp all in
    /// force, fds 0-2 /dev/null and the data socket as fd 3, every other fd closed.
    InSandbox,
}

/// The warm path: like [`spawn`], but the sandbox init does not exec. It runs every step
/// of [`spawn`] in the same order and then returns [`Forked::InSandbox`] into the
/// caller's code, a copy of the caller's memory (a pre-initialised interpreter) that
/// continues inside the sandbox. The parent gets [`Forked::Parent`] once every step is
/// in force; a failed step is an error in the parent and the child is gone.
///
/// Must be called from a single-threaded process (the clone copies no other thread,
/// and the child continues in code that may allocate). The child must not run the
/// destructors of objects it inherited that own fds: every fd but 0-3 is closed.
pub fn spawn_in_place(req: &SpawnRequest, data_fd: OwnedFd) -> Result<Forked, SandboxError> {
    start(req, data_fd, ChildEnd::Return)
}

/// How the sandbox init ends its setup.
#[derive(Clone, Copy)]
enum ChildEnd {
    Exec,
    Return,
}

fn start(req: &SpawnRequest, data_fd: OwnedFd, end: ChildEnd) -> Result<Forked, SandboxError> {
    let mut plan = Plan::new(req)?;
    refuse_supplementary_groups()?;
    let (release_read, release_write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|source| SandboxError::Pipe {
            what: "release",
            source,
        })?;
    let (result_read, result_write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|source| SandboxError::Pipe {
            what: "result",
            source,
        })?;

    let (pid, pidfd) =
        match sys::clone_sandbox_init(NAMESPACES.bits() as u64, plan.cgroup_dir.as_ref())
            .map_err(SandboxError::Clone)?
        {
            Cloned::Child => {
                let fds = ChildFds {
                    data: data_fd.as_fd(),
                    release_read: release_read.as_fd(),
                    release_write: release_write.as_raw_fd(),
                    result_read: result_read.as_raw_fd(),
                    result_write: result_write.as_fd(),
                };
                match end {
                    ChildEnd::Exec => setup::child_main(&mut plan, fds),
                    ChildEnd::Return => {
                        setup::child_in_place(&mut plan, fds);
                        // Their fds are closed already (install_fds): running the
                        // destructors would close numbers that may be reused.
                        std::mem::forget((
                            plan,
                            data_fd,
                            release_read,
                            release_write,
                            result_read,
                            result_write,
                        ));
                        return Ok(Forked::InSandbox);
                    }
                }
            }
            Cloned::Parent { pid, pidfd } => (pid, pidfd),
        };
    // The parent's copies of the child's ends: the result pipe must see EOF when the
    // child execs, and the data socket belongs to the sandbox now.
    drop((data_fd, release_read, result_write));
    let mut sandbox = Sandbox {
        pid,
        pidfd,
        reaped: false,
    };
    // On any error below, dropping `sandbox` kills and reaps the child.
    write_id_maps(pid, req.uid, req.gid)?;
    release(&release_write)?;
    drop(release_write);
    match read_result(&result_read)? {
        None => Ok(Forked::Parent(sandbox)),
        Some(bytes) => {
            // The child _exits right after reporting; reap it before answering.
            let _ = sandbox.wait();
            Err(Failure::decode(&bytes, req))
        }
    }
}

/// A sandbox would keep the caller's supplementary groups (setgroups is denied inside),
/// and root's groups open files no worker should read.
fn refuse_supplementary_groups() -> Result<(), SandboxError> {
    let groups = getgroups().map_err(SandboxError::GetGroups)?;
    if groups.is_empty() {
        return Ok(());
    }
    Err(SandboxError::SupplementaryGroups {
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    })
}

/// Maps only the worker identity into the sandbox's user namespace: uid 0 inside does
/// not exist, so nothing there can act as root, and host root's files appear as
/// `nobody`. `setgroups` is denied first, so the sandbox can never drop a group to get
/// past a negative group permission.
fn write_id_maps(pid: i32, uid: u32, gid: u32) -> Result<(), SandboxError> {
    for (file, contents) in [
        ("setgroups", "deny".to_string()),
        ("uid_map", format!("{uid} {uid} 1\n")),
        ("gid_map", format!("{gid} {gid} 1\n")),
    ] {
        std::fs::write(format!("/proc/{pid}/{file}"), contents)
            .map_err(|source| SandboxError::IdMap { pid, file, source })?;
    }
    Ok(())
}

fn release(release_write: &OwnedFd) -> Result<(), SandboxError> {
    loop {
        match write(release_write, &[1]) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::Release(e)),
        }
    }
}

/// EOF with nothing read: the child exec'd (the pipe is close-on-exec). A full record:
/// the step that failed.
fn read_result(result_read: &OwnedFd) -> Result<Option<[u8; FAILURE_LEN]>, SandboxError> {
    let mut buf = [0u8; FAILURE_LEN];
    let mut len = 0;
    loop {
        match read(result_read, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == FAILURE_LEN {
                    break;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::SetupResult(e)),
        }
    }
    match len {
        0 => Ok(None),
        FAILURE_LEN => Ok(Some(buf)),
        len => Err(SandboxError::MalformedResult { len }),
    }
}

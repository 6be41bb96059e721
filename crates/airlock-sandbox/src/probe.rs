//! Which isolation layers this kernel fully enforces, for `airlockd --check` and for a
//! daemon that must refuse to start without them.
//!
//! Each layer is tried for real, not inferred from a version number: a throwaway child
//! is cloned into the sandbox's namespaces, and a throwaway thread sets no_new_privs,
//! restricts itself with the sandbox's Landlock ruleset and installs its seccomp filter,
//! then checks that each answers as the sandbox relies on. All three are attributes of
//! the calling thread only, so they end with that thread; the rest of the process is
//! untouched. Needs root, like [`crate::spawn`].

use std::fmt;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::landlock_rules;
use crate::policy::LANDLOCK_ABI;
use crate::seccomp;
use crate::spawn::NAMESPACES;
use crate::sys::{self, Cloned};

/// One isolation layer of the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Fresh user, mount, pid, network, IPC and UTS namespaces per sandbox.
    UserNamespaces,
    /// No exec can gain privileges (setuid bits, file capabilities).
    NoNewPrivs,
    /// The syscall denylist.
    Seccomp,
    /// The filesystem access policy, at the ABI the policy needs.
    Landlock,
}

/// Whether this kernel fully enforces one layer, and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStatus {
    pub layer: Layer,
    /// True only if the layer works exactly as the sandbox relies on.
    pub enforced: bool,
    /// What the check found, e.g. "kernel ABI 7, the policy needs 6".
    pub detail: String,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::UserNamespaces => "user namespaces",
            Layer::NoNewPrivs => "no_new_privs",
            Layer::Seccomp => "seccomp filter",
            Layer::Landlock => "landlock",
        })
    }
}

impl fmt::Display for LayerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.enforced {
            "enforced"
        } else {
            "NOT ENFORCED"
        };
        write!(f, "{}: {state} ({})", self.layer, self.detail)
    }
}

/// Checks every layer on this kernel, in the order the sandbox applies them.
pub fn probe() -> Vec<LayerStatus> {
    let mut out = vec![probe_namespaces()];
    // The thread only runs the checks below and returns their results; a panic in it
    // would be a bug in this module.
    let threaded = std::thread::spawn(probe_in_thread)
        .join()
        .unwrap_or_else(|_| {
            [Layer::NoNewPrivs, Layer::Landlock, Layer::Seccomp]
                .map(|layer| LayerStatus {
                    layer,
                    enforced: false,
                    detail: "the probe thread panicked".into(),
                })
                .to_vec()
        });
    out.extend(threaded);
    out
}

/// Clones a child into the sandbox's namespaces; it exits at once.
fn probe_namespaces() -> LayerStatus {
    let status = |enforced, detail: String| LayerStatus {
        layer: Layer::UserNamespaces,
        enforced,
        detail,
    };
    let pidfd = match sys::clone_sandbox_init(NAMESPACES.bits() as u64, None) {
        Ok(Cloned::Child) => sys::exit_now(0),
        Ok(Cloned::Parent { pidfd, .. }) => pidfd,
        Err(e) => return status(false, format!("clone into new namespaces: {e}")),
    };
    loop {
        match waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED) {
            Ok(WaitStatus::Exited(_, 0)) => {
                return status(
                    true,
                    "clone into new user, mount, pid, network, IPC and UTS namespaces".into(),
                )
            }
            Ok(other) => return status(false, format!("the cloned child ended as {other:?}")),
            Err(Errno::EINTR) => continue,
            Err(e) => return status(false, format!("wait for the cloned child: {e}")),
        }
    }
}

/// no_new_privs, then Landlock, then seccomp, on this thread only.
fn probe_in_thread() -> Vec<LayerStatus> {
    let nnp = probe_no_new_privs();
    // Landlock and seccomp need no_new_privs (the thread holds no CAP_SYS_ADMIN for them
    // to rely on otherwise).
    if !nnp.enforced {
        let skipped = |layer| LayerStatus {
            layer,
            enforced: false,
            detail: "not tried: needs no_new_privs".into(),
        };
        return vec![nnp, skipped(Layer::Landlock), skipped(Layer::Seccomp)];
    }
    vec![nnp, probe_landlock(), probe_seccomp()]
}

fn probe_no_new_privs() -> LayerStatus {
    let (enforced, detail) = match nix::sys::prctl::set_no_new_privs()
        .and_then(|()| nix::sys::prctl::get_no_new_privs())
    {
        Ok(true) => (true, "PR_SET_NO_NEW_PRIVS holds".to_string()),
        Ok(false) => (false, "PR_GET_NO_NEW_PRIVS reads 0 after setting it".into()),
        Err(e) => (false, format!("prctl: {e}")),
    };
    LayerStatus {
        layer: Layer::NoNewPrivs,
        enforced,
        detail,
    }
}

/// Restricts the thread with the sandbox's ruleset (host rules: the device nodes only),
/// then checks that /dev/null opens and / does not.
fn probe_landlock() -> LayerStatus {
    let status = |enforced, detail: String| LayerStatus {
        layer: Layer::Landlock,
        enforced,
        detail,
    };
    let need = LANDLOCK_ABI as i32;
    let abi = match landlock_rules::kernel_abi() {
        Ok(abi) => abi,
        Err(e) => return status(false, e.to_string()),
    };
    let found = format!("kernel ABI {abi}, the policy needs {need}");
    let plan = match landlock_rules::prepare(&[]) {
        Ok(plan) => plan,
        Err(e) => return status(false, format!("{found}; {e}")),
    };
    if let Err(e) = sys::landlock_restrict_self(plan.ruleset.as_fd()) {
        return status(false, format!("{found}; landlock_restrict_self: {e}"));
    }
    let allowed = open(
        c"/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    let denied = open(
        c"/",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    match (allowed, denied) {
        (Ok(_), Err(Errno::EACCES)) => status(true, found),
        (allowed, denied) => status(
            false,
            format!(
                "{found}; restricted, /dev/null opened with {:?} and / with {:?} (want Ok, EACCES)",
                allowed.map(drop),
                denied.map(drop)
            ),
        ),
    }
}

/// Installs the sandbox's filters, then checks that inet sockets are refused with EPERM,
/// clone3 with ENOSYS, and Unix sockets still work.
fn probe_seccomp() -> LayerStatus {
    let status = |enforced, detail: String| LayerStatus {
        layer: Layer::Seccomp,
        enforced,
        detail,
    };
    let compiled = match seccomp::compile() {
        Ok(c) => c,
        Err(e) => return status(false, e.to_string()),
    };
    for (errno, program) in &compiled.programs {
        if let Err(e) = sys::seccomp_set_filter(program) {
            let errno = Errno::from_raw(*errno);
            return status(false, format!("install the filter returning {errno}: {e}"));
        }
    }
    let sock = |family| socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None);
    let inet = sock(AddressFamily::Inet).map(drop);
    let unix = sock(AddressFamily::Unix).map(drop);
    let clone3 = sys::clone3_invalid();
    let detail = format!(
        "socket(AF_INET): {inet:?}, socket(AF_UNIX): {unix:?}, clone3: {clone3} \
         (want EPERM, Ok, ENOSYS)"
    );
    let enforced = inet == Err(Errno::EPERM) && unix.is_ok() && clone3 == Errno::ENOSYS;
    status(enforced, detail)
}

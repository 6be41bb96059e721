//! The Landlock ruleset of one sandbox, built in the parent before the clone.
//!
//! Landlock rules are bound to inodes, not to path strings, so the host sources the
//! sandbox mounts (the runtime's read-only trees, the device nodes, the session folder)
//! are opened here with `O_PATH` and added with the reference crate, which also checks
//! that the kernel handles every access right of [`LANDLOCK_ABI`] (hard requirement: a
//! kernel with less is an error, never a quietly weaker sandbox). The few paths that only
//! exist inside the sandbox (its /tmp and /proc, its /etc/passwd and /etc/group) get
//! their rules in the child, through the same ruleset fd, once it has mounted them: an
//! `open(O_PATH)` and a raw `landlock_add_rule` each, then `landlock_restrict_self`, all
//! non-allocating (`sys`). The ruleset is a kernel object shared by parent and child, so
//! it is made anew for every sandbox.

use std::ffi::{CStr, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, Scope,
};
use nix::errno::Errno;

use crate::policy::{FsAccess, DEV_NODES, LANDLOCK_ABI, LANDLOCK_IN_SANDBOX};
use crate::{sys, SandboxError};

/// What the child needs to finish and apply the ruleset.
#[derive(Debug)]
pub(crate) struct LandlockPlan {
    /// Holds the rules on host inodes; the child adds the in-sandbox ones.
    pub ruleset: OwnedFd,
    /// `(absolute path inside the sandbox, LANDLOCK_ACCESS_FS_* bits)`.
    pub in_sandbox: Vec<(&'static CStr, u64)>,
}

/// The rights [`FsAccess`] stands for, on a directory or (fewer) on a file.
pub(crate) fn access(access: FsAccess, is_dir: bool) -> BitFlags<AccessFs> {
    let rights = match access {
        FsAccess::ReadExec => AccessFs::from_read(LANDLOCK_ABI),
        FsAccess::Read => AccessFs::ReadFile | AccessFs::ReadDir,
        FsAccess::Device => {
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev
        }
        FsAccess::ReadWrite => AccessFs::from_all(LANDLOCK_ABI),
    };
    if is_dir {
        rights
    } else {
        rights & AccessFs::from_file(LANDLOCK_ABI)
    }
}

/// The kernel's Landlock ABI if it enforces every right of the policy, else why not.
pub(crate) fn kernel_abi() -> Result<i32, SandboxError> {
    let need = LANDLOCK_ABI as i32;
    let missing = |what: String| SandboxError::LandlockNotEnforced { what };
    match sys::landlock_abi() {
        Ok(abi) if abi >= need => Ok(abi),
        Ok(abi) => Err(missing(format!(
            "the kernel's Landlock ABI is {abi}, the sandbox's policy needs ABI {need} (Linux 6.12 or later)"
        ))),
        Err(Errno::EOPNOTSUPP) => Err(missing(
            "Landlock is built into the kernel but not enabled (add `landlock` to the `lsm=` boot parameter)"
                .into(),
        )),
        Err(Errno::ENOSYS) => Err(missing(
            "the kernel is built without Landlock (CONFIG_SECURITY_LANDLOCK)".into(),
        )),
        Err(e) => Err(missing(format!("landlock_create_ruleset: {e}"))),
    }
}

/// One host inode of the ruleset: `(host path, is a directory, access)`.
pub(crate) type HostRule<'a> = (&'a CStr, bool, FsAccess);

/// Creates the ruleset handling every access right of [`LANDLOCK_ABI`] and adds a rule
/// for each of `host_rules` and each device node.
pub(crate) fn prepare(host_rules: &[HostRule<'_>]) -> Result<LandlockPlan, SandboxError> {
    kernel_abi()?;
    let ruleset_err = |source| SandboxError::LandlockRuleset { source };
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(ruleset_err)?
        // No TCP port may be bound or connected to (the socket filter already refuses
        // inet sockets; this holds even if it were loosened).
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))
        .map_err(ruleset_err)?
        // No signal to, and no abstract Unix socket of, a process outside the sandbox.
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(ruleset_err)?
        .create()
        .map_err(ruleset_err)?;
    let dev = DEV_NODES
        .iter()
        .map(|(host, _)| (*host, false, FsAccess::Device));
    for (path, is_dir, rights) in host_rules.iter().copied().chain(dev) {
        let path_buf = || PathBuf::from(OsStr::from_bytes(path.to_bytes()));
        let fd = PathFd::new(OsStr::from_bytes(path.to_bytes())).map_err(|source| {
            SandboxError::LandlockOpen {
                path: path_buf(),
                source,
            }
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access(rights, is_dir)))
            .map_err(|source| SandboxError::LandlockRule {
                path: path_buf(),
                source,
            })?;
    }
    let ruleset: Option<OwnedFd> = ruleset.into();
    let ruleset = ruleset.ok_or_else(|| SandboxError::LandlockNotEnforced {
        what: "the Landlock crate created no ruleset".into(),
    })?;
    let in_sandbox = LANDLOCK_IN_SANDBOX
        .iter()
        .map(|(path, is_dir, rights)| (*path, access(*rights, *is_dir).bits()))
        .collect();
    Ok(LandlockPlan {
        ruleset,
        in_sandbox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_get_only_file_rights_and_devices_no_exec() {
        let file = access(FsAccess::ReadWrite, false);
        assert_eq!(file, AccessFs::from_file(LANDLOCK_ABI));
        assert!(!file.contains(AccessFs::ReadDir));
        assert_eq!(
            access(FsAccess::ReadExec, false),
            AccessFs::ReadFile | AccessFs::Execute
        );
        assert_eq!(
            access(FsAccess::ReadExec, true),
            AccessFs::ReadFile | AccessFs::Execute | AccessFs::ReadDir
        );
        let dev = access(FsAccess::Device, false);
        assert!(!dev.contains(AccessFs::Execute));
        assert!(dev.contains(AccessFs::WriteFile | AccessFs::Truncate));
        assert_eq!(access(FsAccess::Read, false), AccessFs::ReadFile);
    }

    #[test]
    fn in_sandbox_rules_are_tmp_rw_proc_and_etc_read_only() {
        let plan = prepare(&[(c"/usr", true, FsAccess::ReadExec)]).unwrap();
        let rw = AccessFs::from_all(LANDLOCK_ABI).bits();
        let read_dir = (AccessFs::ReadFile | AccessFs::ReadDir).bits();
        let read_file = BitFlags::from(AccessFs::ReadFile).bits();
        assert_eq!(
            plan.in_sandbox,
            [
                (c"/tmp", rw),
                (c"/proc", read_dir),
                (c"/etc/passwd", read_file),
                (c"/etc/group", read_file),
            ]
        );
    }

    #[test]
    fn a_missing_host_path_is_named() {
        let e = prepare(&[(c"/nonexistent/airlock", true, FsAccess::ReadExec)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("open /nonexistent/airlock for its landlock rule: "),
            "{e}"
        );
    }

    #[test]
    fn this_kernel_enforces_the_policy_abi() {
        let abi = kernel_abi().expect("the sandbox tests need Landlock ABI 6 or later");
        assert!(abi >= LANDLOCK_ABI as i32);
    }
}

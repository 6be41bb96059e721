//! The seccomp denylist of [`crate::policy::DENIED_SYSCALLS`], compiled to BPF by
//! seccompiler before the clone. The child only hands the finished programs to the
//! kernel (`sys::seccomp_set_filter`), which allocates nothing.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::policy::{DeniedSyscall, When, DENIED_SYSCALLS};
use crate::SandboxError;

/// The compiled policy: one program per distinct errno of the table (a seccompiler filter
/// has one match action), to be installed in order. Every syscall is denied by at most
/// one of them, so the kernel's rule for stacked filters (the strictest action wins) never
/// has to choose between two errnos.
#[derive(Debug)]
pub(crate) struct Programs {
    pub programs: Vec<(i32, BpfProgram)>,
}

/// The distinct errnos of the table, ascending: the order of [`Programs`].
pub(crate) fn errnos() -> Vec<i32> {
    let mut errnos: Vec<i32> = DENIED_SYSCALLS.iter().map(|d| d.errno).collect();
    errnos.sort_unstable();
    errnos.dedup();
    errnos
}

/// Compiles the denylist for the architecture this crate was built for.
pub(crate) fn compile() -> Result<Programs, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::Seccomp)?;
    let errnos = errnos();
    let mut programs = Vec::with_capacity(errnos.len());
    for errno in errnos {
        let mut rules = BTreeMap::new();
        for denied in DENIED_SYSCALLS.iter().filter(|d| d.errno == errno) {
            let chain = rules_for(denied.when)?;
            for nr in numbers(denied) {
                rules.insert(nr, chain.clone());
            }
        }
        let filter = SeccompFilter::new(
            rules,
            // Default allow: see DENIED_SYSCALLS for why this is a denylist.
            SeccompAction::Allow,
            // Errnos are small positive constants.
            SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(SandboxError::Seccomp)?;
        programs.push((
            errno,
            BpfProgram::try_from(filter).map_err(SandboxError::Seccomp)?,
        ));
    }
    Ok(Programs { programs })
}

/// The rule chain of one entry; an empty chain matches every call.
fn rules_for(when: When) -> Result<Vec<SeccompRule>, SandboxError> {
    let rule = |arg, len, op, value| {
        SeccompCondition::new(arg, len, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(SandboxError::Seccomp)
    };
    match when {
        When::Always => Ok(Vec::new()),
        When::ArgIsNot { arg, allowed } => Ok(vec![rule(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            allowed,
        )?]),
        // One rule per bit: rules of a chain are alternatives, conditions of a rule all
        // have to hold, and "any bit of the mask" is an alternative of single bits.
        When::ArgHasAnyOf { arg, mask } => (0..64)
            .map(|b| 1u64 << b)
            .filter(|bit| mask & bit != 0)
            .map(|bit| {
                rule(
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(bit),
                    bit,
                )
            })
            .collect(),
    }
}

/// Every number under which the filter's architecture reaches this syscall.
fn numbers(denied: &DeniedSyscall) -> Vec<i64> {
    #[allow(unused_mut)] // Only x86_64 adds numbers.
    let mut out = vec![denied.nr];
    #[cfg(target_arch = "x86_64")]
    {
        use crate::policy::{X32_ONLY_NUMBERS, X32_SYSCALL_BIT};
        out.push(denied.nr | X32_SYSCALL_BIT);
        out.extend(
            X32_ONLY_NUMBERS
                .iter()
                .filter(|(name, _)| *name == denied.name)
                .map(|(_, nr)| nr | X32_SYSCALL_BIT),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every syscall issue 3 names, spelled as the kernel does.
    const ISSUE_3: [&str; 34] = [
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "clone",
        "clone3",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "keyctl",
        "add_key",
        "request_key",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "quotactl",
        "open_by_handle_at",
        "name_to_handle_at",
        "socket",
        "socketpair",
    ];

    fn entry(name: &str) -> &'static DeniedSyscall {
        DENIED_SYSCALLS
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the seccomp policy"))
    }

    #[test]
    fn policy_denies_every_syscall_the_issue_names() {
        for name in ISSUE_3 {
            let d = entry(name);
            assert!(!d.reason.is_empty(), "{name} has no reason");
        }
    }

    #[test]
    fn policy_entries_are_unique_with_reasons_and_eperm_except_clone3() {
        for (i, d) in DENIED_SYSCALLS.iter().enumerate() {
            assert!(!d.reason.is_empty(), "{} has no reason", d.name);
            let want = if d.name == "clone3" {
                libc::ENOSYS
            } else {
                libc::EPERM
            };
            assert_eq!(d.errno, want, "{}", d.name);
            for other in &DENIED_SYSCALLS[i + 1..] {
                assert!(d.name != other.name && d.nr != other.nr, "{} twice", d.name);
            }
        }
    }

    #[test]
    fn namespace_and_socket_conditions_are_the_documented_ones() {
        let clone = entry("clone");
        assert_eq!(
            clone.when,
            When::ArgHasAnyOf {
                arg: 0,
                mask: crate::policy::NAMESPACE_FLAGS
            }
        );
        for flag in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWTIME,
        ] {
            assert_ne!(crate::policy::NAMESPACE_FLAGS & flag as u64, 0);
        }
        // fork's flags: SIGCHLD plus thread-bookkeeping flags, no namespace.
        let fork_flags =
            (libc::SIGCHLD | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(crate::policy::NAMESPACE_FLAGS & fork_flags, 0);
        for name in ["socket", "socketpair"] {
            assert_eq!(
                entry(name).when,
                When::ArgIsNot {
                    arg: 0,
                    allowed: libc::AF_UNIX as u64
                }
            );
        }
        let bits = rules_for(clone.when).unwrap().len();
        assert_eq!(bits, 8, "one rule per namespace flag");
    }

    #[test]
    fn compiles_one_program_per_errno_within_the_kernel_limit() {
        let compiled = compile().unwrap();
        let errnos: Vec<i32> = compiled.programs.iter().map(|(e, _)| *e).collect();
        assert_eq!(errnos, [libc::EPERM, libc::ENOSYS]);
        for (_, program) in &compiled.programs {
            assert!(
                !program.is_empty() && program.len() < 4096,
                "{}",
                program.len()
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_denied_too() {
        assert_eq!(
            numbers(entry("ptrace")),
            [
                libc::SYS_ptrace,
                libc::SYS_ptrace | 0x4000_0000,
                521 | 0x4000_0000
            ]
        );
        assert_eq!(
            numbers(entry("mount")),
            [libc::SYS_mount, libc::SYS_mount | 0x4000_0000]
        );
    }
}

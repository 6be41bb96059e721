//! A `SpawnRequest` checked and turned into everything the sandbox child needs, before
//! the clone: every path a C string relative to the new root, every parent directory
//! listed, the exec arrays built, a slot ready for every mount tree. The child only reads
//! the plan and fills those slots, so it never allocates.

use std::ffi::{c_char, CString};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use airlock_protocol::spawner::{CgroupJoin, SpawnRequest};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::landlock_rules::{self, LandlockPlan};
use crate::policy::{self, FsAccess, DEV_NODES, ENV_ALLOWED, ENV_ALLOWED_PREFIXES};
use crate::seccomp;
use crate::SandboxError;

/// A path inside the sandbox, relative to its root, with its parents in creation order.
#[derive(Debug)]
pub(crate) struct Target {
    /// E.g. `usr/lib` for `/usr/lib`.
    pub rel: CString,
    /// E.g. `[usr]`.
    pub parents: Vec<CString>,
}

#[derive(Debug)]
pub(crate) struct RoMountPlan {
    pub host: CString,
    pub target: Target,
    /// Whether the source is a directory (else the mountpoint is an empty file).
    pub is_dir: bool,
}

#[derive(Debug)]
pub(crate) struct SymlinkPlan {
    pub link: Target,
    pub points_to: CString,
}

/// Detached mount trees, cloned while the child still resolves host paths as host root
/// and attached once the skeleton exists. Slots are allocated here, filled in the child.
#[derive(Debug, Default)]
pub(crate) struct Trees {
    pub ro: Vec<Option<OwnedFd>>,
    pub dev: [Option<OwnedFd>; DEV_NODES.len()],
    pub session: Option<OwnedFd>,
}

#[derive(Debug)]
pub(crate) struct Plan {
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_CPU for each process of the sandbox.
    pub cpu_seconds: u64,
    /// The host directory the root tmpfs is mounted on.
    pub root: CString,
    pub root_tmpfs_opts: CString,
    pub ro_mounts: Vec<RoMountPlan>,
    pub symlinks: Vec<SymlinkPlan>,
    pub session_source: CString,
    pub session_target: Target,
    /// The session target as an absolute path, for the chdir after pivot_root.
    pub session_abs: CString,
    pub tmp_opts: CString,
    pub passwd: Vec<u8>,
    pub group: Vec<u8>,
    pub hostname: Vec<u8>,
    pub program: CString,
    pub trees: Trees,
    /// The Landlock ruleset with its rules on host inodes, made for this sandbox only.
    pub landlock: LandlockPlan,
    /// The seccomp filters, compiled.
    pub seccomp: seccomp::Programs,
    /// cgroup v1: each controller's `tasks` file of the call's group, open for writing,
    /// for the child to move itself (see [`CgroupJoin`]).
    pub cgroup_tasks: Vec<OwnedFd>,
    /// cgroup v2: the call's group directory, for `CLONE_INTO_CGROUP`.
    pub cgroup_dir: Option<OwnedFd>,
    /// Null-terminated pointer arrays into `_argv` and `_env`, whose heap buffers do not
    /// move when the Plan moves.
    pub argv_ptrs: Vec<*const c_char>,
    pub env_ptrs: Vec<*const c_char>,
    _argv: Vec<CString>,
    _env: Vec<CString>,
}

impl Plan {
    pub(crate) fn new(req: &SpawnRequest) -> Result<Self, SandboxError> {
        if req.uid == 0 || req.gid == 0 {
            return Err(SandboxError::RootIdentity {
                uid: req.uid,
                gid: req.gid,
            });
        }
        let root = absolute(&req.root_mountpoint, "root_mountpoint")?;
        let root = cstring(root.as_os_str().as_encoded_bytes(), "root_mountpoint")?;

        let mut ro_mounts = Vec::with_capacity(req.ro_mounts.len());
        for m in &req.ro_mounts {
            let host = absolute(&m.host, "ro_mounts.host")?;
            let meta = std::fs::metadata(&host).map_err(|source| SandboxError::StatSource {
                path: host.clone(),
                source,
            })?;
            ro_mounts.push(RoMountPlan {
                host: cstring(host.as_os_str().as_encoded_bytes(), "ro_mounts.host")?,
                target: target(&m.target, "ro_mounts.target")?,
                is_dir: meta.is_dir(),
            });
        }

        let mut symlinks = Vec::with_capacity(req.symlinks.len());
        for (link, points_to) in &req.symlinks {
            symlinks.push(SymlinkPlan {
                link: target(link, "symlinks.link")?,
                points_to: cstring(points_to.as_os_str().as_encoded_bytes(), "symlinks.target")?,
            });
        }

        let session_source = absolute(&req.session_dir, "session_dir")?;
        let session_abs = absolute(&req.session_target, "session_target")?;
        let session_str = session_abs
            .to_str()
            .filter(|s| !s.contains([':', '\n']))
            .ok_or(SandboxError::BadString {
                field: "session_target",
            })?;
        let passwd = format!(
            "{name}:x:{uid}:{gid}:{name}:{session_str}:{shell}\n",
            name = policy::WORKER_NAME,
            uid = req.uid,
            gid = req.gid,
            shell = policy::WORKER_SHELL,
        );
        let group = format!("{}:x:{}:\n", policy::WORKER_NAME, req.gid);

        if req.hostname.is_empty() || req.hostname.len() > 64 {
            return Err(SandboxError::BadHostname {
                len: req.hostname.len(),
            });
        }
        let hostname = cstring(req.hostname.as_bytes(), "hostname")?.into_bytes();

        let Some(program) = req.argv.first() else {
            return Err(SandboxError::EmptyArgv);
        };
        let program = cstring(program.as_bytes(), "argv")?;
        let argv = req
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "argv"))
            .collect::<Result<Vec<_>, _>>()?;
        let env = environment(&req.env, session_str)?;
        let argv_ptrs = null_terminated(&argv);
        let env_ptrs = null_terminated(&env);

        let mut host_rules: Vec<landlock_rules::HostRule<'_>> = ro_mounts
            .iter()
            .map(|m| (m.host.as_c_str(), m.is_dir, FsAccess::ReadExec))
            .collect();
        let session_source = cstring(session_source.as_os_str().as_encoded_bytes(), "session_dir")?;
        host_rules.push((session_source.as_c_str(), true, FsAccess::ReadWrite));
        let landlock = landlock_rules::prepare(&host_rules)?;
        let seccomp = seccomp::compile()?;
        let (cgroup_tasks, cgroup_dir) = open_cgroup(req.cgroup.as_ref())?;

        let trees = Trees {
            ro: std::iter::repeat_with(|| None)
                .take(ro_mounts.len())
                .collect(),
            ..Trees::default()
        };

        Ok(Plan {
            uid: req.uid,
            gid: req.gid,
            cpu_seconds: if req.cpu_rlimit_seconds > 0 {
                req.cpu_rlimit_seconds
            } else {
                policy::CPU_SECONDS
            },
            root,
            root_tmpfs_opts: cstring(
                format!(
                    "{},uid={},gid={}",
                    policy::ROOT_TMPFS_OPTS,
                    req.uid,
                    req.gid
                )
                .as_bytes(),
                "root tmpfs options",
            )?,
            ro_mounts,
            symlinks,
            session_source,
            session_target: target(&req.session_target, "session_target")?,
            session_abs: cstring(session_str.as_bytes(), "session_target")?,
            tmp_opts: cstring(
                format!("size={},mode=1777", req.tmp_size_bytes).as_bytes(),
                "tmp options",
            )?,
            passwd: passwd.into_bytes(),
            group: group.into_bytes(),
            hostname,
            program,
            trees,
            cgroup_tasks,
            cgroup_dir,
            landlock,
            seccomp,
            argv_ptrs,
            env_ptrs,
            _argv: argv,
            _env: env,
        })
    }
}

/// The runtime's environment: the request's variables, each on the allowlist, and HOME
/// the session folder (added when the request leaves it out).
fn environment(vars: &[(String, String)], session: &str) -> Result<Vec<CString>, SandboxError> {
    let mut env = Vec::with_capacity(vars.len() + 1);
    let mut has_home = false;
    for (k, v) in vars {
        if k.is_empty() || k.contains('=') {
            return Err(SandboxError::BadString { field: "env" });
        }
        let allowed = ENV_ALLOWED.contains(&k.as_str())
            || ENV_ALLOWED_PREFIXES.iter().any(|p| k.starts_with(p));
        if !allowed {
            return Err(SandboxError::EnvNotAllowed { name: k.clone() });
        }
        if k == "HOME" {
            if v != session {
                return Err(SandboxError::EnvHome {
                    home: v.clone(),
                    session: session.into(),
                });
            }
            has_home = true;
        }
        env.push(cstring(format!("{k}={v}").as_bytes(), "env")?);
    }
    if !has_home {
        env.push(cstring(format!("HOME={session}").as_bytes(), "env")?);
    }
    Ok(env)
}

fn cstring(bytes: &[u8], field: &'static str) -> Result<CString, SandboxError> {
    CString::new(bytes).map_err(|_| SandboxError::BadString { field })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Opens what the child needs to enter the call's cgroup, as the spawner (root), before
/// the clone: the child itself may no longer open these files once in its namespaces,
/// and a cgroup file checks the credentials it was opened with.
fn open_cgroup(join: Option<&CgroupJoin>) -> Result<(Vec<OwnedFd>, Option<OwnedFd>), SandboxError> {
    let open = |path: &Path, flags: OFlag| {
        nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
            SandboxError::JoinCgroup {
                path: path.to_owned(),
                source: e.into(),
            }
        })
    };
    match join {
        None => Ok((Vec::new(), None)),
        Some(CgroupJoin::V1 { tasks }) => {
            let fds = tasks
                .iter()
                .map(|t| open(t, OFlag::O_WRONLY))
                .collect::<Result<_, _>>()?;
            Ok((fds, None))
        }
        Some(CgroupJoin::V2 { dir }) => Ok((
            Vec::new(),
            Some(open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?),
        )),
    }
}

/// An absolute path with no `..`, normalised (`.` and repeated `/` dropped).
fn absolute(path: &Path, field: &'static str) -> Result<PathBuf, SandboxError> {
    let bad = || SandboxError::NotAbsolute {
        field,
        path: path.to_owned(),
    };
    if !path.is_absolute() {
        return Err(bad());
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    Ok(out)
}

/// A path inside the sandbox other than `/` itself and outside the reserved mounts.
fn target(path: &Path, field: &'static str) -> Result<Target, SandboxError> {
    let abs = absolute(path, field)?;
    let rel = abs.strip_prefix("/").unwrap_or(&abs);
    let mut components = rel.components();
    let Some(first) = components.next() else {
        return Err(SandboxError::NotAbsolute {
            field,
            path: path.to_owned(),
        });
    };
    if let Some(reserved) = policy::RESERVED.iter().find(|r| first.as_os_str() == **r) {
        return Err(SandboxError::Reserved {
            field,
            path: path.to_owned(),
            reserved,
        });
    }
    let parents = rel
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|p| cstring(p.as_os_str().as_encoded_bytes(), field))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Target {
        rel: cstring(rel.as_os_str().as_encoded_bytes(), field)?,
        parents,
    })
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
            // An existing directory: the Landlock rule for it opens it.
            session_dir: std::env::temp_dir(),
            session_target: "/session".into(),
            ro_mounts: vec![RoMount {
                host: "/usr".into(),
                target: "/usr".into(),
            }],
            symlinks: vec![("/bin".into(), "usr/bin".into())],
            argv: vec!["/usr/bin/python3".into(), "-I".into()],
            env: vec![("LANG".into(), "C.UTF-8".into())],
            hostname: "airlock".into(),
            tmp_size_bytes: 1 << 20,
            cgroup: None,
            cpu_rlimit_seconds: 0,
            warm: None,
        }
    }

    #[test]
    fn builds_relative_targets_with_parents() {
        let t = target(Path::new("/usr//lib/./airlock/"), "t").unwrap();
        assert_eq!(t.rel.as_bytes(), b"usr/lib/airlock");
        let parents: Vec<_> = t.parents.iter().map(|p| p.as_bytes()).collect();
        assert_eq!(parents, [b"usr".as_slice(), b"usr/lib"]);
    }

    #[test]
    fn refuses_relative_dotdot_root_and_reserved_targets() {
        for (p, want) in [
            ("usr", "must be an absolute path"),
            ("/usr/../etc", "must be an absolute path"),
            ("/", "must be an absolute path"),
            ("/proc/self", "hidden by the sandbox's own proc"),
            ("/tmp", "hidden by the sandbox's own tmp"),
        ] {
            let e = target(Path::new(p), "ro_mounts.target").unwrap_err();
            assert!(e.to_string().contains(want), "{p}: {e}");
        }
    }

    #[test]
    fn refuses_root_identity() {
        let mut req = request();
        req.uid = 0;
        let e = Plan::new(&req).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid spawn request: refusing uid 0 / gid 61000; the runtime never runs as root"
        );
    }

    #[test]
    fn refuses_empty_argv_nul_bytes_and_bad_env() {
        let mut req = request();
        req.argv.clear();
        assert!(matches!(Plan::new(&req), Err(SandboxError::EmptyArgv)));
        let mut req = request();
        req.argv.push("a\0b".into());
        assert!(matches!(
            Plan::new(&req),
            Err(SandboxError::BadString { field: "argv" })
        ));
        let mut req = request();
        req.env.push(("A=B".into(), "c".into()));
        assert!(matches!(
            Plan::new(&req),
            Err(SandboxError::BadString { field: "env" })
        ));
        let mut req = request();
        req.session_target = "/a:b".into();
        assert!(matches!(
            Plan::new(&req),
            Err(SandboxError::BadString {
                field: "session_target"
            })
        ));
    }

    #[test]
    fn writes_one_passwd_and_group_entry_and_exec_arrays() {
        let plan = Plan::new(&request()).unwrap();
        assert_eq!(
            plan.passwd,
            b"airlock:x:61000:61000:airlock:/session:/usr/sbin/nologin\n"
        );
        assert_eq!(plan.group, b"airlock:x:61000:\n");
        assert_eq!(plan.argv_ptrs.len(), 3);
        assert!(plan.argv_ptrs[2].is_null());
        assert_eq!(plan.env_ptrs.len(), 3);
        assert!(plan.env_ptrs[2].is_null());
        assert_eq!(plan._env[0].as_bytes(), b"LANG=C.UTF-8");
        assert_eq!(plan._env[1].as_bytes(), b"HOME=/session");
        assert_eq!(plan.landlock.in_sandbox.len(), 4);
        assert_eq!(plan.seccomp.programs.len(), 2);
        assert_eq!(
            plan.root_tmpfs_opts.as_bytes(),
            b"size=16m,nr_inodes=4096,mode=0755,uid=61000,gid=61000"
        );
        assert_eq!(plan.trees.ro.len(), 1);
        assert!(plan.ro_mounts[0].is_dir);
    }

    #[test]
    fn environment_is_allowlisted_and_home_is_the_session_folder() {
        let mut req = request();
        req.env.push(("PGPASSWORD".into(), "secret".into()));
        let e = Plan::new(&req).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid spawn request: environment variable \"PGPASSWORD\" is not on the sandbox's allowlist"
        );
        let mut req = request();
        req.env.push(("LD_PRELOAD".into(), "/tmp/x.so".into()));
        assert!(
            matches!(Plan::new(&req), Err(SandboxError::EnvNotAllowed { name }) if name == "LD_PRELOAD")
        );
        let mut req = request();
        req.env.push(("HOME".into(), "/root".into()));
        assert_eq!(
            Plan::new(&req).unwrap_err().to_string(),
            "invalid spawn request: HOME is \"/root\", it must be the session folder \"/session\""
        );
        let mut req = request();
        req.env = vec![
            ("LC_ALL".into(), "C.UTF-8".into()),
            ("HOME".into(), "/session".into()),
        ];
        let plan = Plan::new(&req).unwrap();
        let env: Vec<_> = plan._env.iter().map(|e| e.as_bytes()).collect();
        assert_eq!(env, [b"LC_ALL=C.UTF-8".as_slice(), b"HOME=/session"]);
    }

    #[test]
    fn missing_ro_source_is_reported_with_its_path() {
        let mut req = request();
        req.ro_mounts[0].host = "/nonexistent/airlock".into();
        let e = Plan::new(&req).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("stat ro mount source /nonexistent/airlock: "),
            "{e}"
        );
    }
}

//! What each language's sandbox contains: the read-only mounts, the program, the
//! environment. This is the reviewed list of everything from the host a script can see.

use std::path::{Path, PathBuf};

use airlock_protocol::{
    control::Language,
    spawner::{RoMount, SpawnRequest},
};

use crate::config::{Config, Runtime};

/// Host files a runtime needs beside its own tree, each with the reason.
const HOST_FILES: &[(&str, &str)] = &[
    // The dynamic loader's cache: without it every library lookup walks the search path.
    ("/etc/ld.so.cache", "dynamic loader cache"),
    // Time zone of the host, so local times in scripts match the server's.
    ("/etc/localtime", "local time zone"),
];

/// Merged-/usr symlinks of Debian 12: these top-level names point into /usr.
const USR_SYMLINKS: &[(&str, &str)] = &[
    ("/bin", "usr/bin"),
    ("/sbin", "usr/sbin"),
    ("/lib", "usr/lib"),
    ("/lib64", "usr/lib64"),
];

/// Everything about one call the request needs.
pub struct CallSpec<'a> {
    pub call_id: u64,
    pub language: Language,
    pub runtime: &'a Runtime,
    pub uid: u32,
    pub gid: u32,
    pub session_dir: PathBuf,
    pub session_target: PathBuf,
}

/// Where the sandboxes mount their private root: an empty directory of the daemon's.
pub fn root_mountpoint(config: &Config) -> PathBuf {
    config.state_dir.join("root")
}

/// Builds the spawner request for one call.
pub fn spawn_request(config: &Config, call: CallSpec<'_>) -> SpawnRequest {
    let prefix = &call.runtime.prefix;
    let mut ro_mounts = vec![
        // The system's programs and shared libraries, including the interpreter.
        RoMount {
            host: "/usr".into(),
            target: "/usr".into(),
        },
        // The runtime's own environment (interpreter packages and the shim).
        RoMount {
            host: prefix.clone(),
            target: prefix.clone(),
        },
    ];
    for (path, _why) in HOST_FILES {
        if Path::new(path).exists() {
            ro_mounts.push(RoMount {
                host: path.into(),
                target: path.into(),
            });
        }
    }
    let symlinks = USR_SYMLINKS
        .iter()
        .map(|(l, t)| (PathBuf::from(l), PathBuf::from(t)))
        .collect();
    let home = call.session_target.to_string_lossy().into_owned();
    let (argv, mut env) = match call.language {
        Language::Python => (
            vec![
                prefix
                    .join("venv/bin/python3")
                    .to_string_lossy()
                    .into_owned(),
                // Isolated mode: ignore PYTHON* variables and the user site directory.
                "-I".into(),
                // The runtime is read-only: do not try to write bytecode caches.
                "-B".into(),
                prefix
                    .join("shim/airlock_runtime.py")
                    .to_string_lossy()
                    .into_owned(),
            ],
            vec![],
        ),
    };
    // The fixed environment: nothing of the daemon's own is passed on.
    env.extend(
        [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", home.as_str()),
            ("USER", "airlock"),
            ("LOGNAME", "airlock"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C.UTF-8"),
            ("TMPDIR", "/tmp"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    SpawnRequest {
        call_id: call.call_id,
        uid: call.uid,
        gid: call.gid,
        root_mountpoint: root_mountpoint(config),
        session_dir: call.session_dir,
        session_target: call.session_target,
        ro_mounts,
        symlinks,
        argv,
        env,
        hostname: "airlock".into(),
        tmp_size_bytes: config.limits.tmp_size_mib * 1024 * 1024,
        // Filled in by the caller once the call's cgroup exists.
        cgroup_procs: Vec::new(),
        // The daemon's per-call CPU accounting acts first; each process's own limit is
        // a backstop a little above it.
        cpu_rlimit_seconds: config.limits.cpu_seconds + 5,
    }
}

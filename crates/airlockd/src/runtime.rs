//! What each language's sandbox contains: the read-only mounts, the program, the
//! environment. This is the reviewed list of everything from the host a script can see.

use std::path::{Path, PathBuf};

use airlock_protocol::{
    control::Language,
    spawner::{RoMount, SpawnRequest, WarmSpec},
};

use crate::config::{Config, Runtime};

/// Host files a runtime needs beside its own tree, each with the reason.
const HOST_FILES: &[(&str, &str)] = &[
    // The dynamic loader's cache: without it every library lookup walks the search path.
    ("/etc/ld.so.cache", "dynamic loader cache"),
    // Time zone of the host, so local times in scripts match the server's.
    ("/etc/localtime", "local time zone"),
];

/// What R needs from /etc beside [`HOST_FILES`], mounted only into R sandboxes, each
/// with the reason. Both hold configuration and symlinks, nothing secret.
const R_HOST_DIRS: &[(&str, &str)] = &[
    // Debian's R_HOME/etc (/usr/lib/R/etc) is a symlink farm into /etc/R: Renviron,
    // which R reads at every start, and ldpaths.
    ("/etc/R", "R's own configuration (R_HOME/etc points here)"),
    // libblas.so.3 and liblapack.so.3, which libR.so links against, are symlinks through
    // /etc/alternatives to the BLAS/LAPACK Debian selected.
    (
        "/etc/alternatives",
        "the BLAS and LAPACK libR.so links against",
    ),
];

/// Where Debian's R lives; R_HOME in the sandbox.
const R_HOME: &str = "/usr/lib/R";

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
    if call.language == Language::R {
        for (path, _why) in R_HOST_DIRS {
            if Path::new(path).exists() {
                ro_mounts.push(RoMount {
                    host: path.into(),
                    target: path.into(),
                });
            }
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
        // The R binary itself, not the bin/R shell wrapper (which needs a shell, sed and
        // uname and only sets variables we set here). --vanilla: no site or user
        // profiles, no saved workspace; --no-echo: the shim's code is not printed.
        Language::R => (
            vec![
                format!("{R_HOME}/bin/exec/R"),
                "--vanilla".into(),
                "--no-echo".into(),
                "-f".into(),
                prefix
                    .join("shim/airlock_runtime.R")
                    .to_string_lossy()
                    .into_owned(),
            ],
            vec![("R_HOME".to_string(), R_HOME.to_string())],
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
    let warm = (call.runtime.warm_pool(call.language) > 0)
        .then(|| warm_spec(call.language, call.runtime))
        .flatten();
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
        cgroup: None,
        // The daemon's per-call CPU accounting acts first; each process's own limit is
        // a backstop a little above it.
        cpu_rlimit_seconds: config.limits.cpu_seconds + 5,
        warm,
    }
}

/// Thread counts of the math libraries in the Python zygote, which must stay
/// single-threaded to clone itself; its calls inherit one BLAS thread (a call gets one
/// core by default, limits.cpu_percent = 100). The call's environment stays the fixed
/// one above.
const SINGLE_THREADED: &[(&str, &str)] = &[
    ("OPENBLAS_NUM_THREADS", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
];

/// The pre-initialised interpreter of `language`'s warm path, if it has one: Python's
/// `shim/airlock_warm.py`, run as root outside any sandbox (it never runs user code;
/// each call's process is cloned from it into a full sandbox). Its environment is fixed
/// like a sandbox's; each call's process replaces it with the call's exact environment.
pub fn warm_spec(language: Language, runtime: &Runtime) -> Option<WarmSpec> {
    let prefix = &runtime.prefix;
    match language {
        Language::Python => Some(WarmSpec {
            argv: vec![
                prefix
                    .join("venv/bin/python3")
                    .to_string_lossy()
                    .into_owned(),
                "-I".into(),
                "-B".into(),
                prefix
                    .join("shim/airlock_warm.py")
                    .to_string_lossy()
                    .into_owned(),
            ],
            env: SINGLE_THREADED
                .iter()
                .chain(&[
                    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
                    ("HOME", "/"),
                    ("LANG", "C.UTF-8"),
                    ("LC_ALL", "C.UTF-8"),
                    ("TMPDIR", "/tmp"),
                    // pyarrow's jemalloc would start a background thread; a process that
                    // clones itself must have only one.
                    ("JE_ARROW_MALLOC_CONF", "background_thread:false"),
                ])
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            count: runtime.warm_pool(language),
        }),
        Language::R => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(language: Language) -> SpawnRequest {
        let config = Config::parse(
            Path::new("t.toml"),
            r#"
                socket_path = "/run/a.sock"
                allowed_peer_uids = [101]
                state_dir = "/var/lib/airlock"
                [workers]
                first_uid = 61000
                count = 1
                gid = 61000
                [runtimes.python]
                prefix = "/opt/airlock/runtimes/python"
                [runtimes.r]
                prefix = "/opt/airlock/runtimes/r"
            "#,
        )
        .unwrap();
        let runtime = config.runtimes[&language].clone();
        spawn_request(
            &config,
            CallSpec {
                call_id: 1,
                language,
                runtime: &runtime,
                uid: 61000,
                gid: 61000,
                session_dir: "/var/lib/airlock/sessions/x".into(),
                session_target: "/sessions/x".into(),
            },
        )
    }

    #[test]
    fn r_runs_the_r_binary_on_the_shim_with_r_home() {
        let req = request(Language::R);
        assert_eq!(
            req.argv,
            [
                "/usr/lib/R/bin/exec/R",
                "--vanilla",
                "--no-echo",
                "-f",
                "/opt/airlock/runtimes/r/shim/airlock_runtime.R"
            ]
        );
        assert!(req
            .env
            .contains(&("R_HOME".to_string(), "/usr/lib/R".to_string())));
        let targets: Vec<_> = req.ro_mounts.iter().map(|m| m.target.clone()).collect();
        assert!(targets.contains(&PathBuf::from("/opt/airlock/runtimes/r")));
        if Path::new("/etc/R").exists() {
            assert!(targets.contains(&PathBuf::from("/etc/R")));
        }
    }

    #[test]
    fn python_is_warm_by_default_and_r_is_not() {
        let py = request(Language::Python);
        let spec = py.warm.expect("python has a warm spec by default");
        assert_eq!(
            spec.argv.last().map(String::as_str),
            Some("/opt/airlock/runtimes/python/shim/airlock_warm.py")
        );
        assert!(spec
            .env
            .contains(&("OPENBLAS_NUM_THREADS".to_string(), "1".to_string())));
        assert!(request(Language::R).warm.is_none());
    }

    #[test]
    fn python_sandboxes_get_no_r_mounts() {
        let req = request(Language::Python);
        assert!(
            req.ro_mounts
                .iter()
                .all(|m| m.target != Path::new("/etc/R")
                    && m.target != Path::new("/etc/alternatives"))
        );
        assert!(req.env.iter().all(|(k, _)| k != "R_HOME"));
    }
}

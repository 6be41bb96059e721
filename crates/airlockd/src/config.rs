//! The daemon's configuration: one TOML file, parsed once into [`Config`] at start.
//!
//! Unknown keys are refused, so a misspelt setting is an error rather than a silently
//! ignored default.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use airlock_protocol::control::Language;
use serde::Deserialize;

/// Errors from reading or checking the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: `{key}` {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The daemon's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unix socket the daemon listens on.
    pub socket_path: PathBuf,
    /// Uids allowed to connect (checked with SO_PEERCRED): the Postgres server's uid.
    pub allowed_peer_uids: Vec<u32>,
    /// Root of the daemon's state: session folders and the sandbox root mount point.
    pub state_dir: PathBuf,
    /// The audit log (JSON lines, hash-chained); `<state_dir>/audit.jsonl` if unset.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    pub workers: Workers,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Runtimes by language name.
    #[serde(default)]
    pub runtimes: BTreeMap<Language, Runtime>,
}

/// The worker identities scripts run as: a numeric range the daemon owns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workers {
    /// First uid of the range.
    pub first_uid: u32,
    /// Number of worker uids: `first_uid .. first_uid + count`.
    pub count: u32,
    /// Group of every worker.
    pub gid: u32,
    /// How long a call waits for a worker when every one is held by other callers.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_seconds: f64,
}

fn default_queue_timeout() -> f64 {
    30.0
}

/// Per-call limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock time a call's sandbox may live.
    pub wall_clock_seconds: f64,
    /// CPU time all of a call's processes together may use (cgroup accounting).
    pub cpu_seconds: u64,
    /// Memory of all of a call's processes together (cgroup memory limit, no swap).
    pub memory_mib: u64,
    /// Processes and threads of a call at once (cgroup pids limit).
    pub pids: u64,
    /// CPU bandwidth of a call, percent of one core.
    pub cpu_percent: u32,
    /// Size of each sandbox's private /tmp.
    pub tmp_size_mib: u64,
    /// Size of each session folder (a tmpfs of its own).
    pub session_size_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall_clock_seconds: 60.0,
            cpu_seconds: 60,
            memory_mib: 512,
            pids: 256,
            cpu_percent: 100,
            tmp_size_mib: 64,
            session_size_mib: 256,
        }
    }
}

/// Isolation layers the operator may waive, by name. A waived layer is still applied
/// where the kernel supports it; waiving only lets the daemon start where it does not.
/// Namespaces, no_new_privs, seccomp and Landlock cannot be waived: the sandbox refuses
/// to start a runtime without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Cgroups,
}

/// What the daemon may run without.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Enforcement {
    /// Layers that may be missing on this kernel; each is logged at start.
    pub waive: Vec<Layer>,
}

/// The most sandboxes of one language that may wait prepared.
const MAX_PREPARED: u32 = 64;

/// Where one language's runtime lives on the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Installation prefix, as made by `scripts/setup-python-runtime.sh` (`venv/` and
    /// `shim/` below it) or `scripts/setup-r-runtime.sh` (`lib/libairlock_r.so` and
    /// `shim/`). Mounted read-only at the same path in every sandbox of its language.
    pub prefix: PathBuf,
    /// Warm starts: how many pre-initialised interpreters (libraries imported, no user
    /// code ever run in them) the daemon keeps for this language, each call's sandbox
    /// cloned from one and then sandboxed exactly like a cold start; each clones one
    /// sandbox at a time, so more build more at once. 0 = off, every call starts a fresh
    /// interpreter. Default 2 for Python (at most 8); R has no warm path yet (0).
    #[serde(default)]
    pub warm_pool: Option<u32>,
    /// How many sandboxes of this language the daemon keeps built ahead of calls, each
    /// running its runtime with its libraries loaded and waiting for a call (see
    /// `airlockd::prepared`). Every call still gets a sandbox of its own that served no
    /// one before; this only moves the build out of the call. 0 = off. Default 2 for
    /// Python, 1 for R.
    #[serde(default)]
    pub prepared: Option<u32>,
}

impl Runtime {
    /// The effective number of prepared sandboxes of `language` (the default when unset).
    pub fn prepared(&self, language: Language) -> u32 {
        self.prepared.unwrap_or(match language {
            Language::Python => 2,
            Language::R => 1,
        })
    }

    /// The effective warm pool size of `language` (the default when unset).
    pub fn warm_pool(&self, language: Language) -> u32 {
        self.warm_pool.unwrap_or(match language {
            Language::Python => 2,
            Language::R => 0,
        })
    }
}

impl Limits {
    pub fn wall_clock_ms(&self) -> u64 {
        (self.wall_clock_seconds * 1000.0).round() as u64
    }
}

impl Config {
    /// Reads, parses and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and checks config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        if !self.socket_path.is_absolute() {
            return Err(invalid("socket_path", "must be an absolute path".into()));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path".into()));
        }
        if self.audit_log.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid("audit_log", "must be an absolute path".into()));
        }
        if self.allowed_peer_uids.is_empty() {
            return Err(invalid(
                "allowed_peer_uids",
                "must name at least one uid (the Postgres server's)".into(),
            ));
        }
        let w = &self.workers;
        if w.count == 0 {
            return Err(invalid("workers.count", "must be at least 1".into()));
        }
        if w.first_uid < 1000 {
            return Err(invalid(
                "workers.first_uid",
                format!(
                    "is {}; worker uids must not overlap root or system accounts (use 1000 or more)",
                    w.first_uid
                ),
            ));
        }
        let Some(last) = w.first_uid.checked_add(w.count - 1) else {
            return Err(invalid("workers.count", "overflows the uid range".into()));
        };
        if let Some(uid) = self
            .allowed_peer_uids
            .iter()
            .find(|u| (w.first_uid..=last).contains(*u))
        {
            return Err(invalid(
                "workers.first_uid",
                format!(
                    "range {}..={last} contains allowed peer uid {uid}",
                    w.first_uid
                ),
            ));
        }
        // A worker uid must belong to nobody: files of a real account would be the
        // script's to read and write.
        if let Some((uid, user)) = (w.first_uid..=last).find_map(|uid| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| (uid, u.name))
        }) {
            return Err(invalid(
                "workers.first_uid",
                format!("range {}..={last} contains uid {uid}, the account {user:?}; pick uids no account uses", w.first_uid),
            ));
        }
        if !(0.0..=3600.0).contains(&w.queue_timeout_seconds) {
            return Err(invalid(
                "workers.queue_timeout_seconds",
                "must be between 0 and 3600".into(),
            ));
        }
        if w.gid < 1000 {
            return Err(invalid(
                "workers.gid",
                format!("is {}; use a dedicated group of 1000 or more", w.gid),
            ));
        }
        if !(self.limits.wall_clock_seconds > 0.0 && self.limits.wall_clock_seconds <= 86_400.0) {
            return Err(invalid(
                "limits.wall_clock_seconds",
                "must be more than 0 and at most 86400".into(),
            ));
        }
        if self.limits.memory_mib < 16 {
            return Err(invalid("limits.memory_mib", "must be at least 16".into()));
        }
        if self.limits.pids < 8 {
            return Err(invalid("limits.pids", "must be at least 8".into()));
        }
        if !(1..=10_000).contains(&self.limits.cpu_percent) {
            return Err(invalid(
                "limits.cpu_percent",
                "must be between 1 and 10000 (100 is one core)".into(),
            ));
        }
        if self.limits.cpu_seconds == 0 {
            return Err(invalid("limits.cpu_seconds", "must be at least 1".into()));
        }
        if self.limits.session_size_mib == 0 {
            return Err(invalid(
                "limits.session_size_mib",
                "must be at least 1".into(),
            ));
        }
        if self.limits.tmp_size_mib == 0 {
            return Err(invalid("limits.tmp_size_mib", "must be at least 1".into()));
        }
        for (lang, rt) in &self.runtimes {
            if !rt.prefix.is_absolute() {
                return Err(invalid(
                    "runtimes.*.prefix",
                    format!("for {lang} must be an absolute path"),
                ));
            }
            let max = match lang {
                Language::Python => 8,
                Language::R => 0,
            };
            if rt.prepared(*lang) > MAX_PREPARED {
                return Err(invalid(
                    "runtimes.*.prepared",
                    format!("for {lang} must be at most {MAX_PREPARED}: each is a running runtime holding memory"),
                ));
            }
            if rt.warm_pool(*lang) > max {
                return Err(invalid(
                    "runtimes.*.warm_pool",
                    match lang {
                        Language::Python => "for python must be 0 (off) to 8 (pre-initialised interpreters each call is cloned from)".into(),
                        Language::R => "for R must be 0: R has no warm path yet".into(),
                    },
                ));
            }
        }
        Ok(())
    }

    /// Where the audit log is written.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.jsonl"))
    }

    /// Last worker uid, inclusive.
    pub fn last_worker_uid(&self) -> u32 {
        self.workers.first_uid + (self.workers.count - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        socket_path = "/run/airlock/airlockd.sock"
        allowed_peer_uids = [101]
        state_dir = "/var/lib/airlock"
        [workers]
        first_uid = 61000
        count = 20
        gid = 61000
        [limits]
        wall_clock_seconds = 5
        [runtimes.python]
        prefix = "/opt/airlock/runtimes/python"
        [runtimes.r]
        prefix = "/opt/airlock/runtimes/r"
    "#;

    fn err(text: &str) -> String {
        Config::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_good_config() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.workers.count, 20);
        assert_eq!(c.limits.wall_clock_ms(), 5000);
        assert_eq!(c.limits.tmp_size_mib, 64);
        assert!(c.runtimes.contains_key(&Language::Python));
        assert_eq!(
            c.runtimes[&Language::R].prefix,
            Path::new("/opt/airlock/runtimes/r")
        );
        assert_eq!(c.last_worker_uid(), 61019);
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let e = err(&GOOD.replace("count = 20", "count = 20\ncuont = 3"));
        assert!(e.contains("cuont"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        assert!(err(&GOOD.replace("first_uid = 61000", "first_uid = 0"))
            .contains("`workers.first_uid`"));
        assert!(err(&GOOD.replace("[101]", "[61005]")).contains("allowed peer uid 61005"));
        assert!(err(&GOOD.replace("[101]", "[]")).contains("`allowed_peer_uids`"));
        assert!(
            err(&GOOD.replace("wall_clock_seconds = 5", "wall_clock_seconds = -1"))
                .contains("`limits.wall_clock_seconds`")
        );
        assert!(err(&GOOD.replace("\"/var/lib/airlock\"", "\"rel\"")).contains("`state_dir`"));
    }

    #[test]
    fn audit_log_defaults_to_the_state_dir() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(
            c.audit_log_path(),
            Path::new("/var/lib/airlock/audit.jsonl")
        );
        let c = Config::parse(
            Path::new("t.toml"),
            &GOOD.replace(
                "state_dir",
                "audit_log = \"/var/log/airlock.jsonl\"\nstate_dir",
            ),
        )
        .unwrap();
        assert_eq!(c.audit_log_path(), Path::new("/var/log/airlock.jsonl"));
        let e = err(&GOOD.replace("state_dir", "audit_log = \"audit.jsonl\"\nstate_dir"));
        assert!(e.contains("`audit_log`"), "{e}");
    }

    #[test]
    fn waivers_name_known_layers_only() {
        let c = Config::parse(
            Path::new("t.toml"),
            &format!("{GOOD}\n[enforcement]\nwaive = [\"cgroups\"]\n"),
        )
        .unwrap();
        assert_eq!(c.enforcement.waive, vec![Layer::Cgroups]);
        let e = err(&format!("{GOOD}\n[enforcement]\nwaive = [\"landlock\"]\n"));
        assert!(e.contains("landlock"), "{e}");
    }

    #[test]
    fn resource_limits_have_defaults_and_bounds() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.limits.memory_mib, 512);
        assert_eq!(c.limits.pids, 256);
        assert!(err(&GOOD.replace(
            "wall_clock_seconds = 5",
            "wall_clock_seconds = 5\nmemory_mib = 1"
        ))
        .contains("`limits.memory_mib`"));
        assert!(err(&GOOD.replace(
            "wall_clock_seconds = 5",
            "wall_clock_seconds = 5\ncpu_percent = 0"
        ))
        .contains("`limits.cpu_percent`"));
    }

    #[test]
    fn warm_pool_defaults_on_for_python_and_is_bounded() {
        let py = "prefix = \"/opt/airlock/runtimes/python\"";
        let with = |extra: &str| GOOD.replacen(py, &format!("{py}\n{extra}"), 1);
        let config = Config::parse(Path::new("t.toml"), &with("")).unwrap();
        assert_eq!(
            config.runtimes[&Language::Python].warm_pool(Language::Python),
            2
        );
        let off = Config::parse(Path::new("t.toml"), &with("warm_pool = 0")).unwrap();
        assert_eq!(
            off.runtimes[&Language::Python].warm_pool(Language::Python),
            0
        );
        assert!(err(&with("warm_pool = 9")).contains("runtimes.*.warm_pool"));
        assert!(err(&with("prepared = 65")).contains("runtimes.*.prepared"));
        assert_eq!(
            config.runtimes[&Language::Python].prepared(Language::Python),
            2
        );
        let r = "prefix = \"/opt/airlock/runtimes/r\"";
        let r_warm = GOOD.replacen(r, &format!("{r}\nwarm_pool = 1"), 1);
        assert!(err(&r_warm).contains("R has no warm path"));
    }

    #[test]
    fn unknown_language_is_refused() {
        let e = err(&GOOD.replace("runtimes.python", "runtimes.cobol"));
        assert!(e.contains("cobol"), "{e}");
    }
}

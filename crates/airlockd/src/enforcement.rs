//! Which isolation layers this kernel enforces, reported and never silently degraded.
//!
//! `airlockd --check` prints the report. At start the daemon refuses to run when a layer
//! is missing, unless the config's `[enforcement] waive` names it; a waived layer that is
//! missing is logged at every start.

use airlock_sandbox::{
    cgroup::{self, CgroupRoot},
    probe::{self, LayerStatus},
};

use crate::config::{Config, Layer};

/// The daemon's parent cgroup, under which every call's group is created: named after the
/// daemon's state directory, so two daemons on one host (a production one and a test
/// one, say) never sweep each other's calls, and a restarted daemon finds its own
/// leftovers.
pub fn cgroup_name(config: &Config) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(config.state_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("airlock-{hex}")
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    pub layer: String,
    pub enforced: bool,
    /// The config name that waives this layer, if it can be waived.
    pub waiver: Option<Layer>,
    pub detail: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.enforced {
            "enforced"
        } else {
            "NOT ENFORCED"
        };
        write!(f, "{:<16} {state:<13} {}", self.layer, self.detail)
    }
}

fn waiver_of(status: &LayerStatus) -> Option<Layer> {
    match status.layer {
        // The sandbox itself refuses to run a script without these: never waivable.
        probe::Layer::Seccomp
        | probe::Layer::Landlock
        | probe::Layer::UserNamespaces
        | probe::Layer::NoNewPrivs => None,
    }
}

/// Probes every layer without changing anything on the host.
pub fn report() -> Vec<Line> {
    let mut lines: Vec<Line> = probe::probe()
        .iter()
        .map(|s| Line {
            layer: s.layer.to_string(),
            enforced: s.enforced,
            waiver: waiver_of(s),
            detail: s.detail.clone(),
        })
        .collect();
    lines.push(match cgroup::probe() {
        Ok(p) => match p.choose() {
            Ok(version) => Line {
                layer: "cgroups".into(),
                enforced: true,
                waiver: Some(Layer::Cgroups),
                detail: format!("{version}: memory, pids and cpu limits per call"),
            },
            Err(e) => Line {
                layer: "cgroups".into(),
                enforced: false,
                waiver: Some(Layer::Cgroups),
                detail: e.to_string(),
            },
        },
        Err(e) => Line {
            layer: "cgroups".into(),
            enforced: false,
            waiver: Some(Layer::Cgroups),
            detail: e.to_string(),
        },
    });
    lines
}

/// Errors that keep the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum EnforcementError {
    #[error("{layer} is not enforced on this kernel ({detail}); {remedy}")]
    Missing {
        layer: String,
        detail: String,
        remedy: String,
    },
    #[error("cannot set up cgroups: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
}

/// Checks the report against the config's waivers. Returns the lines that are waived
/// (to log), or the first missing layer that is not.
pub fn require(config: &Config, lines: &[Line]) -> Result<Vec<Line>, EnforcementError> {
    let mut waived = Vec::new();
    for line in lines.iter().filter(|l| !l.enforced) {
        match line.waiver {
            Some(w) if config.enforcement.waive.contains(&w) => waived.push(line.clone()),
            Some(w) => {
                return Err(EnforcementError::Missing {
                    layer: line.layer.clone(),
                    detail: line.detail.clone(),
                    remedy: format!(
                        "airlockd will not run without it unless the config says [enforcement] waive = [\"{}\"]",
                        serde_name(w)
                    ),
                })
            }
            None => {
                return Err(EnforcementError::Missing {
                    layer: line.layer.clone(),
                    detail: line.detail.clone(),
                    remedy: "airlockd cannot run without it".into(),
                })
            }
        }
    }
    Ok(waived)
}

fn serde_name(l: Layer) -> &'static str {
    match l {
        Layer::Cgroups => "cgroups",
    }
}

/// Creates the daemon's parent cgroup and sweeps call groups a crashed daemon left;
/// None when cgroups are missing and waived.
pub fn cgroups(config: &Config, lines: &[Line]) -> Result<Option<CgroupRoot>, EnforcementError> {
    if lines.iter().any(|l| l.layer == "cgroups" && !l.enforced) {
        return Ok(None);
    }
    let name = cgroup_name(config);
    let root = CgroupRoot::detect(&name)?;
    tracing::info!(cgroup = %name, version = %root.version(), "per-call cgroups");
    for name in root.sweep()? {
        tracing::warn!(cgroup = %name, "removed a call cgroup left by an earlier run");
    }
    Ok(Some(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
        socket_path = "/run/airlock/airlockd.sock"
        allowed_peer_uids = [101]
        state_dir = "/var/lib/airlock"
        [workers]
        first_uid = 61000
        count = 2
        gid = 61000
    "#;

    fn line(layer: &str, enforced: bool, waiver: Option<Layer>) -> Line {
        Line {
            layer: layer.into(),
            enforced,
            waiver,
            detail: "probe said so".into(),
        }
    }

    #[test]
    fn a_missing_layer_stops_the_daemon_unless_waived() {
        let strict = Config::parse(Path::new("t.toml"), CONFIG).unwrap();
        let lines = [
            line("seccomp filter", true, None),
            line("cgroups", false, Some(Layer::Cgroups)),
        ];
        let e = require(&strict, &lines).unwrap_err().to_string();
        assert!(e.contains("cgroups is not enforced"), "{e}");
        assert!(e.contains(r#"waive = ["cgroups"]"#), "{e}");

        let lenient = Config::parse(
            Path::new("t.toml"),
            &format!("{CONFIG}\n[enforcement]\nwaive = [\"cgroups\"]\n"),
        )
        .unwrap();
        let waived = require(&lenient, &lines).unwrap();
        assert_eq!(waived.len(), 1);
        assert_eq!(waived[0].layer, "cgroups");
    }

    #[test]
    fn sandbox_layers_cannot_be_waived() {
        let config = Config::parse(
            Path::new("t.toml"),
            &format!("{CONFIG}\n[enforcement]\nwaive = [\"cgroups\"]\n"),
        )
        .unwrap();
        let e = require(&config, &[line("landlock", false, None)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run without it"), "{e}");
    }

    #[test]
    fn each_state_directory_has_its_own_cgroup() {
        let a = Config::parse(Path::new("t.toml"), CONFIG).unwrap();
        let b = Config::parse(
            Path::new("t.toml"),
            &CONFIG.replace("/var/lib/airlock", "/var/lib/airlock-test"),
        )
        .unwrap();
        assert_eq!(cgroup_name(&a), cgroup_name(&a.clone()));
        assert_ne!(cgroup_name(&a), cgroup_name(&b));
        assert!(cgroup_name(&a).starts_with("airlock-"));
    }

    #[test]
    fn this_host_enforces_every_layer() {
        // Runs on the project's own machines (root, kernel with Landlock, cgroups): a
        // layer missing here means the sandboxes the other tests build are weaker than
        // documented.
        for l in report() {
            assert!(l.enforced, "{l}");
        }
    }
}

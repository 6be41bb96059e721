//! One cgroup per script call: memory, process and CPU limits, a kill that reaches every
//! process of the call, and the accounting the daemon reports (peak memory, CPU time,
//! whether a limit was hit).
//!
//! Two layouts are supported:
//!
//! * **cgroup v2** (most production hosts): one hierarchy; the call's group is one
//!   directory, into which a sandbox init is cloned (`clone3(CLONE_INTO_CGROUP)`, see
//!   [`CallCgroup::join`]).
//! * **cgroup v1** (hosts and containers that mount each controller separately): the
//!   call's group is one directory per controller; a sandbox init moves itself into each
//!   controller's group through its `tasks` file ([`CallCgroup::join`]); any other
//!   process is placed by writing its pid into each `cgroup.procs`
//!   ([`CallCgroup::add_pid`]).
//!
//! [`CgroupRoot::detect`] picks the layout, creates the daemon's parent group inside the
//! daemon's own group (so the daemon's own limits bound every call) and reports what it
//! found; it fails naming the missing controller rather than running calls unlimited.
//! Nothing here needs `unsafe`: cgroups are files.
//!
//! Call groups are leaves: a sandbox has no cgroupfs mounted and no capability to mount
//! one, so it cannot create groups below its own.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::spawner::CgroupJoin;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The limits of one call's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory the call may use (RAM; swap is limited to nothing where the kernel
    /// accounts it). At least [`MIN_MEMORY_BYTES`].
    pub memory_bytes: u64,
    /// Processes and threads the call may have at once. At least 1.
    pub pids: u64,
    /// CPU bandwidth in percent of one core: 100 = one core, 50 = half a core,
    /// 200 = two cores. At least 1.
    pub cpu_quota_percent: u32,
}

/// The smallest memory limit accepted: below it a runtime cannot even start, and the
/// kernel's page rounding makes the limit meaningless.
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// The CFS period the CPU quota is expressed in (the kernel's default, 100 ms): short
/// enough that a throttled call still answers, long enough to cost nothing.
pub const CPU_PERIOD_USEC: u64 = 100_000;

/// How long [`CallCgroup::kill_all`] and [`CallCgroup::remove`] wait for killed
/// processes to leave the group. SIGKILLed processes are normally gone in milliseconds;
/// only one stuck in uninterruptible sleep (a hung filesystem) takes longer.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the waits above look again.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Which cgroup layout the groups live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        })
    }
}

/// Whether a layout needs a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Detection fails without it.
    Required,
    /// Used when present; what is lost without it is reported in [`Features`].
    Optional,
    /// The layout does not use it (v2 has its function in the core).
    Unused,
}

/// A controller Airlock uses, and why: the policy, declared once.
#[derive(Debug)]
pub struct Controller {
    pub name: &'static str,
    pub v1: Need,
    pub v2: Need,
    pub purpose: &'static str,
}

/// Every controller a call's group uses, with the reason.
pub const CONTROLLERS: &[Controller] = &[
    Controller {
        name: "memory",
        v1: Need::Required,
        v2: Need::Required,
        purpose: "memory limit; the kernel kills the call when it is exceeded",
    },
    Controller {
        name: "pids",
        v1: Need::Required,
        v2: Need::Required,
        purpose: "process limit, against fork bombs",
    },
    Controller {
        name: "cpu",
        v1: Need::Required,
        v2: Need::Required,
        purpose: "CPU quota",
    },
    Controller {
        name: "cpuacct",
        v1: Need::Required,
        v2: Need::Unused,
        purpose: "CPU time used, for the CPU-time limit (v2: cpu.stat, always present)",
    },
    Controller {
        name: "freezer",
        v1: Need::Optional,
        v2: Need::Unused,
        purpose:
            "stops the call's processes while they are killed, so none forks away (v2: cgroup.kill)",
    },
];

/// The v2 controllers enabled for the daemon's children, in the order written.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    // Checking the request.
    #[error("invalid cgroup name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 _ - . and do not start with a dot")]
    InvalidName { name: String },
    #[error("invalid cgroup limit: {what} must be at least {min}, got {got}")]
    InvalidLimit {
        what: &'static str,
        min: u64,
        got: u64,
    },

    // Detection.
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parse {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("no usable cgroup hierarchy: {v2}; {v1}")]
    MissingControllers { v2: String, v1: String },
    #[error("enable the {controllers} controllers in {path}: cgroup v2 forbids it while the group holds processes (pids {pids:?}); run airlockd in a group of its own whose processes live in a leaf (systemd: Delegate=yes with DelegateSubgroup=)")]
    GroupBusy {
        path: PathBuf,
        controllers: String,
        pids: Vec<i32>,
    },

    // Creating and using groups.
    #[error("create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cgroup {path} already exists (a leftover of a crashed daemon? sweep() removes them)")]
    Exists { path: PathBuf },
    #[error("write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("list the groups in {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("send SIGKILL to pid {pid} of cgroup {path}: {source}")]
    Kill {
        pid: i32,
        path: PathBuf,
        source: Errno,
    },
    #[error("cgroup {path} still holds pids {pids:?} after {waited:?}")]
    NotEmpty {
        path: PathBuf,
        pids: Vec<i32>,
        waited: Duration,
    },
    #[error("remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// What the host offers, before anything is created: for `airlockd --check`, and the
/// input of [`CgroupRoot::detect`].
#[derive(Debug, Clone)]
pub struct Probe {
    /// The daemon's own group in the v2 hierarchy, if one is mounted.
    pub v2_base: Option<PathBuf>,
    /// One entry per [`CONTROLLERS`] entry, in that order.
    pub controllers: Vec<ControllerStatus>,
}

/// Where one controller is available.
#[derive(Debug, Clone)]
pub struct ControllerStatus {
    pub controller: &'static Controller,
    /// Listed in `cgroup.controllers` of [`Probe::v2_base`], so its children can have it.
    pub v2: bool,
    /// The daemon's own group in this controller's v1 hierarchy, if mounted.
    pub v1: Option<PathBuf>,
}

/// Reads `/proc/self/cgroup`, `/proc/self/mountinfo` and the v2 base group's
/// `cgroup.controllers`. Creates nothing.
pub fn probe() -> Result<Probe, CgroupError> {
    let self_cgroup = read("/proc/self/cgroup")?;
    let mountinfo = read("/proc/self/mountinfo")?;
    probe_from(&self_cgroup, &mountinfo)
}

impl Probe {
    /// The layout to use: v2 if it has every required controller, else v1 if it has
    /// every required one; else an error naming what each lacks.
    pub fn choose(&self) -> Result<CgroupVersion, CgroupError> {
        self.bases().map(|(version, _)| version)
    }

    /// The chosen layout and the daemon's own group in it, per controller.
    fn bases(&self) -> Result<(CgroupVersion, Dirs), CgroupError> {
        let missing = |version| -> Vec<&'static str> {
            self.controllers
                .iter()
                .filter(|c| match version {
                    CgroupVersion::V1 => c.controller.v1 == Need::Required && c.v1.is_none(),
                    CgroupVersion::V2 => c.controller.v2 == Need::Required && !c.v2,
                })
                .map(|c| c.controller.name)
                .collect()
        };
        let (v2_missing, v1_missing) = (missing(CgroupVersion::V2), missing(CgroupVersion::V1));
        if let Some(base) = self.v2_base.as_ref().filter(|_| v2_missing.is_empty()) {
            return Ok((CgroupVersion::V2, Dirs::v2(base.clone())));
        }
        let v1 = |name: &str| {
            self.controllers
                .iter()
                .find(|c| c.controller.name == name)
                .and_then(|c| c.v1.clone())
        };
        if let (Some(memory), Some(pids), Some(cpu), Some(cpuacct)) =
            (v1("memory"), v1("pids"), v1("cpu"), v1("cpuacct"))
        {
            let freezer = v1("freezer");
            let dirs = Dirs {
                memory,
                pids,
                cpu,
                cpuacct,
                freezer,
            };
            return Ok((CgroupVersion::V1, dirs));
        }
        let v2 = match &self.v2_base {
            None => "cgroup v2 is not mounted".to_string(),
            Some(base) => format!(
                "cgroup v2 group {} lacks the {} controller(s)",
                base.display(),
                v2_missing.join(", ")
            ),
        };
        let v1 = format!(
            "cgroup v1 lacks the {} controller(s)",
            v1_missing.join(", ")
        );
        Err(CgroupError::MissingControllers { v2, v1 })
    }
}

impl fmt::Display for Probe {
    /// One line per controller: where it is available and what Airlock uses it for.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.v2_base {
            Some(base) => writeln!(f, "cgroup v2 group: {}", base.display())?,
            None => writeln!(f, "cgroup v2: not mounted")?,
        }
        for c in &self.controllers {
            let v2 = match (c.controller.v2, c.v2) {
                (Need::Unused, _) => "unused",
                (_, true) => "yes",
                (_, false) => "no",
            };
            let v1 =
                c.v1.as_ref()
                    .map_or_else(|| "no".to_string(), |p| p.display().to_string());
            writeln!(
                f,
                "{:<8} v2: {v2:<6} v1: {v1}  ({})",
                c.controller.name, c.controller.purpose
            )?;
        }
        Ok(())
    }
}

/// What a detected layout can and cannot enforce beyond the limits themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Swap is limited to nothing (v2 `memory.swap.max`, v1 `memory.memsw.*`). Without
    /// it, a call may page out beyond its memory limit on a host that has swap.
    pub swap_limit: bool,
    /// The kernel kills every process of the call when one hits the memory limit (v2
    /// `memory.oom.group`). v1 kills one process; the daemon must then `kill_all`.
    pub oom_group_kill: bool,
    /// The kernel kills the whole group in one step (v2 `cgroup.kill`, Linux 5.14).
    /// Otherwise `kill_all` signals each listed pid until the group is empty.
    pub kill_file: bool,
    /// v1 `freezer`: processes are frozen while they are killed, so none forks away.
    pub freezer: bool,
}

/// Where per-call groups are created: the daemon's parent group, in one directory (v2)
/// or one per controller (v1).
#[derive(Debug)]
pub struct CgroupRoot {
    version: CgroupVersion,
    parent: Dirs,
    features: Features,
    probe: Probe,
}

impl CgroupRoot {
    /// Detects the layout (see [`Probe::choose`]) and creates the parent group `name`
    /// inside the daemon's own group, idempotently. On v2 it enables the memory, pids
    /// and cpu controllers for the daemon's group's children and for the parent's.
    /// Moves no process: on v2 the daemon's group must hold no process unless it is the
    /// root ([`CgroupError::GroupBusy`] says so).
    pub fn detect(name: &str) -> Result<CgroupRoot, CgroupError> {
        Self::from_probe(probe()?, name)
    }

    fn from_probe(probe: Probe, name: &str) -> Result<CgroupRoot, CgroupError> {
        check_name(name)?;
        let (version, bases) = probe.bases()?;
        let parent = bases.join(name);
        if version == CgroupVersion::V2 {
            enable_v2_controllers(&bases.memory)?;
        }
        for dir in parent.unique() {
            make_dir_idempotent(dir)?;
        }
        if version == CgroupVersion::V2 {
            enable_v2_controllers(&parent.memory)?;
        }
        let features = match version {
            CgroupVersion::V2 => Features {
                swap_limit: parent.memory.join("memory.swap.max").exists(),
                oom_group_kill: parent.memory.join("memory.oom.group").exists(),
                kill_file: parent.memory.join("cgroup.kill").exists(),
                freezer: false,
            },
            CgroupVersion::V1 => Features {
                swap_limit: parent.memory.join("memory.memsw.limit_in_bytes").exists(),
                oom_group_kill: false,
                kill_file: false,
                freezer: parent.freezer.is_some(),
            },
        };
        Ok(CgroupRoot {
            version,
            parent,
            features,
            probe,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// What detection saw, for `airlockd --check`.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The parent group's directories: one on v2, one per controller on v1.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.parent
            .unique()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    }

    /// Removes the call groups a crashed daemon left behind: kills their processes and
    /// removes them. Returns their names, sorted. Run it before the first call.
    pub fn sweep(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = BTreeSet::new();
        for dir in self.parent.unique() {
            let entries = fs::read_dir(dir).map_err(|source| CgroupError::List {
                path: dir.to_path_buf(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| CgroupError::List {
                    path: dir.to_path_buf(),
                    source,
                })?;
                // Interface files are files; groups are directories.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        for name in &names {
            let group = CallCgroup {
                version: self.version,
                dirs: self.parent.join(name),
                features: self.features,
                removed: false,
            };
            group.remove()?;
        }
        Ok(names.into_iter().collect())
    }

    /// Creates the call's group `call` with `limits` applied, before any process is in
    /// it. Fails if the group exists. On failure, removes what it created.
    pub fn create(&self, call: &str, limits: &CgroupLimits) -> Result<CallCgroup, CgroupError> {
        check_name(call)?;
        check_limits(limits)?;
        let dirs = self.parent.join(call);
        let mut group = CallCgroup {
            version: self.version,
            dirs,
            features: self.features,
            removed: false,
        };
        // Dropping `group` on an error below removes whatever exists of it; a group that
        // already existed is not ours to remove, so that check comes first.
        for dir in group.dirs.unique() {
            if dir.exists() {
                group.removed = true;
                return Err(CgroupError::Exists {
                    path: dir.to_path_buf(),
                });
            }
        }
        for dir in group.dirs.unique() {
            make_dir(dir).map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => CgroupError::Exists {
                    path: dir.to_path_buf(),
                },
                _ => CgroupError::Create {
                    path: dir.to_path_buf(),
                    source,
                },
            })?;
        }
        for (controller, file, value) in limit_writes(self.version, self.features, limits) {
            write(&group.dirs.of(controller).join(file), &value)?;
        }
        Ok(group)
    }

    /// Sweeps, then removes the parent group (a clean daemon shutdown).
    pub fn remove(self) -> Result<Vec<String>, CgroupError> {
        let swept = self.sweep()?;
        for dir in self.parent.unique() {
            remove_dir(dir)?;
        }
        Ok(swept)
    }
}

/// The file writes that apply `limits` to a fresh group, in order: the policy as data.
/// (Controller, file, value.)
fn limit_writes(
    version: CgroupVersion,
    features: Features,
    limits: &CgroupLimits,
) -> Vec<(&'static str, &'static str, String)> {
    let quota = u64::from(limits.cpu_quota_percent) * CPU_PERIOD_USEC / 100;
    let mut writes = Vec::new();
    match version {
        CgroupVersion::V2 => {
            // The hard limit: above it the kernel reclaims, then OOM-kills.
            writes.push(("memory", "memory.max", limits.memory_bytes.to_string()));
            // No swap: a call must not page the host to death below its memory limit.
            if features.swap_limit {
                writes.push(("memory", "memory.swap.max", "0".to_string()));
            }
            // An OOM kill takes the whole call, not one process of it.
            if features.oom_group_kill {
                writes.push(("memory", "memory.oom.group", "1".to_string()));
            }
            writes.push(("pids", "pids.max", limits.pids.to_string()));
            writes.push(("cpu", "cpu.max", format!("{quota} {CPU_PERIOD_USEC}")));
        }
        CgroupVersion::V1 => {
            // memsw (memory + swap) must stay >= the memory limit, so memory goes first.
            writes.push((
                "memory",
                "memory.limit_in_bytes",
                limits.memory_bytes.to_string(),
            ));
            if features.swap_limit {
                writes.push((
                    "memory",
                    "memory.memsw.limit_in_bytes",
                    limits.memory_bytes.to_string(),
                ));
            }
            writes.push(("pids", "pids.max", limits.pids.to_string()));
            writes.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_USEC.to_string()));
            writes.push(("cpu", "cpu.cfs_quota_us", quota.to_string()));
        }
    }
    writes
}

/// One call's group. Dropping it without [`remove`](Self::remove) kills and removes it
/// anyway, ignoring errors.
#[derive(Debug)]
pub struct CallCgroup {
    version: CgroupVersion,
    dirs: Dirs,
    features: Features,
    removed: bool,
}

/// A call's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupStats {
    /// The most memory the group used at once (v2 `memory.peak`, or `memory.current` on
    /// kernels before 5.19; v1 `memory.max_usage_in_bytes`).
    pub memory_peak_bytes: u64,
    /// CPU time used, user and system, by every process that was in the group.
    pub cpu_usage_usec: u64,
    /// CFS periods in which the group was throttled by its CPU quota.
    pub cpu_throttled_periods: u64,
    /// The kernel OOM-killed a process of the group (its `oom_kill` count is not zero).
    pub oom_killed: bool,
    /// A fork or clone failed because the group was at its pids limit.
    pub pids_limit_hit: bool,
}

impl CallCgroup {
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The files a pid is written into to move it into the group: v2 the one
    /// `cgroup.procs`, v1 each controller's.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .unique()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// How a sandbox init enters this group by itself ([`CgroupJoin`]): v1 each
    /// controller's `tasks` file, v2 the directory for `CLONE_INTO_CGROUP`.
    pub fn join(&self) -> CgroupJoin {
        match self.version {
            CgroupVersion::V1 => CgroupJoin::V1 {
                tasks: self
                    .dirs
                    .unique()
                    .into_iter()
                    .map(|d| d.join("tasks"))
                    .collect(),
            },
            CgroupVersion::V2 => CgroupJoin::V2 {
                dir: self.dirs.memory.clone(),
            },
        }
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the group now, sorted (v1: in any controller's group).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in self.dirs.unique() {
            let file = dir.join("cgroup.procs");
            let text = match fs::read_to_string(&file) {
                Ok(text) => text,
                // A group only partly created (a crash in create) has no such directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::Read { path: file, source }),
            };
            for line in text.lines().filter(|l| !l.is_empty()) {
                let pid = line.parse::<i32>().map_err(|e| CgroupError::Parse {
                    path: file.clone(),
                    detail: format!("{line:?}: {e}"),
                })?;
                // 0: a process outside our pid namespace; we cannot signal it anyway.
                if pid > 0 {
                    pids.insert(pid);
                }
            }
        }
        Ok(pids.into_iter().collect())
    }

    /// Kills every process in the group and waits until it is empty (at most
    /// [`KILL_TIMEOUT`]). v2 with `cgroup.kill`: one write, atomic against forks. v1:
    /// freezes the group (if the freezer is mounted), sends SIGKILL to each listed pid,
    /// thaws, and repeats until no pid is listed.
    ///
    /// Without `cgroup.kill` a pid is read, then signalled: a process that exits in
    /// between and whose pid is reused at once would receive the signal. Frozen
    /// processes cannot exit, which closes that window on v1 with the freezer.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let started = Instant::now();
        if self.features.kill_file {
            write(&self.dirs.memory.join("cgroup.kill"), "1")?;
        } else if let Some(freezer) = &self.dirs.freezer {
            let state = freezer.join("freezer.state");
            write(&state, "FROZEN")?;
            // Freezing waits for each task to reach the refrigerator; one in
            // uninterruptible sleep delays it. Kill what is listed either way.
            while read(&state)?.trim() != "FROZEN" && started.elapsed() < KILL_TIMEOUT {
                thread::sleep(POLL_INTERVAL);
            }
            let killed = self.signal_listed();
            // Killed frozen tasks die when thawed.
            write(&state, "THAWED")?;
            killed?;
        }
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::NotEmpty {
                    path: self.dirs.memory.clone(),
                    pids,
                    waited: started.elapsed(),
                });
            }
            if !self.features.kill_file {
                self.signal_listed()?;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn signal_listed(&self) -> Result<(), CgroupError> {
        for pid in self.pids()? {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                // Exited since it was listed.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::Kill {
                        pid,
                        path: self.dirs.memory.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads the group's accounting. Valid after its processes exited, until `remove`.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let d = &self.dirs;
        let cpu_usage_usec = self.cpu_usage_usec()?;
        match self.version {
            CgroupVersion::V2 => {
                let peak = d.memory.join("memory.peak");
                let memory_peak_bytes = if peak.exists() {
                    read_u64(&peak)?
                } else {
                    read_u64(&d.memory.join("memory.current"))?
                };
                let cpu_stat = d.cpu.join("cpu.stat");
                Ok(CgroupStats {
                    memory_peak_bytes,
                    cpu_usage_usec,
                    // Present only while the cpu controller is enabled, which it is.
                    cpu_throttled_periods: read_key(&cpu_stat, "nr_throttled")?,
                    oom_killed: read_key(&d.memory.join("memory.events"), "oom_kill")? > 0,
                    pids_limit_hit: read_key(&d.pids.join("pids.events"), "max")? > 0,
                })
            }
            CgroupVersion::V1 => Ok(CgroupStats {
                memory_peak_bytes: read_u64(&d.memory.join("memory.max_usage_in_bytes"))?,
                cpu_usage_usec,
                cpu_throttled_periods: read_key(&d.cpu.join("cpu.stat"), "nr_throttled")?,
                // Linux 4.13+; counts kills by the group's own OOM, not by the host's.
                oom_killed: read_key(&d.memory.join("memory.oom_control"), "oom_kill")? > 0,
                pids_limit_hit: read_key(&d.pids.join("pids.events"), "max")? > 0,
            }),
        }
    }

    /// CPU time used so far by every process that was in the group, user and system
    /// (one file; [`stats`](Self::stats) reads five).
    pub fn cpu_usage_usec(&self) -> Result<u64, CgroupError> {
        match self.version {
            CgroupVersion::V2 => read_key(&self.dirs.cpu.join("cpu.stat"), "usage_usec"),
            CgroupVersion::V1 => Ok(read_u64(&self.dirs.cpuacct.join("cpuacct.usage"))? / 1000),
        }
    }

    /// Kills what is left in the group, waits for it to empty and removes it.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.removed = true;
        self.remove_now()
    }

    fn remove_now(&self) -> Result<(), CgroupError> {
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        for dir in self.dirs.unique() {
            remove_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for CallCgroup {
    fn drop(&mut self) {
        if !self.removed {
            // Best effort: a caller that wants the error calls remove().
            let _ = self.remove_now();
        }
    }
}

/// A group's directory per controller. On v2 all are the same directory and there is
/// no freezer directory (v2 freezes and kills in the core).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dirs {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    freezer: Option<PathBuf>,
}

impl Dirs {
    fn v2(dir: PathBuf) -> Dirs {
        Dirs {
            memory: dir.clone(),
            pids: dir.clone(),
            cpu: dir.clone(),
            cpuacct: dir,
            freezer: None,
        }
    }

    fn join(&self, name: &str) -> Dirs {
        Dirs {
            memory: self.memory.join(name),
            pids: self.pids.join(name),
            cpu: self.cpu.join(name),
            cpuacct: self.cpuacct.join(name),
            freezer: self.freezer.as_ref().map(|f| f.join(name)),
        }
    }

    fn of(&self, controller: &str) -> &Path {
        match controller {
            "memory" => &self.memory,
            "pids" => &self.pids,
            "cpu" => &self.cpu,
            "cpuacct" => &self.cpuacct,
            // limit_writes names only the four above.
            _ => unreachable!("no limit file belongs to the {controller} controller"),
        }
    }

    /// Each directory once (v1 may co-mount cpu and cpuacct), in a fixed order.
    fn unique(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        let all = [
            Some(&self.memory),
            Some(&self.pids),
            Some(&self.cpu),
            Some(&self.cpuacct),
            self.freezer.as_ref(),
        ];
        for dir in all.into_iter().flatten() {
            if !dirs.contains(&dir.as_path()) {
                dirs.push(dir);
            }
        }
        dirs
    }
}

/// The parse behind [`probe`], given the two files' contents.
fn probe_from(self_cgroup: &str, mountinfo: &str) -> Result<Probe, CgroupError> {
    let mounts = parse_mountinfo(mountinfo);
    // "hierarchy-id:controller,list:/path"; v2 is "0::/path".
    let own_path = |wanted: Option<&str>| -> Option<&str> {
        self_cgroup.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let matches = match wanted {
                None => controllers.is_empty(),
                Some(c) => controllers.split(',').any(|x| x == c),
            };
            matches.then_some(path)
        })
    };
    let v2_base = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .and_then(|m| own_path(None).and_then(|p| m.dir_of(p)));
    let v2_available = match &v2_base {
        Some(base) => {
            let file = base.join("cgroup.controllers");
            read(&file)?
                .split_whitespace()
                .map(str::to_string)
                .collect()
        }
        None => Vec::new(),
    };
    let controllers = CONTROLLERS
        .iter()
        .map(|controller| {
            let v1 = mounts
                .iter()
                .find(|m| {
                    m.fstype == "cgroup" && m.options.split(',').any(|o| o == controller.name)
                })
                .and_then(|m| own_path(Some(controller.name)).and_then(|p| m.dir_of(p)));
            ControllerStatus {
                controller,
                v2: v2_available.iter().any(|c| c == controller.name),
                v1,
            }
        })
        .collect();
    Ok(Probe {
        v2_base,
        controllers,
    })
}

/// A cgroup filesystem mount from `/proc/self/mountinfo`.
#[derive(Debug)]
struct Mount {
    /// The group of the hierarchy mounted there ("/" unless a subtree is bind-mounted).
    root: String,
    point: PathBuf,
    fstype: String,
    /// Super options; v1 lists its controllers there ("rw,cpu,cpuacct").
    options: String,
}

impl Mount {
    /// Where the hierarchy's group `group` is, if it is inside this mount.
    fn dir_of(&self, group: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            group
        } else {
            group.strip_prefix(self.root.as_str())?
        };
        let rel = rel.trim_start_matches('/');
        // A path outside our cgroup namespace shows as "/.."; not ours to use.
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        Some(if rel.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rel)
        })
    }
}

/// The cgroup and cgroup2 mounts, in mount order.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, point) = (left.get(3)?, left.get(4)?);
            let (fstype, options) = (right.first()?, right.get(2)?);
            (*fstype == "cgroup" || *fstype == "cgroup2").then(|| Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
                options: options.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| bytes[i] == b'\\' && o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(o) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// v2 only: lets `dir`'s children have the memory, pids and cpu controllers, writing
/// only those not enabled yet (enabling is refused while `dir` holds processes, even
/// for controllers already on).
fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = read(&file)?;
    let missing: Vec<&str> = V2_CONTROLLERS
        .into_iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    match write(&file, &value) {
        Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            let procs = read(dir.join("cgroup.procs"))?;
            Err(CgroupError::GroupBusy {
                path: dir.to_path_buf(),
                controllers: missing.join(", "),
                pids: procs.lines().filter_map(|l| l.parse().ok()).collect(),
            })
        }
        other => other,
    }
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn check_limits(limits: &CgroupLimits) -> Result<(), CgroupError> {
    let checks = [
        ("memory_bytes", MIN_MEMORY_BYTES, limits.memory_bytes),
        ("pids", 1, limits.pids),
        ("cpu_quota_percent", 1, u64::from(limits.cpu_quota_percent)),
    ];
    for (what, min, got) in checks {
        if got < min {
            return Err(CgroupError::InvalidLimit { what, min, got });
        }
    }
    Ok(())
}

fn read(path: impl AsRef<Path>) -> Result<String, CgroupError> {
    let path = path.as_ref();
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.trim().parse().map_err(|e| CgroupError::Parse {
        path: path.to_path_buf(),
        detail: format!("{:?} is not a number: {e}", text.trim()),
    })
}

/// The value of `key` in a file of "key value" lines (memory.events, cpu.stat, ...).
fn read_key(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = read(path)?;
    let value = text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    });
    value.ok_or_else(|| CgroupError::Parse {
        path: path.to_path_buf(),
        detail: format!("no numeric {key:?} line"),
    })
}

/// Writes `value` to an existing cgroup file in one write(2), as cgroupfs expects.
/// Never creates the file: a missing interface file is an error, not a silent no-op.
/// (cgroupfs ignores O_TRUNC; it makes the test's fake tree behave the same.)
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

fn make_dir(path: &Path) -> io::Result<()> {
    fs::create_dir(path)?;
    #[cfg(test)]
    tests::fake_kernel::populate(path);
    Ok(())
}

fn make_dir_idempotent(path: &Path) -> Result<(), CgroupError> {
    match make_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes an empty group, retrying while the kernel still counts exiting processes
/// (EBUSY). A group that is already gone is fine.
fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    let started = Instant::now();
    loop {
        #[cfg(test)]
        tests::fake_kernel::depopulate(path);
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < KILL_TIMEOUT => {
                thread::sleep(POLL_INTERVAL);
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Parsing, and the v2 code paths against a FAKE cgroup tree: plain directories and
    //! files under the temp directory, where a test hook plays the kernel's part of
    //! populating each new group with its interface files. They check which files are
    //! written with what, not that a kernel enforces it (this machine's v2 hierarchy
    //! has no memory, pids or cpu controller). The real v1 tests are in tests/cgroup.rs.

    use super::*;

    /// The test-only stand-in for cgroupfs, active on the current thread only.
    pub(super) mod fake_kernel {
        use std::cell::Cell;
        use std::fs;
        use std::path::Path;

        thread_local!(static ACTIVE: Cell<bool> = const { Cell::new(false) });

        /// The interface files a v2 kernel creates in a new group with memory, pids
        /// and cpu enabled, with their initial contents.
        pub const V2_FILES: &[(&str, &str)] = &[
            ("cgroup.procs", ""),
            ("cgroup.controllers", "memory pids cpu\n"),
            ("cgroup.subtree_control", ""),
            ("cgroup.kill", ""),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.oom.group", "0\n"),
            ("memory.peak", "0\n"),
            ("memory.current", "0\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"),
            ("pids.max", "max\n"),
            ("pids.events", "max 0\n"),
            ("cpu.max", "max 100000\n"),
            ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"),
        ];

        pub struct Active;

        pub fn activate() -> Active {
            ACTIVE.with(|a| a.set(true));
            Active
        }

        impl Drop for Active {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(false));
            }
        }

        pub fn populate(dir: &Path) {
            if ACTIVE.with(Cell::get) {
                for (file, content) in V2_FILES {
                    fs::write(dir.join(file), content).expect("fake kernel: populate group");
                }
            }
        }

        /// The kernel removes a group's interface files with it; rmdir of a plain
        /// directory would fail with ENOTEMPTY.
        pub fn depopulate(dir: &Path) {
            if ACTIVE.with(Cell::get) {
                for (file, _) in V2_FILES {
                    let _ = fs::remove_file(dir.join(file));
                }
            }
        }
    }

    /// A temp directory holding a fake v2 mount; removed on drop, even on panic.
    struct FakeTree {
        dir: PathBuf,
        _kernel: fake_kernel::Active,
    }

    impl FakeTree {
        /// A fake cgroup2 mount at `<tmp>/cgroup` whose root group offers `controllers`
        /// and holds the daemon's group `daemon.service`.
        fn new(controllers: &str) -> FakeTree {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "airlock-cgroup-fake-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let base = dir.join("cgroup/daemon.service");
            fs::create_dir_all(&base).expect("create the fake tree");
            fs::write(base.join("cgroup.controllers"), controllers).expect("fake tree");
            fs::write(base.join("cgroup.subtree_control"), "").expect("fake tree");
            fs::write(base.join("cgroup.procs"), "").expect("fake tree");
            FakeTree {
                dir,
                _kernel: fake_kernel::activate(),
            }
        }

        fn base(&self) -> PathBuf {
            self.dir.join("cgroup/daemon.service")
        }

        fn probe(&self) -> Probe {
            let mountinfo = format!(
                "30 23 0:26 / {} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
                self.dir.join("cgroup").display()
            );
            probe_from("0::/daemon.service\n", &mountinfo).expect("probe the fake tree")
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn text(path: impl AsRef<Path>) -> String {
        fs::read_to_string(path.as_ref())
            .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
    }

    const LIMITS: CgroupLimits = CgroupLimits {
        memory_bytes: 64 << 20,
        pids: 16,
        cpu_quota_percent: 20,
    };

    /// This machine's layout: v1 controllers beside a v2 hierarchy with only hugetlb.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
8:pids:/docker/abc/x
4:memory:/process_api/3a7a
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn mountinfo_mounts_and_escapes() {
        let mounts = parse_mountinfo(
            "1 0 0:1 / /a\\040b rw - cgroup2 none rw\n2 0 0:2 / /x rw - ext4 /dev/sda rw\n",
        );
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].point, PathBuf::from("/a b"));
        assert_eq!(unescape("\\134x\\011"), "\\x\t");
        assert_eq!(unescape("\\9ab\\"), "\\9ab\\");
    }

    #[test]
    fn mount_root_maps_group_paths() {
        let m = Mount {
            root: "/docker/abc".into(),
            point: "/sys/fs/cgroup/pids".into(),
            fstype: "cgroup".into(),
            options: "rw,pids".into(),
        };
        assert_eq!(m.dir_of("/docker/abc"), Some("/sys/fs/cgroup/pids".into()));
        assert_eq!(
            m.dir_of("/docker/abc/x"),
            Some("/sys/fs/cgroup/pids/x".into())
        );
        assert_eq!(m.dir_of("/other"), None);
        let root = Mount {
            root: "/".into(),
            ..m
        };
        assert_eq!(root.dir_of("/../../x"), None);
    }

    /// The hybrid layout (no real v2 controllers, unified's cgroup.controllers is read
    /// from a fake mount point) chooses v1, with each controller's own group.
    #[test]
    fn hybrid_layout_chooses_v1() {
        let tree = FakeTree::new("hugetlb\n");
        let mountinfo =
            HYBRID_MOUNTINFO.replace("/sys/fs/cgroup/unified", &tree.base().display().to_string());
        let probe = probe_from(HYBRID_SELF, &mountinfo).expect("probe");
        assert_eq!(probe.choose().expect("choose"), CgroupVersion::V1);
        let v1 = |name: &str| {
            probe
                .controllers
                .iter()
                .find(|c| c.controller.name == name)
                .and_then(|c| c.v1.clone())
        };
        assert_eq!(
            v1("memory"),
            Some("/sys/fs/cgroup/memory/process_api/3a7a".into())
        );
        assert_eq!(v1("pids"), Some("/sys/fs/cgroup/pids/x".into()));
        assert_eq!(v1("cpu"), Some("/sys/fs/cgroup/cpu".into()));
        assert_eq!(v1("freezer"), None, "no freezer line in HYBRID_SELF");
        let report = probe.to_string();
        assert!(report.contains("memory   v2: no"), "{report}");
    }

    #[test]
    fn missing_controllers_are_named() {
        let mountinfo = HYBRID_MOUNTINFO.replace("rw,cpuacct\n", "rw,blkio\n");
        let probe =
            probe_from(HYBRID_SELF, &mountinfo.replace(" cgroup2 ", " tmpfs ")).expect("probe");
        let err = probe.choose().expect_err("cpuacct is missing").to_string();
        assert_eq!(
            err,
            "no usable cgroup hierarchy: cgroup v2 is not mounted; \
             cgroup v1 lacks the cpuacct controller(s)"
        );
        let tree = FakeTree::new("memory pids\n");
        let err = CgroupRoot::from_probe(tree.probe(), "airlock")
            .expect_err("cpu is missing")
            .to_string();
        assert!(
            err.contains("daemon.service lacks the cpu controller(s)"),
            "{err}"
        );
    }

    #[test]
    fn names_and_limits_are_checked() {
        for bad in ["", ".x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(
                matches!(check_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        check_name("call-12_a.b").expect("a good name");
        let err = check_limits(&CgroupLimits { pids: 0, ..LIMITS }).expect_err("pids 0");
        assert_eq!(
            err.to_string(),
            "invalid cgroup limit: pids must be at least 1, got 0"
        );
        check_limits(&LIMITS).expect("good limits");
    }

    /// FAKE v2 tree: detect enables the controllers in the daemon's group and in the
    /// parent it creates, idempotently.
    #[test]
    fn v2_detect_enables_controllers() {
        let tree = FakeTree::new("cpuset cpu io memory hugetlb pids rdma misc\n");
        let root = CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect");
        assert_eq!(root.version(), CgroupVersion::V2);
        assert_eq!(root.dirs(), vec![tree.base().join("airlock")]);
        assert_eq!(
            text(tree.base().join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            text(tree.base().join("airlock/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            root.features(),
            Features {
                swap_limit: true,
                oom_group_kill: true,
                kill_file: true,
                freezer: false
            }
        );
        // Again, as a restarted daemon: what is enabled is not written again.
        fs::write(tree.base().join("cgroup.subtree_control"), "memory pids\n").expect("fake");
        fs::write(
            tree.base().join("airlock/cgroup.subtree_control"),
            "cpu memory pids\n",
        )
        .expect("fake");
        CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect again");
        assert_eq!(text(tree.base().join("cgroup.subtree_control")), "+cpu");
        assert_eq!(
            text(tree.base().join("airlock/cgroup.subtree_control")),
            "cpu memory pids\n"
        );
    }

    /// FAKE v2 tree: create writes each limit file, exposes one procs file and a
    /// directory fd; stats, kill_all and remove read and write the v2 files.
    #[test]
    fn v2_create_stats_kill_remove() {
        let tree = FakeTree::new("cpu memory pids\n");
        let root = CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect");
        let call = root.create("call-1", &LIMITS).expect("create");
        let dir = tree.base().join("airlock/call-1");
        assert_eq!(text(dir.join("memory.max")), "67108864");
        assert_eq!(text(dir.join("memory.swap.max")), "0");
        assert_eq!(text(dir.join("memory.oom.group")), "1");
        assert_eq!(text(dir.join("pids.max")), "16");
        assert_eq!(text(dir.join("cpu.max")), "20000 100000");
        assert_eq!(call.procs_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(call.join(), CgroupJoin::V2 { dir: dir.clone() });

        assert!(matches!(
            root.create("call-1", &LIMITS),
            Err(CgroupError::Exists { .. })
        ));
        assert!(
            dir.exists(),
            "a failed create must not remove the existing group"
        );

        call.add_pid(4242).expect("add_pid");
        assert_eq!(text(dir.join("cgroup.procs")), "4242");
        assert_eq!(call.pids().expect("pids"), vec![4242]);
        fs::write(dir.join("cgroup.procs"), "").expect("fake: the pid left");

        fs::write(dir.join("memory.peak"), "67100672\n").expect("fake");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 31\noom 1\noom_kill 1\noom_group_kill 1\n",
        )
        .expect("fake");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 9\nnr_throttled 3\n",
        )
        .expect("fake");
        fs::write(dir.join("pids.events"), "max 2\n").expect("fake");
        assert_eq!(
            call.stats().expect("stats"),
            CgroupStats {
                memory_peak_bytes: 67_100_672,
                cpu_usage_usec: 2500,
                cpu_throttled_periods: 3,
                oom_killed: true,
                pids_limit_hit: true,
            }
        );

        call.kill_all().expect("kill_all");
        assert_eq!(text(dir.join("cgroup.kill")), "1");
        call.remove().expect("remove");
        assert!(!dir.exists());
    }

    /// FAKE v2 tree: without memory.swap.max (no swap accounting) and memory.peak
    /// (before 5.19), create skips the swap limit and features say so; stats falls back
    /// to memory.current.
    #[test]
    fn v2_without_optional_files() {
        let tree = FakeTree::new("cpu memory pids\n");
        CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect");
        fs::remove_file(tree.base().join("airlock/memory.swap.max")).expect("fake");
        let root = CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect again");
        assert!(!root.features().swap_limit);
        let call = root.create("c", &LIMITS).expect("create");
        let dir = tree.base().join("airlock/c");
        assert_eq!(text(dir.join("memory.swap.max")), "max\n", "left alone");
        fs::remove_file(dir.join("memory.peak")).expect("fake");
        fs::write(dir.join("memory.current"), "4096\n").expect("fake");
        assert_eq!(call.stats().expect("stats").memory_peak_bytes, 4096);
    }

    /// FAKE v2 tree: sweep removes the groups a crashed daemon left, and only those.
    #[test]
    fn v2_sweep_removes_leftovers() {
        let tree = FakeTree::new("cpu memory pids\n");
        let root = CgroupRoot::from_probe(tree.probe(), "airlock").expect("detect");
        std::mem::forget(root.create("old-1", &LIMITS).expect("create"));
        std::mem::forget(root.create("old-2", &LIMITS).expect("create"));
        let swept = root.sweep().expect("sweep");
        assert_eq!(swept, vec!["old-1".to_string(), "old-2".to_string()]);
        assert!(!tree.base().join("airlock/old-1").exists());
        assert!(
            tree.base().join("airlock/memory.max").exists(),
            "the parent's own files stay"
        );
        assert_eq!(root.sweep().expect("sweep again"), Vec::<String>::new());
    }

    #[test]
    fn v1_limit_writes() {
        let features = Features {
            swap_limit: true,
            oom_group_kill: false,
            kill_file: false,
            freezer: true,
        };
        let writes = limit_writes(CgroupVersion::V1, features, &LIMITS);
        let writes: Vec<(&str, &str, &str)> = writes
            .iter()
            .map(|(c, f, v)| (*c, *f, v.as_str()))
            .collect();
        assert_eq!(
            writes,
            vec![
                ("memory", "memory.limit_in_bytes", "67108864"),
                ("memory", "memory.memsw.limit_in_bytes", "67108864"),
                ("pids", "pids.max", "16"),
                ("cpu", "cpu.cfs_period_us", "100000"),
                ("cpu", "cpu.cfs_quota_us", "20000"),
            ]
        );
    }
}

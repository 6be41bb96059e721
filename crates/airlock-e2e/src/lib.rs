//! Fixtures for end-to-end tests: a temporary PostgreSQL cluster run as the `postgres`
//! OS user on a private port and socket, and `airlockd` with a temporary config. Both are
//! real processes, started and stopped by the test binary.
#![forbid(unsafe_code)]

use std::{
    fs,
    io::Write,
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::{chown, Pid, User},
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The `postgres` OS user.
pub fn postgres_user() -> User {
    User::from_name("postgres")
        .expect("reading the user database")
        .expect("the postgres OS user exists (PostgreSQL 15 is installed)")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local address").port()
}

/// A temporary cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub socket_dir: PathBuf,
    postmaster: Mutex<Child>,
}

impl Cluster {
    /// Creates and starts a cluster listening on 127.0.0.1 and a private socket, with
    /// the extension preloaded, pointed at `daemon_socket`, switched on if `enabled`.
    pub fn start(daemon_socket: &Path, enabled: bool) -> Cluster {
        let pg = postgres_user();
        let dir = tempfile::Builder::new()
            .prefix("airlock-e2e-pg-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let pgdata = dir.path().join("pgdata");
        let socket_dir = dir.path().join("run");
        for d in [&pgdata, &socket_dir] {
            fs::create_dir(d).expect("mkdir");
            chown(d, Some(pg.uid), Some(pg.gid)).expect("chown");
        }
        fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700)).expect("chmod");
        let out = as_postgres(&pg, "initdb")
            .arg("-D")
            .arg(&pgdata)
            .args([
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "-U",
                "postgres",
                "-A",
                "trust",
            ])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(pgdata.join("postgresql.conf"))
            .expect("postgresql.conf");
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'airlock'\nairlock.socket_path = '{}'\n\
             airlock.enabled = {}\nfsync = off\nmax_connections = 60\n",
            socket_dir.display(),
            daemon_socket.display(),
            if enabled { "on" } else { "off" }
        )
        .expect("writing postgresql.conf");
        let log = fs::File::create(dir.path().join("postgres.log")).expect("log");
        let postmaster = as_postgres(&pg, "postgres")
            .arg("-D")
            .arg(&pgdata)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        let cluster = Cluster {
            dir,
            port,
            socket_dir,
            postmaster: Mutex::new(postmaster),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cluster.try_connect("postgres", "postgres") {
                Ok(mut c) => {
                    c.batch_execute("CREATE EXTENSION airlock")
                        .expect("CREATE EXTENSION airlock");
                    break;
                }
                Err(e) if Instant::now() > deadline => panic!(
                    "cluster did not start: {e}; log:\n{}",
                    fs::read_to_string(cluster.dir.path().join("postgres.log")).unwrap_or_default()
                ),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
        cluster
    }

    pub fn config(&self, user: &str, db: &str) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    pub fn try_connect(&self, user: &str, db: &str) -> Result<postgres::Client, postgres::Error> {
        self.config(user, db).connect(postgres::NoTls)
    }

    /// Connects as `user`; notices land in the returned buffer.
    pub fn connect(&self, user: &str) -> (postgres::Client, Notices) {
        let notices: Notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let mut cfg = self.config(user, "postgres");
        cfg.notice_callback(move |n| {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(n.message().to_owned())
        });
        let client = cfg
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting as {user}: {e}"));
        (client, notices)
    }

    /// Path of the cluster's Unix socket file.
    pub fn socket_file(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// Fast shutdown; removes the cluster's directory.
    pub fn stop(&self) {
        let mut pm = self.postmaster.lock().unwrap_or_else(|e| e.into_inner());
        // SIGINT is PostgreSQL's fast shutdown.
        let _ = kill(Pid::from_raw(pm.id() as i32), Signal::SIGINT);
        let _ = pm.wait();
        let _ = fs::remove_dir_all(self.dir.path());
    }
}

pub type Notices = Arc<Mutex<Vec<String>>>;

fn as_postgres(pg: &User, program: &str) -> Command {
    let mut c = Command::new(Path::new(PG_BIN).join(program));
    c.uid(pg.uid.as_raw())
        .gid(pg.gid.as_raw())
        .env_remove("PGDATA")
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

/// Settings of a test daemon.
pub struct DaemonSettings {
    pub first_uid: u32,
    pub count: u32,
    pub wall_clock_seconds: f64,
    pub cpu_seconds: u64,
    pub memory_mib: u64,
    pub pids: u64,
    pub queue_timeout_seconds: f64,
}

/// A running airlockd with a temporary config and state directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub settings: DaemonSettings,
    child: Mutex<Child>,
}

/// The airlockd binary under test: $AIRLOCKD_BIN, else the workspace's release build.
pub fn airlockd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCKD_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("airlockd");
        if p.exists() {
            return p;
        }
    }
    panic!("airlockd not built: run `cargo build --release -p airlockd` or set AIRLOCKD_BIN")
}

/// The `airlock` command under test: $AIRLOCK_CLI_BIN, else the workspace's release build.
pub fn airlock_cli_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_CLI_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("airlock");
        if p.exists() {
            return p;
        }
    }
    panic!("airlock not built: run `cargo build --release -p airlock-cli` or set AIRLOCK_CLI_BIN")
}

/// Where the R runtime is installed.
pub fn r_prefix() -> String {
    std::env::var("AIRLOCK_R_PREFIX").unwrap_or_else(|_| "/opt/airlock/runtimes/r".into())
}

/// Where the Python runtime is installed.
pub fn python_prefix() -> String {
    std::env::var("AIRLOCK_PYTHON_PREFIX").unwrap_or_else(|_| "/opt/airlock/runtimes/python".into())
}

impl Daemon {
    pub fn start(settings: DaemonSettings) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("airlock-e2e-d-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = dir.path().join("airlockd.sock");
        let state_dir = dir.path().join("state");
        let config = dir.path().join("airlockd.toml");
        fs::write(
            &config,
            format!(
                "socket_path = \"{}\"\nallowed_peer_uids = [{}]\nstate_dir = \"{}\"\n\
                 [workers]\nfirst_uid = {}\ncount = {}\ngid = {}\nqueue_timeout_seconds = {}\n\
                 [limits]\nwall_clock_seconds = {}\ncpu_seconds = {}\nmemory_mib = {}\npids = {}\nsession_size_mib = 64\ntmp_size_mib = 64\n\
                 [runtimes.python]\nprefix = \"{}\"\n[runtimes.r]\nprefix = \"{}\"\n",
                socket.display(),
                postgres_user().uid,
                state_dir.display(),
                settings.first_uid,
                settings.count,
                settings.first_uid,
                settings.queue_timeout_seconds,
                settings.wall_clock_seconds,
                settings.cpu_seconds,
                settings.memory_mib,
                settings.pids,
                python_prefix(),
                r_prefix(),
            ),
        )
        .expect("writing config");
        let log = fs::File::create(dir.path().join("airlockd.log")).expect("log");
        let child = Command::new(airlockd_bin())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting airlockd");
        let d = Daemon {
            dir,
            socket,
            state_dir,
            settings,
            child: Mutex::new(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "airlockd did not start; log:\n{}",
                d.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("airlockd.log")).unwrap_or_default()
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
    }

    /// The audit log (the config leaves `audit_log` at its default).
    pub fn audit_log(&self) -> PathBuf {
        self.state_dir.join("audit.jsonl")
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Kills the daemon with SIGKILL (a crash: no cleanup of its own) and waits for it.
    pub fn crash(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }

    /// Starts the daemon again with the same config and state directory, appending to
    /// the same log; returns once its socket answers connections.
    pub fn restart(&self) {
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("airlockd.log"))
            .expect("log");
        let child = Command::new(airlockd_bin())
            .arg("--config")
            .arg(self.dir.path().join("airlockd.toml"))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restarting airlockd");
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = child;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "airlockd did not restart; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon with SIGTERM; removes its directory.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let _ = child.wait();
        let _ = fs::remove_dir_all(self.dir.path());
    }
}

/// A client error as a test failure message: the server's message, SQLSTATE, DETAIL and
/// HINT, or the client-side error.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} (SQLSTATE {}) detail: {:?} hint: {:?}",
            db.message(),
            db.code().code(),
            db.detail(),
            db.hint()
        ),
        None => e.to_string(),
    }
}

/// Ends a suite's run: the daemon's log if a case `failed`, then the cluster and the
/// daemon stopped whatever happened, so nothing outlives the run.
pub fn stop_suite(cluster: &Cluster, daemon: &Daemon, failed: bool) {
    if failed {
        eprintln!("---- airlockd log ----\n{}", daemon.log());
    }
    cluster.stop();
    daemon.stop();
}

/// Waits up to `limit` for `cond`; returns whether it became true.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// The session folder (`/sessions/<uuid>`) a call's script printed as a NOTICE, waiting
/// up to `limit` for it to arrive.
pub fn printed_folder(notices: &Notices, limit: Duration) -> Option<String> {
    let mut cwd = None;
    eventually(limit, || {
        cwd = notices
            .lock()
            .ok()
            .and_then(|n| n.iter().find(|l| l.starts_with("/sessions/")).cloned());
        cwd.is_some()
    });
    cwd
}

//! The local default: one cluster and one daemon under a directory of the user's.

use std::{
    fs,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use airlock_protocol::{
    control::{Reply, Request},
    encode_control, FrameDecoder, PROTOCOL_VERSION,
};
use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::{chown, Pid, User},
};

/// Port of the local cluster; it listens on a Unix socket only, so this just names it.
const PORT: u16 = 5439;
const DATABASE: &str = "airlock";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const RUNTIME_PREFIX: &str = "/opt/airlock/runtimes/python";
const R_RUNTIME_PREFIX: &str = "/opt/airlock/runtimes/r";

pub struct Local {
    dir: PathBuf,
    postgres: User,
}

impl Local {
    pub fn new(dir: &Path) -> Result<Local> {
        let dir = if dir.is_absolute() {
            dir.to_owned()
        } else {
            std::env::current_dir()?.join(dir)
        };
        let postgres = User::from_name("postgres")?.context(
            "no `postgres` OS user: install PostgreSQL 15 (apt-get install postgresql-15)",
        )?;
        Ok(Local { dir, postgres })
    }

    fn pgdata(&self) -> PathBuf {
        self.dir.join("pgdata")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn daemon_socket(&self) -> PathBuf {
        self.run_dir().join("airlockd.sock")
    }
    fn daemon_pidfile(&self) -> PathBuf {
        self.dir.join("airlockd.pid")
    }
    fn daemon_config(&self) -> PathBuf {
        self.dir.join("airlockd.toml")
    }

    fn uri(&self) -> String {
        format!(
            "postgresql://postgres@/{DATABASE}?host={}&port={PORT}",
            self.run_dir().display()
        )
    }

    /// A command run as the `postgres` OS user (Postgres refuses to run as root).
    fn as_postgres(&self, program: &str) -> Command {
        let mut c = Command::new(Path::new(PG_BIN).join(program));
        c.uid(self.postgres.uid.as_raw())
            .gid(self.postgres.gid.as_raw())
            .env("HOME", &self.dir)
            .env_remove("PGDATA")
            .current_dir(&self.dir);
        c
    }

    fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = self
            .as_postgres("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.run_dir())
            .args([
                "-p",
                &PORT.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed on {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn cluster_running(&self) -> bool {
        self.pgdata().join("PG_VERSION").exists()
            && self
                .as_postgres("pg_ctl")
                .arg("status")
                .arg("-D")
                .arg(self.pgdata())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    }

    fn daemon_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.daemon_pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        kill(Pid::from_raw(pid), None).ok().map(|_| pid)
    }

    pub fn start(&self) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            bail!("`airlock local start` must run as root: it starts airlockd (which creates namespaces) and runs Postgres as the postgres user");
        }
        fs::create_dir_all(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))?;
        self.check_reachable_by_postgres()?;
        let run = self.run_dir();
        fs::create_dir_all(&run)?;
        // Only root and postgres may reach the sockets: the cluster trusts local
        // connections, so the directory itself is the access control.
        fs::set_permissions(&run, fs::Permissions::from_mode(0o750))?;
        chown(&run, Some(self.postgres.uid), Some(self.postgres.gid))?;

        self.init_cluster()?;
        self.write_daemon_config()?;
        self.start_daemon()?;
        self.start_cluster()?;
        self.create_extension()?;
        println!("airlock: local cluster in {}", self.pgdata().display());
        println!(
            "airlock: airlockd log in {}",
            self.dir.join("airlockd.log").display()
        );
        println!("{}", self.uri());
        Ok(())
    }

    fn check_reachable_by_postgres(&self) -> Result<()> {
        let mut p = self.dir.as_path();
        while let Some(parent) = p.parent() {
            let mode = fs::metadata(parent)?.permissions().mode();
            if mode & 0o001 == 0 {
                bail!(
                    "{} is not searchable by other users (mode {:o}), so the postgres user cannot reach {}; use --dir somewhere else",
                    parent.display(),
                    mode & 0o777,
                    self.dir.display()
                );
            }
            p = parent;
        }
        Ok(())
    }

    fn init_cluster(&self) -> Result<()> {
        let pgdata = self.pgdata();
        if pgdata.join("PG_VERSION").exists() {
            return Ok(());
        }
        fs::create_dir_all(&pgdata)?;
        chown(&pgdata, Some(self.postgres.uid), Some(self.postgres.gid))?;
        fs::set_permissions(&pgdata, fs::Permissions::from_mode(0o700))?;
        let out = self
            .as_postgres("initdb")
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
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = pgdata.join("postgresql.conf");
        let mut f = fs::OpenOptions::new().append(true).open(&conf)?;
        writeln!(f, "\ninclude_if_exists = 'airlock_local.conf'")?;
        Ok(())
    }

    fn write_daemon_config(&self) -> Result<()> {
        // The cluster's own settings: private socket, no TCP, the extension preloaded and
        // pointed at this daemon. Rewritten at every start.
        let conf = format!(
            "listen_addresses = ''\n\
             port = {PORT}\n\
             unix_socket_directories = '{run}'\n\
             shared_preload_libraries = 'airlock'\n\
             airlock.socket_path = '{sock}'\n",
            run = self.run_dir().display(),
            sock = self.daemon_socket().display(),
        );
        let path = self.pgdata().join("airlock_local.conf");
        fs::write(&path, conf)?;
        chown(&path, Some(self.postgres.uid), Some(self.postgres.gid))?;

        let daemon = format!(
            "# airlockd config written by `airlock local start`.\n\
             socket_path = \"{sock}\"\n\
             allowed_peer_uids = [{uid}]\n\
             state_dir = \"{state}\"\n\
             \n\
             [workers]\n\
             first_uid = 61000\n\
             count = 20\n\
             gid = 61000\n\
             \n\
             [limits]\n\
             wall_clock_seconds = 60\n\
             \n\
             [runtimes.python]\n\
             prefix = \"{RUNTIME_PREFIX}\"\n\
             \n\
             [runtimes.r]\n\
             prefix = \"{R_RUNTIME_PREFIX}\"\n",
            sock = self.daemon_socket().display(),
            uid = self.postgres.uid,
            state = self.dir.join("state").display(),
        );
        fs::write(self.daemon_config(), daemon)?;
        Ok(())
    }

    fn start_daemon(&self) -> Result<()> {
        if let Some(pid) = self.daemon_pid() {
            if self.ping().is_ok() {
                println!("airlock: airlockd already running (pid {pid})");
                return Ok(());
            }
        }
        let exe = which_airlockd()?;
        let log = fs::File::create(self.dir.join("airlockd.log"))?;
        let child = Command::new(&exe)
            .arg("--config")
            .arg(self.daemon_config())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        fs::write(self.daemon_pidfile(), child.id().to_string())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.ping() {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "airlockd did not come up: {e}; see {}",
                        self.dir.join("airlockd.log").display()
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
        println!("airlock: airlockd started (pid {})", child.id());
        Ok(())
    }

    fn start_cluster(&self) -> Result<()> {
        if self.cluster_running() {
            // Pick up a rewritten airlock_local.conf.
            self.psql("postgres", "SELECT pg_reload_conf()")?;
            println!("airlock: cluster already running");
            return Ok(());
        }
        let out = self
            .as_postgres("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.pgdata())
            .arg("-l")
            .arg(self.pgdata().join("postgres.log"))
            .args(["-w", "-t", "60"])
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}; see {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.pgdata().join("postgres.log").display()
            );
        }
        println!("airlock: cluster started");
        Ok(())
    }

    fn create_extension(&self) -> Result<()> {
        let exists = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"),
        )?;
        if exists.is_empty() {
            self.psql("postgres", &format!("CREATE DATABASE {DATABASE}"))?;
        }
        self.psql(DATABASE, "CREATE EXTENSION IF NOT EXISTS airlock")?;
        self.psql(DATABASE, "ALTER SYSTEM SET airlock.enabled = on")?;
        self.psql(DATABASE, "SELECT pg_reload_conf()")?;
        Ok(())
    }

    pub fn status(&self) -> Result<()> {
        let cluster = self.cluster_running();
        let daemon = self.daemon_pid();
        let daemon_ok = daemon.is_some() && self.ping().is_ok();
        println!("cluster: {}", if cluster { "running" } else { "stopped" });
        match daemon {
            Some(pid) if daemon_ok => println!("airlockd: running (pid {pid})"),
            Some(pid) => println!("airlockd: process {pid} exists but does not answer"),
            None => println!("airlockd: stopped"),
        }
        if cluster && daemon_ok {
            println!("{}", self.uri());
            Ok(())
        } else {
            bail!("local Airlock is not fully running; `airlock local start` starts it")
        }
    }

    /// Says hello to the daemon as the postgres user: the daemon answers only the
    /// uids in its allowed_peer_uids, and this also proves Postgres can reach the socket.
    fn ping(&self) -> Result<()> {
        let me = std::env::current_exe().context("locating the airlock binary")?;
        let out = Command::new(me)
            .arg("__ping")
            .arg(self.daemon_socket())
            .uid(self.postgres.uid.as_raw())
            .gid(self.postgres.gid.as_raw())
            .current_dir("/")
            .output()
            .context("running airlock __ping")?;
        if out.status.success() {
            Ok(())
        } else {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
        }
    }

    pub fn stop(&self) -> Result<()> {
        if self.cluster_running() {
            let out = self
                .as_postgres("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(self.pgdata())
                .args(["-m", "fast", "-w"])
                .output()?;
            if !out.status.success() {
                bail!(
                    "pg_ctl stop failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            println!("airlock: cluster stopped");
        } else {
            println!("airlock: cluster not running");
        }
        if let Some(pid) = self.daemon_pid() {
            kill(Pid::from_raw(pid), Signal::SIGTERM)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if kill(Pid::from_raw(pid), None).is_ok() {
                kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            }
            let _ = fs::remove_file(self.daemon_pidfile());
            println!("airlock: airlockd stopped");
        } else {
            println!("airlock: airlockd not running");
        }
        Ok(())
    }
}

/// airlockd beside this binary, else on PATH.
fn which_airlockd() -> Result<PathBuf> {
    if let Ok(me) = std::env::current_exe() {
        let beside = me.with_file_name("airlockd");
        if beside.exists() {
            return Ok(beside);
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("airlockd");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("airlockd not found beside `airlock` or on PATH; run ./install.sh")
}

/// Says hello to the daemon; Ok if it answers with our protocol version.
pub fn hello(socket: &Path) -> Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(&encode_control(&Request::Hello {
        version: PROTOCOL_VERSION,
        client: "airlock cli".into(),
    })?)?;
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame()? {
            return match f.control::<Reply>()? {
                Reply::Hello { .. } => Ok(()),
                other => bail!("daemon answered {other:?}"),
            };
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("daemon closed the connection");
        }
        dec.extend(&buf[..n]);
    }
}

//! `airlockd` entry point: parse flags, start the spawner helper, serve.
#![forbid(unsafe_code)]

use std::{os::unix::fs::PermissionsExt, path::PathBuf, sync::Arc};

use anyhow::{bail, Context};
use clap::Parser;

use airlockd::{audit, config::Config, enforcement, server, session, spawner};

/// Airlock's launcher daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, short, default_value = "/etc/airlock/airlockd.toml")]
    config: PathBuf,
    /// Print which isolation layers this kernel enforces, and exit (1 if any is missing
    /// and not waived by the config, when the config can be read).
    #[arg(long)]
    check: bool,
    /// Internal: run as the single-threaded sandbox spawner on fd 3.
    #[arg(hide = true)]
    mode: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if args.mode.as_deref() == Some("__spawner") {
        spawner::helper_main().context("spawner")?;
        return Ok(());
    } else if let Some(mode) = args.mode {
        bail!("unknown argument {mode:?}");
    }

    if !nix::unistd::geteuid().is_root() {
        bail!("airlockd must run as root: it creates namespaces and switches to worker uids");
    }
    if args.check {
        return check(&args.config);
    }
    let config = Arc::new(Config::load(&args.config)?);
    // First of all: one daemon per state directory, or the sweeps below would remove
    // another daemon's live calls.
    let _state_lock = session::lock_state_dir(&config)
        .with_context(|| format!("locking state directory {}", config.state_dir.display()))?;
    // Every layer enforced, or explicitly waived: never a silent downgrade.
    let lines = enforcement::report();
    for line in enforcement::require(&config, &lines)? {
        tracing::warn!(layer = %line.layer, detail = %line.detail, "isolation layer WAIVED by the config: sandboxes run without it");
    }
    let cgroups = enforcement::cgroups(&config, &lines)?;
    session::prepare_state_dir(&config)
        .with_context(|| format!("preparing state directory {}", config.state_dir.display()))?;
    // Opened before anything runs: a daemon that cannot keep its audit log does not start.
    let audit_file = audit::AuditFile::open(&config.audit_log_path())?;

    // Before any thread exists: start the helper that builds sandboxes.
    let exe = std::env::current_exe().context("locating our own executable")?;
    let helper = spawner::launch(&exe)?;
    let (audit_log, audit_writer) = audit_file.start()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    // Set when the spawner helper dies: the daemon then shuts down the orderly way, so
    // the calls in flight end and their audit records are written.
    let spawner_gone = Arc::new(tokio::sync::Notify::new());
    let lost_spawner = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = rt.block_on({
        let spawner_gone = spawner_gone.clone();
        let lost_spawner = lost_spawner.clone();
        async move {
            let notify = spawner_gone.clone();
            let handle = spawner::SpawnerHandle::start(helper.sock, move || {
                tracing::error!("the sandbox spawner exited; airlockd cannot continue");
                lost_spawner.store(true, std::sync::atomic::Ordering::SeqCst);
                notify.notify_one();
            })?;
            // Warm starts: the pre-initialised interpreters start importing now.
            for (language, runtime) in &config.runtimes {
                if runtime.warm_pool(*language) > 0 {
                    if let Some(spec) = airlockd::runtime::warm_spec(*language, runtime) {
                        handle.prepare(spec);
                    }
                }
            }
            let listener = bind(&config.socket_path)?;
            let monitor = Arc::new(airlockd::monitor::Monitor::default());
            let daemon = Arc::new(server::Daemon::new(
                config.clone(),
                handle,
                cgroups,
                audit_log.with_monitor(monitor.clone()),
                monitor,
            ));
            server::start_preparing(&daemon);
            tracing::info!(socket = %config.socket_path.display(), "airlockd listening");
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing a SIGTERM handler cannot fail in a fresh runtime");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                    _ = spawner_gone.notified() => {}
                }
            };
            server::serve(listener, daemon.clone(), shutdown).await;
            airlockd::prepared::discard_all(&daemon).await;
            let _ = std::fs::remove_file(&config.socket_path);
            anyhow::Ok(())
        }
    });
    // Dropping the event loop drops every call still running, and with them the last
    // handles on the audit log; then the writer has written everything queued.
    drop(rt);
    audit_writer.finish();
    served?;
    if lost_spawner.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("the sandbox spawner exited");
    }
    Ok(())
}

/// `airlockd --check`: the report, and whether the daemon would start.
fn check(config_path: &std::path::Path) -> anyhow::Result<()> {
    let lines = enforcement::report();
    for line in &lines {
        println!("{line}");
    }
    match Config::load(config_path) {
        Ok(config) => match enforcement::require(&config, &lines) {
            Ok(waived) => {
                for line in waived {
                    println!("waived by {}: {}", config_path.display(), line.layer);
                }
                println!("airlockd would start with {}", config_path.display());
                Ok(())
            }
            Err(e) => bail!("airlockd would refuse to start: {e}"),
        },
        Err(e) => {
            println!("(config not checked: {e})");
            if lines.iter().all(|l| l.enforced) {
                Ok(())
            } else {
                bail!("some layers are not enforced on this kernel")
            }
        }
    }
}

fn bind(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a crashed daemon; a live daemon would still answer on it.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another airlockd is already listening on {}",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    // Anyone may connect; only allowed_peer_uids get an answer (SO_PEERCRED).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

//! `airlock`: the command-line tool.
//!
//! `airlock audit verify [FILE]` checks the hash chain of `airlockd`'s audit log and
//! names the first broken record.
//!
//! `airlock local start|status|stop` runs a complete Airlock on this machine for trying it
//! out: a Postgres cluster under `./.airlock/` (run as the `postgres` OS user, reachable
//! only through a private Unix socket), the extension installed, created and enabled, and
//! `airlockd` in the background. The last line `start` prints is a libpq URI.
#![forbid(unsafe_code)]

mod audit;
mod local;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Airlock: sandboxed scripts next to your data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: say hello to a daemon socket (run as the postgres user by `local`).
    #[command(name = "__ping", hide = true)]
    Ping { socket: std::path::PathBuf },
    /// A local cluster and daemon for trying Airlock.
    Local {
        #[command(subcommand)]
        action: LocalAction,
        /// Where the local setup lives.
        #[arg(long, global = true, default_value = ".airlock")]
        dir: std::path::PathBuf,
    },
    /// The daemon's audit log.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check the log's hash chain: exit 0 if intact, 1 naming the first broken record.
    Verify {
        /// The log (for `airlock local`: .airlock/state/audit.jsonl).
        #[arg(default_value = audit::DEFAULT_LOG)]
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum LocalAction {
    /// Create (or reuse) the cluster, start it and airlockd; print a connection URI.
    Start,
    /// Say whether the cluster and the daemon are running.
    Status,
    /// Stop the cluster and the daemon.
    Stop,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Ping { socket } => local::hello(&socket),
        Command::Local { action, dir } => {
            let local = local::Local::new(&dir)?;
            match action {
                LocalAction::Start => local.start(),
                LocalAction::Status => local.status(),
                LocalAction::Stop => local.stop(),
            }
        }
        Command::Audit {
            action: AuditAction::Verify { file },
        } => {
            if !audit::verify(&file)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

//! The daemon's side of the sandbox spawner.
//!
//! The daemon is multithreaded (tokio), and forking a multithreaded process for anything
//! but an immediate exec is unsafe. So at start, before the event loop exists, the daemon
//! re-executes itself as `airlockd __spawner`: a single-threaded helper that builds every
//! sandbox (`airlock_sandbox::run_spawner`). This module launches it and multiplexes
//! requests and exit notices over one socketpair.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
};

use airlock_protocol::{
    encode_control,
    spawner::{ExitStatus, FromSpawner, SpawnRequest, ToSpawner, WarmSpec},
    FrameDecoder,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};

use crate::sys;

/// Errors talking to the spawner.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("cannot create the spawner socketpair: {0}")]
    Socketpair(nix::Error),
    #[error("cannot start the spawner helper {exe}: {source}")]
    Launch { exe: String, source: io::Error },
    #[error("the spawner helper is gone")]
    Gone,
    #[error("sandbox could not be created: {0}")]
    Spawn(String),
}

/// Body of `airlockd __spawner`: the single-threaded loop building sandboxes, on the
/// socket the daemon passed as fd 3.
pub fn helper_main() -> Result<(), airlock_sandbox::SandboxError> {
    airlock_sandbox::run_spawner(sys::take_fd_3())
}

/// The running helper process and the daemon's end of its socket.
pub struct SpawnerProcess {
    pub child: Child,
    pub sock: OwnedFd,
}

/// Starts `exe __spawner` with the other end of a socketpair as its fd 3. Call this
/// before starting any thread.
pub fn launch(exe: &Path) -> Result<SpawnerProcess, SpawnerError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(SpawnerError::Socketpair)?;
    let mut cmd = Command::new(exe);
    cmd.arg("__spawner")
        .env_clear()
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_default())
        .stdin(Stdio::null());
    sys::pass_fd_as_3(&mut cmd, theirs.as_raw_fd());
    let child = cmd.spawn().map_err(|source| SpawnerError::Launch {
        exe: exe.display().to_string(),
        source,
    })?;
    drop(theirs);
    Ok(SpawnerProcess { child, sock: ours })
}

/// A sandbox that the spawner reported as started.
pub struct Started {
    pub pid: i32,
    /// Cloned from a pre-initialised interpreter (the warm path) rather than exec'd.
    pub warm: bool,
    /// Resolves when the sandbox's init has exited and been reaped.
    pub exited: oneshot::Receiver<ExitStatus>,
}

enum Command_ {
    Spawn {
        req: Box<SpawnRequest>,
        fd: OwnedFd,
        started: oneshot::Sender<Result<(i32, bool), String>>,
        exited: oneshot::Sender<ExitStatus>,
    },
    Prepare(WarmSpec),
    Kill {
        call_id: u64,
    },
}

/// Cheap, cloneable handle used by connection tasks.
#[derive(Clone)]
pub struct SpawnerHandle {
    tx: mpsc::UnboundedSender<Command_>,
    /// How many times a pre-initialised interpreter reported ready or unavailable.
    warm: watch::Receiver<u64>,
}

impl SpawnerHandle {
    /// Starts the task that owns the spawner socket. Must run inside the tokio runtime.
    /// `on_gone` runs if the helper dies: the daemon cannot work without it.
    pub fn start(sock: OwnedFd, on_gone: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(io::Error::from)?;
        let afd = sys::async_fd(sock)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (warm_tx, warm) = watch::channel(0);
        tokio::spawn(async move {
            if let Err(e) = pump(afd, rx, warm_tx).await {
                tracing::error!(error = %e, "lost the sandbox spawner");
            }
            on_gone();
        });
        Ok(SpawnerHandle { tx, warm })
    }

    /// Resolves once a pre-initialised interpreter has reported, ready or unavailable
    /// (at once if one already has), or when the spawner is gone.
    pub async fn warm_reported(&self) {
        let mut warm = self.warm.clone();
        let _ = warm.wait_for(|n| *n > 0).await;
    }

    /// Asks for a sandbox; `fd` becomes its fd 3.
    pub async fn spawn(&self, req: SpawnRequest, fd: OwnedFd) -> Result<Started, SpawnerError> {
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.tx
            .send(Command_::Spawn {
                req: Box::new(req),
                fd,
                started: started_tx,
                exited: exited_tx,
            })
            .map_err(|_| SpawnerError::Gone)?;
        match started_rx.await {
            Ok(Ok((pid, warm))) => Ok(Started {
                pid,
                warm,
                exited: exited_rx,
            }),
            Ok(Err(msg)) => Err(SpawnerError::Spawn(msg)),
            Err(_) => Err(SpawnerError::Gone),
        }
    }

    /// Starts the pre-initialised interpreter of `spec` now, so the first call is warm
    /// too. Until it is ready, calls start cold.
    pub fn prepare(&self, spec: WarmSpec) {
        let _ = self.tx.send(Command_::Prepare(spec));
    }

    /// Kills the whole sandbox of `call_id`; its exit arrives on the `exited` receiver.
    pub fn kill(&self, call_id: u64) {
        let _ = self.tx.send(Command_::Kill { call_id });
    }
}

struct Pending {
    started: Option<oneshot::Sender<Result<(i32, bool), String>>>,
    exited: oneshot::Sender<ExitStatus>,
}

async fn pump(
    afd: AsyncFd<OwnedFd>,
    mut rx: mpsc::UnboundedReceiver<Command_>,
    warm: watch::Sender<u64>,
) -> Result<(), SpawnerError> {
    let mut calls: HashMap<u64, Pending> = HashMap::new();
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { return Ok(()) };
                match cmd {
                    Command_::Spawn { req, fd, started, exited } => {
                        let call_id = req.call_id;
                        let frame = encode_control(&ToSpawner::Spawn(req))
                            .map_err(|e| SpawnerError::Spawn(e.to_string()))?;
                        send(&afd, &frame, Some(&fd)).await?;
                        drop(fd);
                        calls.insert(call_id, Pending { started: Some(started), exited });
                    }
                    Command_::Prepare(spec) => {
                        let frame = encode_control(&ToSpawner::Prepare(spec))
                            .map_err(|e| SpawnerError::Spawn(e.to_string()))?;
                        send(&afd, &frame, None).await?;
                    }
                    Command_::Kill { call_id } => {
                        let frame = encode_control(&ToSpawner::Kill { call_id })
                            .map_err(|e| SpawnerError::Spawn(e.to_string()))?;
                        send(&afd, &frame, None).await?;
                    }
                }
            }
            ready = afd.readable() => {
                let mut guard = ready.map_err(|_| SpawnerError::Gone)?;
                let res = guard.try_io(|inner| {
                    sys::recv_with_fds(inner.get_ref().as_fd(), &mut buf).map_err(io::Error::from)
                });
                let n = match res {
                    Err(_would_block) => continue,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading from the spawner");
                        return Err(SpawnerError::Gone);
                    }
                    Ok(Ok((0, _))) => return Err(SpawnerError::Gone),
                    Ok(Ok((n, _fds))) => n,
                };
                dec.extend(&buf[..n]);
                while let Some(frame) = dec.next_frame().map_err(|e| SpawnerError::Spawn(e.to_string()))? {
                    let msg: FromSpawner = frame.control().map_err(|e| SpawnerError::Spawn(e.to_string()))?;
                    dispatch(&mut calls, msg, &warm);
                }
            }
        }
    }
}

fn dispatch(calls: &mut HashMap<u64, Pending>, msg: FromSpawner, warm: &watch::Sender<u64>) {
    match msg {
        FromSpawner::Spawned { call_id, pid, warm } => {
            if let Some(p) = calls.get_mut(&call_id) {
                if let Some(tx) = p.started.take() {
                    let _ = tx.send(Ok((pid, warm)));
                }
            }
        }
        FromSpawner::SpawnFailed { call_id, error } => {
            if let Some(mut p) = calls.remove(&call_id) {
                if let Some(tx) = p.started.take() {
                    let _ = tx.send(Err(error));
                }
            }
        }
        FromSpawner::Exited { call_id, status } => {
            if let Some(p) = calls.remove(&call_id) {
                let _ = p.exited.send(status);
            }
        }
        FromSpawner::Warm {
            program,
            ready: true,
            detail,
        } => {
            tracing::info!(%program, %detail, "warm starts ready");
            warm.send_modify(|n| *n += 1);
        }
        FromSpawner::Warm {
            program,
            ready: false,
            detail,
        } => {
            tracing::warn!(%program, %detail, "warm starts unavailable");
            warm.send_modify(|n| *n += 1);
        }
    }
}

async fn send(
    afd: &AsyncFd<OwnedFd>,
    frame: &[u8],
    fd: Option<&OwnedFd>,
) -> Result<(), SpawnerError> {
    let raw: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        let mut guard = afd.writable().await.map_err(|_| SpawnerError::Gone)?;
        match guard.try_io(|inner| {
            sys::send_with_fds(inner.get_ref().as_fd(), frame, &raw).map_err(io::Error::from)
        }) {
            Err(_would_block) => continue,
            Ok(Ok(n)) if n == frame.len() => return Ok(()),
            Ok(Ok(_)) | Ok(Err(_)) => return Err(SpawnerError::Gone),
        }
    }
}

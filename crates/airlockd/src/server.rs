//! The listener and one task per connection.
//!
//! The listener and the shutdown signal are passed in, so tests can run a daemon
//! in-process on a private socket.

use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::monitor::Monitor;
use crate::pool::{CallerKey, Lease, WorkerPool};
use crate::prepared::{self, Built, Prepared};
use airlock_protocol::{
    control::{Language, Outcome, RefusalKind, Reply, Request},
    encode_control,
    spawner::ExitStatus,
    FrameDecoder, PROTOCOL_VERSION,
};
use airlock_sandbox::cgroup::CgroupRoot;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    audit::{AuditLog, CallRecord},
    config::Config,
    runtime,
    spawner::SpawnerHandle,
    sys,
};

/// Shared state of a running daemon.
pub struct Daemon {
    pub config: Arc<Config>,
    pub spawner: SpawnerHandle,
    /// Where per-call cgroups are made; None only when the operator waived cgroups and
    /// this host has none.
    pub cgroups: Option<CgroupRoot>,
    pub pool: WorkerPool,
    /// Where each call's audit record goes.
    pub audit: AuditLog,
    /// Running calls and counters, for the monitoring views.
    pub monitor: Arc<Monitor>,
    /// Sandboxes built ahead of their calls.
    pub prepared: Prepared,
    next_call: AtomicU64,
}

impl Daemon {
    pub fn new(
        config: Arc<Config>,
        spawner: SpawnerHandle,
        cgroups: Option<CgroupRoot>,
        audit: AuditLog,
        monitor: Arc<Monitor>,
    ) -> Self {
        let pool = WorkerPool::new(config.workers.first_uid..=config.last_worker_uid());
        Daemon {
            config,
            spawner,
            cgroups,
            pool,
            audit,
            monitor,
            prepared: Prepared::default(),
            next_call: AtomicU64::new(1),
        }
    }

    /// A new call id: names a sandbox in the spawner's messages.
    pub fn next_call_id(&self) -> u64 {
        self.next_call.fetch_add(1, Ordering::Relaxed)
    }
}

/// Starts preparing sandboxes for the first worker uid (the one the pool hands out
/// first), for each language that prepares any, each language on its own. A language
/// with a warm path first waits for its pre-initialised interpreter to report (ready or
/// not, up to `WARM_WAIT`), so its prepared sandboxes are cloned from it rather than
/// started cold.
pub fn start_preparing(daemon: &Arc<Daemon>) {
    const WARM_WAIT: Duration = Duration::from_secs(60);
    let uid = daemon.config.workers.first_uid;
    for (language, rt) in &daemon.config.runtimes {
        if rt.prepared(*language) == 0 {
            continue;
        }
        let language = *language;
        let warm = rt.warm_pool(language) > 0 && runtime::warm_spec(language, rt).is_some();
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if warm {
                let _ = tokio::time::timeout(WARM_WAIT, daemon.spawner.warm_reported()).await;
            }
            prepared::refill(&daemon, language, uid);
        });
    }
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                return;
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of fds, say: back off instead of spinning on the error.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, daemon).await {
                        tracing::warn!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}

/// How often a running call's CPU time is read.
const CPU_POLL: Duration = Duration::from_millis(200);

/// How long, after the sandbox is gone, to wait for the backend's `Report` (it sends it
/// once it has read all the output, which may still be in the socket) before writing the
/// audit record without row counts.
const REPORT_WAIT: Duration = Duration::from_secs(60);

/// How long a runtime may take to exit once the backend has every row and has hung up;
/// the shim exits at once after `done`, so only a script that keeps the process alive
/// meets this.
const FINISHED_GRACE: Duration = Duration::from_secs(2);

/// Errors on one connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("peer credentials unavailable: {0}")]
    PeerCred(io::Error),
    #[error("peer uid {0} is not in allowed_peer_uids")]
    PeerNotAllowed(u32),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] airlock_protocol::ProtocolError),
    #[error("peer closed the connection")]
    Closed,
}

/// A control connection with frame buffering.
struct Conn {
    stream: UnixStream,
    dec: FrameDecoder,
}

impl Conn {
    async fn read(&mut self) -> Result<Request, ConnError> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(frame) = self.dec.next_frame()? {
                return Ok(frame.control()?);
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.dec.extend(&buf[..n]);
        }
    }

    async fn write(&mut self, reply: &Reply) -> Result<(), ConnError> {
        self.stream.write_all(&encode_control(reply)?).await?;
        Ok(())
    }

    /// Writes `reply` with `fd` attached as SCM_RIGHTS.
    async fn write_with_fd(&mut self, reply: &Reply, fd: &OwnedFd) -> Result<(), ConnError> {
        let frame = encode_control(reply)?;
        let raw = [fd.as_raw_fd()];
        let mut sent = 0;
        while sent < frame.len() {
            self.stream.writable().await?;
            let fds: &[i32] = if sent == 0 { &raw } else { &[] };
            match self.stream.try_io(tokio::io::Interest::WRITABLE, || {
                sys::send_with_fds(self.stream.as_fd(), &frame[sent..], fds)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn refuse(&mut self, reason: RefusalKind, message: String) -> Result<(), ConnError> {
        tracing::info!(?reason, %message, "refused");
        self.write(&Reply::Refused { reason, message }).await
    }
}

async fn handle(stream: UnixStream, daemon: Arc<Daemon>) -> Result<(), ConnError> {
    // Authentication: the kernel tells us the peer's uid; no passwords exist.
    let cred = stream.peer_cred().map_err(ConnError::PeerCred)?;
    if !daemon.config.allowed_peer_uids.contains(&cred.uid()) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused peer");
        return Err(ConnError::PeerNotAllowed(cred.uid()));
    }
    let mut conn = Conn {
        stream,
        dec: FrameDecoder::new(),
    };
    match conn.read().await? {
        Request::Hello { version, .. } if version == PROTOCOL_VERSION => {
            conn.write(&Reply::Hello {
                version: PROTOCOL_VERSION,
                daemon: concat!("airlockd ", env!("CARGO_PKG_VERSION")).into(),
            })
            .await?;
        }
        Request::Hello { version, .. } => {
            return conn
                .refuse(
                    RefusalKind::Version,
                    format!(
                        "client speaks protocol version {version}, airlockd speaks {PROTOCOL_VERSION}; install matching versions of the extension and the daemon"
                    ),
                )
                .await;
        }
        other => {
            return conn
                .refuse(
                    RefusalKind::Protocol,
                    format!("expected hello, got {other:?}"),
                )
                .await;
        }
    }
    // A connection without a request (a health check) simply ends here.
    let (language, caller, script_sha256) = match conn.read().await {
        Ok(Request::Execute {
            language,
            caller,
            script_sha256,
        }) => (language, caller, script_sha256),
        Ok(other @ (Request::Hello { .. } | Request::Report { .. })) => {
            return conn
                .refuse(
                    RefusalKind::Protocol,
                    format!("expected execute, got {other:?}"),
                )
                .await;
        }
        // Monitoring: answered from what the daemon holds, no sandbox involved.
        Ok(Request::ListSessions) => {
            let sessions = daemon.monitor.sessions();
            return conn.write(&Reply::Sessions { sessions }).await;
        }
        Ok(Request::Stats) => {
            let rows = daemon.monitor.stats();
            return conn.write(&Reply::Stats { rows }).await;
        }
        Err(ConnError::Closed) => return Ok(()),
        Err(e) => return Err(e),
    };
    execute(&mut conn, &daemon, language, caller, script_sha256).await
}

async fn execute(
    conn: &mut Conn,
    daemon: &Arc<Daemon>,
    language: Language,
    caller: airlock_protocol::control::Caller,
    script_sha256: String,
) -> Result<(), ConnError> {
    let config = &daemon.config;
    if !config.runtimes.contains_key(&language) {
        return conn
            .refuse(
                RefusalKind::Language,
                format!("airlockd has no runtime configured for {language}; add [runtimes.{language}] to its config"),
            )
            .await;
    }
    let key = CallerKey {
        database: caller.database.clone(),
        role: caller.role.clone(),
    };
    let queue = Duration::from_secs_f64(config.workers.queue_timeout_seconds);
    // A new caller gets a free uid with sandboxes prepared that it may take, if any.
    let preferred = daemon.prepared.uids(language, &key);
    // While queued, watch the backend: one that gave up (cancel, statement_timeout) must
    // not take a worker later, ahead of callers still waiting.
    let acquired = tokio::select! {
        lease = daemon.pool.acquire(&key, queue, &preferred) => lease,
        _ = conn.stream.readable() => {
            tracing::info!(role = %caller.role, "backend left while queued for a worker");
            return Ok(());
        }
    };
    let Some(worker) = acquired else {
        return conn
            .refuse(
                RefusalKind::Busy,
                format!(
                    "all {} worker identities are busy with other callers and none freed within {} s; raise workers.count (or workers.queue_timeout_seconds) in the airlockd config",
                    config.workers.count, config.workers.queue_timeout_seconds
                ),
            )
            .await;
    };
    // The sandbox: one prepared for this worker uid, else built now. Either way one
    // more is prepared behind it: at once when no other waits for this uid, else once
    // this call has ended. A build (a clone of the interpreter, then its warm-up) takes
    // more CPU than a trivial call; run beside the call it took a core from it (on two
    // cores a trivial call's median went from about 3.8 to 5.7 ms at 10 calls/s).
    let (taken, stale) = daemon.prepared.take(language, worker.uid, &key);
    for b in stale {
        tracing::info!(
            call_id = b.call_id,
            "a prepared sandbox waited while another caller held its uid; discarded"
        );
        let daemon = daemon.clone();
        tokio::spawn(async move { prepared::discard(&daemon, b).await });
    }
    let uid = worker.uid;
    let refill_after = taken.is_some() && daemon.prepared.waiting(language, uid) > 0;
    if !refill_after {
        prepared::refill(daemon, language, uid);
    }
    let session_id = taken.as_ref().map_or_else(Uuid::new_v4, |b| b.session_id);
    let span = tracing::info_span!("call", %session_id, uid = worker.uid);
    let ended = run_call(
        conn,
        daemon,
        language,
        worker,
        taken,
        session_id,
        caller,
        script_sha256,
    )
    .instrument(span)
    .await;
    if refill_after {
        prepared::refill(daemon, language, uid);
    }
    ended
}

#[allow(clippy::too_many_arguments)] // one call's identity, passed once from execute()
async fn run_call(
    conn: &mut Conn,
    daemon: &Daemon,
    language: Language,
    worker: Lease,
    taken: Option<Built>,
    session_id: Uuid,
    caller: airlock_protocol::control::Caller,
    script_sha256: String,
) -> Result<(), ConnError> {
    let config = &daemon.config;
    tracing::info!(%language, database = %caller.database, role = %caller.role,
        backend_pid = caller.backend_pid, script_sha256 = %script_sha256,
        prepared = taken.is_some(), "call started");
    // Written when dropped, on every path: a call that returns before its sandbox ran
    // is recorded as a daemon error.
    let mut record = CallRecord::begin(
        &daemon.audit,
        &caller,
        worker.uid,
        session_id,
        language,
        &script_sha256,
    );
    // Listed in airlock.active_sessions until this call returns.
    let _listed = daemon
        .monitor
        .begin(session_id, &caller, language, worker.uid);

    let sandbox = match taken {
        Some(b) => b,
        None => match prepared::build(daemon, language, worker.uid, None, session_id).await {
            Ok(b) => b,
            Err(e) => return conn.refuse(RefusalKind::Sandbox, e.to_string()).await,
        },
    };
    let Built {
        call_id,
        backend_end,
        pid,
        warm,
        exited,
        cgroup,
        session,
        build_us,
        built_at,
        ..
    } = sandbox;
    let limits = &config.limits;
    let wall_limit_ms = config.limits.wall_clock_ms();
    // CPU the runtime used while it was prepared (loading its libraries) is not the
    // call's: its limit and its record count from here, just before the hand-over (the
    // runtime waits for the call until then).
    let cpu_before = cgroup
        .as_ref()
        .and_then(|c| c.cpu_usage_usec())
        .unwrap_or(0);
    let sent = conn
        .write_with_fd(
            &Reply::Started {
                session_id,
                worker_uid: worker.uid,
                wall_limit_ms,
            },
            &backend_end,
        )
        .await;
    drop(backend_end);
    let mut exited = exited;
    if let Err(e) = sent {
        daemon.spawner.kill(call_id);
        let _ = exited.await;
        record.ended(&Outcome::Cancelled, None);
        return Err(e);
    }
    let us = |d: Duration| d.as_micros() as u64;
    tracing::debug!(
        pid,
        warm,
        prepared_ms = built_at.elapsed().as_millis() as u64,
        session_folder_us = build_us[0],
        cgroup_us = build_us[1],
        spawn_us = build_us[2],
        "sandbox running"
    );
    let t_running = std::time::Instant::now();
    daemon.monitor.running(session_id);

    // Wait for whichever comes first: the sandbox exits, the time limit, or the backend
    // hangs up (cancel, statement_timeout, error in the backend).
    let deadline = tokio::time::sleep(Duration::from_millis(wall_limit_ms));
    tokio::pin!(deadline);
    // CPU time is accounted per cgroup, so it covers every process of the call.
    let cpu_limit_usec = limits.cpu_seconds.saturating_mul(1_000_000);
    let mut cpu_tick = tokio::time::interval(CPU_POLL);
    // Set when the backend reported its row counts and hung up: it has every row and
    // waits for nothing more, so the runtime is let exit on its own, for a short while.
    let mut finished_at: Option<tokio::time::Instant> = None;
    let grace = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(grace);
    let mut outcome = loop {
        tokio::select! {
            status = &mut exited => break match status {
                Ok(ExitStatus::Code { code }) => Outcome::Exited { code },
                Ok(ExitStatus::Signal { signal }) => Outcome::Signaled { signal },
                Err(_) => Outcome::Signaled { signal: 9 },
            },
            _ = &mut deadline => {
                daemon.spawner.kill(call_id);
                let _ = (&mut exited).await;
                tracing::info!(limit_ms = wall_limit_ms, "wall-clock limit reached, sandbox killed");
                break Outcome::TimedOut { limit_ms: wall_limit_ms };
            }
            // The backend's row counts arrive here once the runtime said done; EOF or
            // anything else from the backend means it has given up.
            _ = &mut grace, if finished_at.is_some() => {
                daemon.spawner.kill(call_id);
                let _ = (&mut exited).await;
                tracing::info!(grace_ms = FINISHED_GRACE.as_millis() as u64,
                    "the runtime did not exit after the backend finished; sandbox killed");
                break Outcome::Signaled { signal: 9 };
            }
            request = conn.read(), if finished_at.is_none() => {
                match request {
                    Ok(Request::Report { rows_in, rows_out }) => {
                        record.report(rows_in, rows_out);
                        continue;
                    }
                    Ok(other) => tracing::warn!(request = ?other, "unexpected request during a call"),
                    Err(ConnError::Closed) if record.has_report() => {
                        let now = tokio::time::Instant::now();
                        finished_at = Some(now);
                        grace.as_mut().reset(now + FINISHED_GRACE);
                        continue;
                    }
                    Err(ConnError::Closed) => {}
                    Err(e) => tracing::warn!(error = %e, "bad frame from the backend during a call"),
                }
                daemon.spawner.kill(call_id);
                let _ = (&mut exited).await;
                tracing::info!("backend hung up, sandbox killed");
                break Outcome::Cancelled;
            }
            _ = cpu_tick.tick(), if cgroup.is_some() => {
                let now = cgroup.as_ref().and_then(|c| c.stats());
                if let Some(s) = &now {
                    daemon.monitor.usage(session_id, s.cpu_usage_usec.saturating_sub(cpu_before) / 1000, s.memory_peak_bytes);
                }
                let used = now.map(|s| s.cpu_usage_usec.saturating_sub(cpu_before));
                if used.is_some_and(|u| u >= cpu_limit_usec) {
                    daemon.spawner.kill(call_id);
                    let _ = (&mut exited).await;
                    tracing::info!(limit_s = limits.cpu_seconds, "CPU-time limit reached, sandbox killed");
                    break Outcome::CpuLimit { limit_seconds: limits.cpu_seconds };
                }
            }
        }
    };
    let run_us = us(t_running.elapsed());
    let stats = cgroup.as_ref().and_then(|cg| cg.stats()).map(|mut s| {
        s.cpu_usage_usec = s.cpu_usage_usec.saturating_sub(cpu_before);
        s
    });
    if let Some(stats) = &stats {
        // A kill by the kernel's OOM killer looks like any SIGKILL from outside; the
        // cgroup's own count tells them apart.
        tracing::info!(
            memory_peak_bytes = stats.memory_peak_bytes,
            cpu_usage_usec = stats.cpu_usage_usec,
            "resources used"
        );
        if stats.oom_killed && !matches!(outcome, Outcome::Cancelled) {
            outcome = Outcome::MemoryLimit {
                limit_bytes: limits.memory_mib * 1024 * 1024,
            };
        }
    }
    tracing::info!(?outcome, "call ended");
    record.ended(&outcome, stats.as_ref());
    // Not running any more, whatever the backend still has to say.
    drop(_listed);
    // The backend has its answer before the teardown: every process of the call is gone
    // already (the pid namespace's init exited), and removing the cgroup and the session
    // folder does not delay the caller. The worker uid is released only afterwards.
    if outcome != Outcome::Cancelled {
        // The backend may already be gone; that is not an error of the daemon's.
        let _ = conn
            .write(&Reply::Ended {
                outcome: outcome.clone(),
            })
            .await;
    }
    drop(cgroup);
    let t_cleanup = std::time::Instant::now();
    drop(session);
    tracing::debug!(
        run_us,
        session_removal_us = us(t_cleanup.elapsed()),
        "call cleaned up"
    );
    drop(worker);
    // The backend reports after reading the runtime's last frame, which can come after
    // the sandbox is gone. EOF (the backend failed or never got `done`) leaves the counts
    // null.
    if outcome != Outcome::Cancelled && !record.has_report() {
        if let Ok(Ok(Request::Report { rows_in, rows_out })) =
            tokio::time::timeout(REPORT_WAIT, conn.read()).await
        {
            record.report(rows_in, rows_out);
        }
    }
    drop(record);
    Ok(())
}

//! The spawner: a single-threaded loop that owns every sandbox of the daemon.
//!
//! `airlockd` fork+execs itself as `airlockd __spawner` holding one end of a
//! `SOCK_SEQPACKET` socketpair and calls [`run_spawner`]. One datagram carries one frame
//! (u32 LE length, kind byte, JSON payload: see `airlock_protocol::frame`); a
//! `ToSpawner::Spawn` datagram carries exactly one fd by SCM_RIGHTS, the sandbox's data
//! socket. Seqpacket keeps each fd bound to its own message, which a byte stream would
//! not. [`send_message`] and [`recv_message`] are the daemon's side of it too.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use airlock_protocol::spawner::{
    ExitStatus, FromSpawner, FromZygote, SpawnRequest, ToSpawner, WarmSpec,
};
use airlock_protocol::{encode_control, FrameDecoder};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::setgroups;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{spawn, sys, Sandbox, SandboxError};

/// Largest message the spawner reads; a `SpawnRequest` is a few KiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// How long a pre-initialised interpreter may take to clone one sandbox before the
/// spawner gives up on it (kills it, fails the call with a clear error) instead of
/// hanging every call behind it.
const WARM_SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Least time between two starts of the same pre-initialised interpreter, so one that
/// dies at start is not restarted in a loop.
const WARM_RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// The sandbox library the warm path's interpreters load (`libairlock_sandbox.so`),
/// looked for next to this executable, then in /usr/local/lib/airlock.
const WARM_LIBRARY: &str = "libairlock_sandbox.so";

/// Runs the spawner until the daemon closes its end of `sock`, then kills and reaps
/// every sandbox still running and returns `Ok`. On any other error (malformed message,
/// socket failure) it also kills and reaps everything, then returns the error.
///
/// Must run in a single-threaded process (see [`spawn`]), as root. It first drops the
/// process's supplementary groups, so sandboxes inherit none of root's.
pub fn run_spawner(sock: OwnedFd) -> Result<(), SandboxError> {
    setgroups(&[]).map_err(SandboxError::SetGroups)?;
    let mut state = State::default();
    let result = serve(sock.as_fd(), &mut state);
    // Whatever ended the loop, no sandbox outlives the spawner: all are killed first,
    // then reaped (each wait returns once that sandbox's pid namespace is empty). Warm
    // sandboxes are the zygotes' children: killed here, reaped by the zygote or, once
    // it is gone too, by init.
    for (_, live) in &state.live {
        live.kill();
    }
    for zygote in &state.zygotes {
        zygote.kill();
    }
    for (_, live) in state.live.drain(..) {
        if let Live::Cold(mut sandbox) = live {
            let _ = sandbox.wait();
        }
    }
    for zygote in state.zygotes.drain(..) {
        let _ = waitid(Id::PIDFd(zygote.pidfd.as_fd()), WaitPidFlag::WEXITED);
    }
    result
}

/// A running sandbox, by how it was made.
enum Live {
    /// Cloned and exec'd by this process; its child.
    Cold(Sandbox),
    /// Cloned by a zygote (its child); the zygote reports its exit.
    Warm { pidfd: OwnedFd, zygote: u32 },
}

impl Live {
    fn kill(&self) {
        match self {
            Live::Cold(sandbox) => {
                let _ = sandbox.kill();
            }
            Live::Warm { pidfd, .. } => {
                let _ = sys::pidfd_send_signal(pidfd.as_fd(), Signal::SIGKILL as i32);
            }
        }
    }
}

/// One pre-initialised interpreter, the spawner's child.
struct Zygote {
    id: u32,
    spec: WarmSpec,
    pidfd: OwnedFd,
    sock: OwnedFd,
    ready: bool,
}

impl Zygote {
    fn kill(&self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), Signal::SIGKILL as i32);
    }
}

/// A call handed to a zygote, waiting for its `spawned` (or `spawn_failed`).
struct Pending {
    call_id: u64,
    zygote: u32,
    program: String,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    live: Vec<(u64, Live)>,
    zygotes: Vec<Zygote>,
    pending: Vec<Pending>,
    /// Warm calls waiting for a zygote of their spec to be free (each zygote has at most
    /// one call in hand, so the spawner never blocks sending to one), oldest first.
    queued: std::collections::VecDeque<(SpawnRequest, OwnedFd)>,
    /// When a zygote of each spec last stopped, for the restart backoff.
    stopped: Vec<(WarmSpec, Instant)>,
    next_zygote: u32,
}

/// What a poll woke up for.
enum Ready {
    Daemon,
    /// A cold sandbox's init exited (by call id: `live` changes before it is handled).
    Cold(u64),
    ZygoteMessage(u32),
    ZygoteExited(u32),
}

fn serve(sock: BorrowedFd<'_>, state: &mut State) -> Result<(), SandboxError> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        let ready = {
            let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(sock, PollFlags::POLLIN)];
            let mut what = vec![Ready::Daemon];
            for (call_id, live) in &state.live {
                if let Live::Cold(sandbox) = live {
                    fds.push(PollFd::new(sandbox.pidfd.as_fd(), PollFlags::POLLIN));
                    what.push(Ready::Cold(*call_id));
                }
            }
            for z in &state.zygotes {
                fds.push(PollFd::new(z.sock.as_fd(), PollFlags::POLLIN));
                what.push(Ready::ZygoteMessage(z.id));
                fds.push(PollFd::new(z.pidfd.as_fd(), PollFlags::POLLIN));
                what.push(Ready::ZygoteExited(z.id));
            }
            // Until the first zygote answer is due.
            let timeout = state
                .pending
                .iter()
                .map(|p| p.deadline.saturating_duration_since(Instant::now()))
                .min()
                .map_or(PollTimeout::NONE, |left| {
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                });
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SandboxError::Poll(e)),
            }
            let is_ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            fds.iter()
                .zip(what)
                .filter(|(p, _)| is_ready(p))
                .map(|(_, w)| w)
                .collect::<Vec<_>>()
        };
        let now = Instant::now();
        let late: Vec<u32> = state
            .pending
            .iter()
            .filter(|p| p.deadline <= now)
            .map(|p| p.zygote)
            .collect();
        for id in late {
            stop_zygote(sock, state, id, "it did not answer within 10 s")?;
        }
        let mut exited_cold: Vec<u64> = Vec::new();
        let mut daemon_ready = false;
        for r in ready {
            match r {
                Ready::Daemon => daemon_ready = true,
                Ready::Cold(call_id) => exited_cold.push(call_id),
                Ready::ZygoteMessage(id) => {
                    if let Err(detail) = zygote_message(sock, state, id) {
                        stop_zygote(sock, state, id, &detail)?;
                    }
                }
                Ready::ZygoteExited(id) => stop_zygote(sock, state, id, "it exited")?,
            }
        }
        for call_id in exited_cold {
            let found = state
                .live
                .iter()
                .position(|(id, l)| *id == call_id && matches!(l, Live::Cold(_)));
            if let Some(i) = found {
                if let (_, Live::Cold(mut sandbox)) = state.live.swap_remove(i) {
                    let status = sandbox.wait()?;
                    send_message(sock, &FromSpawner::Exited { call_id, status }, None)?;
                }
            }
        }
        dispatch_queued(sock, state)?;
        if daemon_ready {
            match recv_message::<ToSpawner>(sock, &mut buf)? {
                None => return Ok(()),
                Some((ToSpawner::Spawn(req), fds)) => handle_spawn(sock, state, *req, fds)?,
                Some((ToSpawner::Prepare(spec), _)) => start_zygotes(sock, state, &spec)?,
                Some((ToSpawner::Kill { call_id }, _)) => {
                    // An unknown call has already exited; its Exited is sent or on its way.
                    if let Some((_, live)) = state.live.iter().find(|(id, _)| *id == call_id) {
                        live.kill();
                    }
                }
            }
        }
    }
}

fn handle_spawn(
    sock: BorrowedFd<'_>,
    state: &mut State,
    req: SpawnRequest,
    mut fds: Vec<OwnedFd>,
) -> Result<(), SandboxError> {
    let call_id = req.call_id;
    let refuse = |error: String| FromSpawner::SpawnFailed { call_id, error };
    let reply = if fds.len() != 1 {
        refuse(format!(
            "a spawn request carries exactly one fd (the data socket), this one carried {}",
            fds.len()
        ))
    } else if state.live.iter().any(|(id, _)| *id == call_id)
        || state.pending.iter().any(|p| p.call_id == call_id)
        || state.queued.iter().any(|(r, _)| r.call_id == call_id)
    {
        refuse(format!("call {call_id} already has a sandbox"))
    } else {
        // The length was checked just above.
        let data = fds.remove(0);
        return start_call(sock, state, req, data);
    };
    send_message(sock, &reply, None)
}

/// Starts a call's sandbox: handed to a free zygote of its warm spec, queued while every
/// ready zygote of the spec has a call in hand, else cold.
fn start_call(
    sock: BorrowedFd<'_>,
    state: &mut State,
    req: SpawnRequest,
    data: OwnedFd,
) -> Result<(), SandboxError> {
    let call_id = req.call_id;
    if let Some(spec) = &req.warm {
        match warm_spawn(sock, state, spec, &req, data.as_fd())? {
            // The zygote's answer is the reply (see `zygote_message`).
            WarmOutcome::Handed => return Ok(()),
            WarmOutcome::Busy => {
                state.queued.push_back((req, data));
                return Ok(());
            }
            WarmOutcome::Unavailable => {}
        }
    }
    // No zygote: the call starts cold, with the same sandbox.
    let reply = match spawn(&req, data) {
        Ok(sandbox) => {
            let pid = sandbox.pid;
            // Tracked before replying, so a failed reply still gets it killed.
            state.live.push((call_id, Live::Cold(sandbox)));
            FromSpawner::Spawned {
                call_id,
                pid,
                warm: false,
            }
        }
        Err(e) => FromSpawner::SpawnFailed {
            call_id,
            error: e.to_string(),
        },
    };
    send_message(sock, &reply, None)
}

/// Gives queued calls to zygotes that became free, in order (or starts them cold if
/// their spec has no ready zygote any more).
fn dispatch_queued(sock: BorrowedFd<'_>, state: &mut State) -> Result<(), SandboxError> {
    let queued = std::mem::take(&mut state.queued);
    for (req, data) in queued {
        start_call(sock, state, req, data)?;
    }
    Ok(())
}

enum WarmOutcome {
    /// The call (and its data socket) went to a zygote, which answers later.
    Handed,
    /// Every ready zygote of the spec has a call in hand: wait for one.
    Busy,
    /// No zygote is ready (or the request never reached it): start cold.
    Unavailable,
}

/// Hands the call to a ready zygote of `spec` that has no call in hand; it answers
/// `spawned` or `spawn_failed` later, within `WARM_SPAWN_TIMEOUT`. One call at a time
/// per zygote: its socket's queue never fills, so this send never blocks.
fn warm_spawn(
    sock: BorrowedFd<'_>,
    state: &mut State,
    spec: &WarmSpec,
    req: &SpawnRequest,
    data: BorrowedFd<'_>,
) -> Result<WarmOutcome, SandboxError> {
    start_zygotes(sock, state, spec)?;
    let busy = |id: u32| state.pending.iter().any(|p| p.zygote == id);
    let mut ready = state.zygotes.iter().filter(|z| z.spec == *spec && z.ready);
    let Some(first) = ready.next() else {
        return Ok(WarmOutcome::Unavailable);
    };
    let Some(id) = std::iter::once(first)
        .chain(ready)
        .find(|z| !busy(z.id))
        .map(|z| z.id)
    else {
        return Ok(WarmOutcome::Busy);
    };
    let Some(zygote) = state.zygotes.iter().find(|z| z.id == id) else {
        return Ok(WarmOutcome::Unavailable);
    };
    let forwarded = ToSpawner::Spawn(Box::new(req.clone()));
    if let Err(e) = send_message(zygote.sock.as_fd(), &forwarded, Some(data)) {
        // sendmsg failed: the fd did not travel.
        stop_zygote(sock, state, id, &format!("sending it a call failed: {e}"))?;
        return Ok(WarmOutcome::Unavailable);
    }
    state.pending.push(Pending {
        call_id: req.call_id,
        zygote: id,
        program: spec.argv.last().cloned().unwrap_or_default(),
        deadline: Instant::now() + WARM_SPAWN_TIMEOUT,
    });
    Ok(WarmOutcome::Handed)
}

fn lost_warm(program: &str) -> String {
    format!(
        "the pre-initialised interpreter ({program}) stopped while starting this call's \
         sandbox; the next call starts a new one (see airlockd's log)"
    )
}

/// A message from a zygote: ready, the answer to a call handed to it, or an exit.
fn zygote_message(sock: BorrowedFd<'_>, state: &mut State, id: u32) -> Result<(), String> {
    let Some(zygote) = state.zygotes.iter_mut().find(|z| z.id == id) else {
        return Ok(());
    };
    let mut buf = vec![0u8; 64 * 1024];
    let message = recv_message::<FromZygote>(zygote.sock.as_fd(), &mut buf);
    let reply = match message {
        Ok(Some((FromZygote::Ready { pid }, _))) if !zygote.ready => {
            zygote.ready = true;
            FromSpawner::Warm {
                program: zygote.spec.argv.last().cloned().unwrap_or_default(),
                ready: true,
                detail: format!("pid {pid}, libraries imported"),
            }
        }
        Ok(Some((FromZygote::Spawned { call_id, pid }, mut fds))) if fds.len() == 1 => {
            take_pending(state, id, call_id)?;
            let pidfd = fds.remove(0);
            // Tracked before replying, so a failed reply still gets it killed.
            state.live.push((call_id, Live::Warm { pidfd, zygote: id }));
            FromSpawner::Spawned {
                call_id,
                pid,
                warm: true,
            }
        }
        Ok(Some((FromZygote::SpawnFailed { call_id, error }, _))) => {
            take_pending(state, id, call_id)?;
            FromSpawner::SpawnFailed { call_id, error }
        }
        Ok(Some((FromZygote::Exited { call_id, status }, _))) => {
            return warm_exited(sock, state, call_id, status).map_err(|e| e.to_string());
        }
        Ok(Some((other, _))) => return Err(format!("it sent {other:?} unasked")),
        Ok(None) => return Err("it closed its socket".into()),
        Err(e) => return Err(e.to_string()),
    };
    send_message(sock, &reply, None).map_err(|e| e.to_string())
}

/// Removes the call `call_id` handed to zygote `id` from the waiting list; an answer
/// about any other call is the zygote's error.
fn take_pending(state: &mut State, id: u32, call_id: u64) -> Result<(), String> {
    match state
        .pending
        .iter()
        .position(|p| p.call_id == call_id && p.zygote == id)
    {
        Some(i) => {
            state.pending.swap_remove(i);
            Ok(())
        }
        None => Err(format!(
            "it answered for call {call_id}, which it was not given"
        )),
    }
}

fn warm_exited(
    sock: BorrowedFd<'_>,
    state: &mut State,
    call_id: u64,
    status: ExitStatus,
) -> Result<(), SandboxError> {
    if let Some(i) = state
        .live
        .iter()
        .position(|(id, l)| *id == call_id && matches!(l, Live::Warm { .. }))
    {
        state.live.swap_remove(i);
        send_message(sock, &FromSpawner::Exited { call_id, status }, None)?;
    }
    Ok(())
}

/// Kills and reaps a zygote; its sandboxes are killed and reported as killed (their
/// parent-death signal would take them anyway). The next warm request restarts it.
fn stop_zygote(
    sock: BorrowedFd<'_>,
    state: &mut State,
    id: u32,
    why: &str,
) -> Result<(), SandboxError> {
    let Some(i) = state.zygotes.iter().position(|z| z.id == id) else {
        return Ok(());
    };
    let zygote = state.zygotes.swap_remove(i);
    zygote.kill();
    let _ = waitid(Id::PIDFd(zygote.pidfd.as_fd()), WaitPidFlag::WEXITED);
    state.stopped.retain(|(s, _)| *s != zygote.spec);
    state.stopped.push((zygote.spec.clone(), Instant::now()));
    // Calls handed to it and not yet started fail: their data sockets went with it.
    let (lost, kept): (Vec<Pending>, Vec<Pending>) =
        state.pending.drain(..).partition(|p| p.zygote == id);
    state.pending = kept;
    for p in lost {
        let reply = FromSpawner::SpawnFailed {
            call_id: p.call_id,
            error: lost_warm(&p.program),
        };
        send_message(sock, &reply, None)?;
    }
    let orphans: Vec<u64> = state
        .live
        .iter()
        .filter(|(_, l)| matches!(l, Live::Warm { zygote, .. } if *zygote == id))
        .map(|(c, _)| *c)
        .collect();
    for call_id in orphans {
        if let Some(i) = state.live.iter().position(|(c, _)| *c == call_id) {
            let (_, live) = state.live.swap_remove(i);
            live.kill();
            let status = ExitStatus::Signal {
                signal: Signal::SIGKILL as i32,
            };
            send_message(sock, &FromSpawner::Exited { call_id, status }, None)?;
        }
    }
    warm_unavailable(
        sock,
        &zygote.spec,
        format!("stopped: {why}; calls start cold until it is restarted"),
    )
}

/// Tells the daemon (for its log) that warm starts of `spec` are unavailable, and why.
fn warm_unavailable(
    sock: BorrowedFd<'_>,
    spec: &WarmSpec,
    detail: String,
) -> Result<(), SandboxError> {
    let program = spec.argv.last().cloned().unwrap_or_default();
    let message = FromSpawner::Warm {
        program,
        ready: false,
        detail,
    };
    send_message(sock, &message, None)
}

/// Starts zygotes of `spec` until it has `spec.count` (none within the backoff after
/// one stopped), each with its socket as fd 3 and a sealed in-memory copy of the
/// sandbox library as fd 4. Each reports `Ready` when its libraries are imported; until
/// one is, calls start cold.
fn start_zygotes(
    sock: BorrowedFd<'_>,
    state: &mut State,
    spec: &WarmSpec,
) -> Result<(), SandboxError> {
    let now = Instant::now();
    if let Some((_, at)) = state.stopped.iter().find(|(s, _)| s == spec) {
        if now.duration_since(*at) < WARM_RESTART_BACKOFF {
            return Ok(());
        }
    }
    while state.zygotes.iter().filter(|z| z.spec == *spec).count() < spec.count as usize {
        match launch_zygote(spec) {
            Ok((pidfd, zsock)) => {
                state.next_zygote += 1;
                state.zygotes.push(Zygote {
                    id: state.next_zygote,
                    spec: spec.clone(),
                    pidfd,
                    sock: zsock,
                    ready: false,
                });
            }
            Err(detail) => {
                state.stopped.retain(|(s, _)| s != spec);
                state.stopped.push((spec.clone(), now));
                let detail = format!("not started: {detail}; calls start cold");
                return warm_unavailable(sock, spec, detail);
            }
        }
    }
    Ok(())
}

fn launch_zygote(spec: &WarmSpec) -> Result<(OwnedFd, OwnedFd), String> {
    let library = find_library().ok_or_else(|| {
        format!(
            "{WARM_LIBRARY} is neither next to the airlockd executable nor in \
             /usr/local/lib/airlock (build it with `cargo build --release -p airlock-sandbox`)"
        )
    })?;
    let lib = sealed_copy(&library).map_err(|e| format!("copying {}: {e}", library.display()))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let (program, args) = spec.argv.split_first().ok_or("empty argv")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    sys::pass_fds_3_and_4(&mut cmd, [theirs.as_raw_fd(), lib.as_raw_fd()]);
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let pid = child.id() as i32;
    // Not reaped yet (only we wait for it, through this pidfd), so the pid is still ours.
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    Ok((pidfd, ours))
}

fn find_library() -> Option<PathBuf> {
    let exe_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    [exe_dir, PathBuf::from("/usr/local/lib/airlock")]
        .into_iter()
        .map(|d| d.join(WARM_LIBRARY))
        .find(|p| p.is_file())
}

/// The library in a sealed memfd: the zygote maps `/memfd:airlock-sandbox`, so no host
/// path of the daemon's appears in a sandbox's /proc/self/maps, and nobody can change
/// the code after the copy.
fn sealed_copy(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let bytes = std::fs::read(path)?;
    let fd = memfd_create(
        "airlock-sandbox",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, &bytes)?;
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// Sends `msg` as one frame in one datagram, with `fd` attached by SCM_RIGHTS.
pub fn send_message<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), SandboxError> {
    let frame = encode_control(msg)?;
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(_) => return Err(SandboxError::Truncated { len: frame.len() }),
            Err(Errno::EINTR) => continue,
            Err(source) => return Err(SandboxError::Socket { op: "send", source }),
        }
    }
}

/// Receives one datagram holding one frame, with the fds attached to it. `Ok(None)` at
/// EOF (the peer closed its end). `buf` bounds the message size.
pub fn recv_message<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<Option<(T, Vec<OwnedFd>)>, SandboxError> {
    let received = loop {
        match sys::recv_with_fds(sock, buf) {
            Ok(r) => break r,
            Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(SandboxError::Socket {
                    op: "receive",
                    source,
                })
            }
        }
    };
    if received.truncated {
        return Err(SandboxError::Truncated { len: received.len });
    }
    if received.len == 0 && received.fds.is_empty() {
        return Ok(None);
    }
    let mut decoder = FrameDecoder::new();
    decoder.extend(&buf[..received.len]);
    match decoder.next_frame()? {
        Some(frame) if decoder.buffered() == 0 => Ok(Some((frame.control()?, received.fds))),
        _ => Err(SandboxError::NotOneFrame { len: received.len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use nix::unistd::{pipe, read, write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn message_and_fd_cross_together_and_eof_is_none() {
        let (a, b) = pair();
        let (r, w) = pipe().unwrap();
        let msg = ToSpawner::Kill { call_id: 7 };
        send_message(a.as_fd(), &msg, Some(w.as_fd())).unwrap();
        drop(w);
        let mut buf = vec![0; 4096];
        let (got, fds) = recv_message::<ToSpawner>(b.as_fd(), &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        write(&fds[0], b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(read(&r, &mut one).unwrap(), 1);
        drop(a);
        assert!(recv_message::<ToSpawner>(b.as_fd(), &mut buf)
            .unwrap()
            .is_none());
    }

    #[test]
    fn oversized_and_garbage_messages_are_errors() {
        let (a, b) = pair();
        let frame = encode_control(&ToSpawner::Kill { call_id: 1 }).unwrap();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut small = vec![0; 8];
        assert!(matches!(
            recv_message::<ToSpawner>(b.as_fd(), &mut small),
            Err(SandboxError::Truncated { .. })
        ));
        let mut garbage = frame.clone();
        garbage.extend_from_slice(b"trailing");
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&garbage)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = vec![0; 4096];
        assert!(matches!(
            recv_message::<ToSpawner>(b.as_fd(), &mut buf),
            Err(SandboxError::NotOneFrame { .. })
        ));
    }
}

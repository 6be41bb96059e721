//! Sandboxes built ahead of their calls.
//!
//! Building a call's sandbox (its session folder, its cgroup, the clone into fresh
//! namespaces, mounts, identity, Landlock, seccomp, and the runtime loading its
//! libraries) takes longer than a small script runs. So the daemon keeps up to
//! `[runtimes.<language>] prepared` sandboxes per language built and waiting, each for
//! one worker uid: a runtime blocked on its first read of the data socket, whose other
//! end the daemon holds. A call whose worker uid has one takes the oldest and only hands
//! the backend that socket; another is built behind it.
//!
//! A prepared sandbox is exactly the sandbox the call would have got when it arrived:
//! built by the same code ([`build`]), with its own namespaces, session folder, cgroup
//! and seccomp filter, no code of anyone's run in it yet; it serves one call and is then
//! gone like any other. Only the worker uid is fixed ahead, which is why the worker pool
//! prefers, for a new caller, a free uid that has prepared sandboxes
//! ([`Prepared::uids`]).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use airlock_protocol::{control::Language, spawner::ExitStatus};
use airlock_sandbox::cgroup::{CallCgroup, CgroupLimits, CgroupStats};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{
    pool::CallerKey,
    runtime::{self, CallSpec},
    server::Daemon,
    session::SessionDir,
};

/// A call's cgroup; on drop its leftover processes are killed and it is removed, off the
/// event loop (removal waits for the processes to go).
pub struct CallGroup(Option<CallCgroup>);

impl CallGroup {
    /// CPU time used so far, or None if it cannot be read (logged).
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        match self.0.as_ref()?.cpu_usage_usec() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the call's CPU time");
                None
            }
        }
    }

    pub fn stats(&self) -> Option<CgroupStats> {
        let cg = self.0.as_ref()?;
        match cg.stats() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the call's cgroup statistics");
                None
            }
        }
    }
}

impl CallGroup {
    /// Removes the group here and now (see [`discard_all`]).
    fn remove_now(mut self) {
        if let Some(cg) = self.0.take() {
            if let Err(e) = cg.remove() {
                tracing::error!(error = %e, "cannot remove the call's cgroup");
            }
        }
    }
}

impl Drop for CallGroup {
    fn drop(&mut self) {
        let Some(cg) = self.0.take() else { return };
        let remove = move || {
            if let Err(e) = cg.remove() {
                tracing::error!(error = %e, "cannot remove the call's cgroup");
            }
        };
        crate::off_event_loop(remove);
    }
}

/// A running sandbox, not yet given to a call: its runtime waits for the backend on the
/// data socket. Dropping it removes its cgroup (killing what is left in it) and its
/// session folder.
pub struct Built {
    pub language: Language,
    pub uid: u32,
    /// The caller whose calls held `uid` while this sandbox waited, if any: only that
    /// caller's calls may take it (see [`Prepared::take`]).
    built_for: Option<CallerKey>,
    pub call_id: u64,
    pub session_id: Uuid,
    /// The backend's end of the data socket.
    pub backend_end: OwnedFd,
    pub pid: i32,
    /// Cloned from the pre-initialised interpreter rather than exec'd.
    pub warm: bool,
    /// Resolves when the sandbox's init has exited and been reaped.
    pub exited: oneshot::Receiver<ExitStatus>,
    // Dropped in this order: the cgroup (kills and removes) before the folder.
    pub cgroup: Option<CallGroup>,
    pub session: SessionDir,
    /// Where the build's time went, microseconds: session folder, cgroup, spawn.
    pub build_us: [u64; 3],
    pub built_at: Instant,
}

impl Built {
    /// Whether the sandbox still waits for its call (it may have died with the zygote
    /// that cloned it, or been killed from outside).
    fn alive(&mut self) -> bool {
        matches!(
            self.exited.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }
}

/// Why a sandbox could not be built; the message is what the backend is told.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("airlockd has no runtime configured for {0}")]
    NoRuntime(Language),
    #[error("cannot create session folder: {0}")]
    Session(std::io::Error),
    #[error("cannot create data socket: {0}")]
    Socket(nix::Error),
    #[error("cannot create the call's cgroup: {0}")]
    Cgroup(airlock_sandbox::cgroup::CgroupError),
    #[error("{0}")]
    Spawn(crate::spawner::SpawnerError),
}

/// Builds one sandbox of `language` for worker `uid` (held by `built_for`'s calls, if
/// any), running and waiting for its call; `session_id` names its session folder and
/// cgroup.
pub async fn build(
    daemon: &Daemon,
    language: Language,
    uid: u32,
    built_for: Option<CallerKey>,
    session_id: Uuid,
) -> Result<Built, BuildError> {
    let config = &daemon.config;
    let rt = config
        .runtimes
        .get(&language)
        .ok_or(BuildError::NoRuntime(language))?;
    let call_id = daemon.next_call_id();
    let t0 = Instant::now();
    // The session folder: removed when the `Built` (or the call holding it) drops.
    let session = SessionDir::create(config, session_id, uid).map_err(BuildError::Session)?;
    let (backend_end, sandbox_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(BuildError::Socket)?;
    let t_session = t0.elapsed();
    // The call's cgroup: memory, pids and CPU limits for every process of the call, and
    // the accounting that tells a memory kill from a crash.
    let limits = &config.limits;
    let cgroup = match &daemon.cgroups {
        Some(root) => Some(CallGroup(Some(
            root.create(
                &format!("call-{session_id}"),
                &CgroupLimits {
                    memory_bytes: limits.memory_mib * 1024 * 1024,
                    pids: limits.pids,
                    cpu_quota_percent: limits.cpu_percent,
                },
            )
            .map_err(BuildError::Cgroup)?,
        ))),
        None => None,
    };
    let mut req = runtime::spawn_request(
        config,
        CallSpec {
            call_id,
            language,
            runtime: rt,
            uid,
            gid: config.workers.gid,
            session_dir: session.path().to_owned(),
            session_target: PathBuf::from("/sessions").join(session_id.to_string()),
        },
    );
    req.cgroup = cgroup.as_ref().and_then(|c| c.0.as_ref()).map(|c| c.join());
    let t_cgroup = t0.elapsed();
    let started = daemon
        .spawner
        .spawn(req, sandbox_end)
        .await
        .map_err(BuildError::Spawn)?;
    let us = |d: Duration| d.as_micros() as u64;
    Ok(Built {
        language,
        uid,
        built_for,
        call_id,
        session_id,
        backend_end,
        pid: started.pid,
        warm: started.warm,
        exited: started.exited,
        cgroup,
        session,
        build_us: [
            us(t_session),
            us(t_cgroup - t_session),
            us(t0.elapsed() - t_cgroup),
        ],
        built_at: Instant::now(),
    })
}

/// How a build ended in the store.
enum Finished {
    Parked,
    /// The daemon is stopping.
    Closed(Built),
    /// Its worker uid went to another caller while it was built.
    Stale(Built),
}

/// The sandboxes waiting for calls, and the builds under way.
#[derive(Default)]
pub struct Prepared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Oldest first.
    parked: VecDeque<Built>,
    building: HashMap<(Language, u32), usize>,
    /// The daemon is stopping: nothing more is prepared or parked.
    closed: bool,
}

impl State {
    fn parked(&self, language: Language, uid: Option<u32>) -> usize {
        self.parked
            .iter()
            .filter(|b| b.language == language && uid.is_none_or(|u| b.uid == u))
            .count()
    }

    fn building(&self, language: Language, uid: Option<u32>) -> usize {
        self.building
            .iter()
            .filter(|((l, u), _)| *l == language && uid.is_none_or(|want| *u == want))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Prepared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update below leaves the state consistent before it could panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest live sandbox of `language` for `uid` that `caller`'s call may take, if
    /// any; `caller` holds `uid` now. Every waiting sandbox of `uid` is bound to
    /// `caller` from here on (it waits while `caller`'s scripts run as `uid`), and those
    /// bound to an earlier holder of `uid` are returned in the second place, to be
    /// discarded: a sandbox never serves a caller other than the one whose scripts
    /// shared its uid while it waited. Dead sandboxes met on the way are dropped.
    pub fn take(
        &self,
        language: Language,
        uid: u32,
        caller: &CallerKey,
    ) -> (Option<Built>, Vec<Built>) {
        let mut stale = Vec::new();
        let mut dead = Vec::new();
        let found = {
            let mut st = self.lock();
            let mut kept = VecDeque::with_capacity(st.parked.len());
            for mut b in st.parked.drain(..) {
                if b.uid != uid {
                    kept.push_back(b);
                    continue;
                }
                match &b.built_for {
                    None => b.built_for = Some(caller.clone()),
                    Some(c) if c != caller => {
                        stale.push(b);
                        continue;
                    }
                    Some(_) => {}
                }
                kept.push_back(b);
            }
            st.parked = kept;
            loop {
                let Some(i) = st
                    .parked
                    .iter()
                    .position(|b| b.language == language && b.uid == uid)
                else {
                    break None;
                };
                let Some(mut b) = st.parked.remove(i) else {
                    break None;
                };
                if b.alive() {
                    break Some(b);
                }
                dead.push(b);
            }
        };
        for b in &dead {
            tracing::info!(
                call_id = b.call_id,
                "a prepared sandbox died before its call; discarded"
            );
        }
        (found, stale)
    }

    /// How many sandboxes of `language` wait for `uid` now (dead ones not yet met by
    /// `take` included).
    pub fn waiting(&self, language: Language, uid: u32) -> usize {
        self.lock().parked(language, Some(uid))
    }

    /// Worker uids with a sandbox of `language` waiting that `caller` may take if it
    /// gets that uid.
    pub fn uids(&self, language: Language, caller: &CallerKey) -> BTreeSet<u32> {
        self.lock()
            .parked
            .iter()
            .filter(|b| b.language == language)
            .filter(|b| b.built_for.as_ref().is_none_or(|c| c == caller))
            .map(|b| b.uid)
            .collect()
    }

    /// Reserves one build for (`language`, `uid`) if that uid has fewer than `cap`
    /// sandboxes waiting or being built. The language keeps at most `cap` in all: to make
    /// room it gives up the oldest waiting for another uid (returned, to be killed); if
    /// every other slot is a build under way, nothing is reserved.
    fn claim(&self, language: Language, uid: u32, cap: usize) -> Option<Vec<Built>> {
        let mut st = self.lock();
        if st.closed || st.parked(language, Some(uid)) + st.building(language, Some(uid)) >= cap {
            return None;
        }
        let over =
            (st.parked(language, None) + st.building(language, None) + 1).saturating_sub(cap);
        let evictable = |b: &Built| b.language == language && b.uid != uid;
        let others = st.parked.iter().filter(|b| evictable(b)).count();
        if over > others {
            // Every other slot is a build under way.
            return None;
        }
        let mut evicted = Vec::new();
        for _ in 0..over {
            if let Some(i) = st.parked.iter().position(&evictable) {
                evicted.extend(st.parked.remove(i));
            }
        }
        *st.building.entry((language, uid)).or_default() += 1;
        Some(evicted)
    }

    /// Ends a build reserved by [`claim`](Self::claim) by parking what it built; once
    /// closed, or if its uid changed hands while it was built, hands it back instead,
    /// still counted as a build until [`unclaim`](Self::unclaim) after it is discarded.
    /// `unchanged` is asked under the store's lock, so that no call takes the uid's
    /// sandboxes between the answer and the parking.
    fn finish(
        &self,
        language: Language,
        uid: u32,
        built: Built,
        unchanged: impl FnOnce() -> bool,
    ) -> Finished {
        let mut st = self.lock();
        if st.closed {
            return Finished::Closed(built);
        }
        if !unchanged() {
            return Finished::Stale(built);
        }
        st.parked.push_back(built);
        drop(st);
        self.unclaim(language, uid);
        Finished::Parked
    }

    /// Ends a build reserved by [`claim`](Self::claim) without parking anything.
    fn unclaim(&self, language: Language, uid: u32) {
        let mut st = self.lock();
        if let Some(n) = st.building.get_mut(&(language, uid)) {
            *n -= 1;
            if *n == 0 {
                st.building.remove(&(language, uid));
            }
        }
    }

    fn close(&self) {
        self.lock().closed = true;
    }

    /// Every waiting sandbox, removed from the store.
    fn drain(&self) -> Vec<Built> {
        self.lock().parked.drain(..).collect()
    }
}

/// Builds sandboxes of `language` for `uid` in the background until the uid has its
/// `prepared` count. A failed build is logged and not retried until the next call.
pub fn refill(daemon: &Arc<Daemon>, language: Language, uid: u32) {
    let Some(rt) = daemon.config.runtimes.get(&language) else {
        return;
    };
    let cap = rt.prepared(language) as usize;
    if cap == 0 {
        return;
    }
    let Some(evicted) = daemon.prepared.claim(language, uid, cap) else {
        tracing::debug!(%language, uid, "no sandbox to prepare now");
        return;
    };
    tracing::debug!(%language, uid, evicted = evicted.len(), "preparing a sandbox");
    // The sandbox shares the uid with the caller whose scripts ran as it last (and may
    // run as it while the sandbox waits): it is bound to that caller (to none if the uid
    // was never used). If the uid goes to another caller before it is parked, it has
    // shared the uid with that one too and is discarded.
    let (tenure, built_for) = daemon.pool.tenure(uid);
    let daemon = daemon.clone();
    tokio::spawn(async move {
        for b in evicted {
            discard(&daemon, b).await;
        }
        match build(&daemon, language, uid, built_for, Uuid::new_v4()).await {
            Ok(b) => {
                let pool = &daemon.pool;
                match daemon
                    .prepared
                    .finish(language, uid, b, || pool.tenure(uid).0 == tenure)
                {
                    Finished::Parked => refill(&daemon, language, uid),
                    Finished::Stale(b) => {
                        tracing::info!(
                            call_id = b.call_id,
                            uid,
                            "the worker uid went to another caller while a sandbox was prepared for it; discarded"
                        );
                        discard(&daemon, b).await;
                        daemon.prepared.unclaim(language, uid);
                        // For the uid's new holder: the uid keeps its count.
                        refill(&daemon, language, uid);
                    }
                    Finished::Closed(late) => {
                        // The daemon is stopping: removed before the build counts as
                        // done, so shutdown waits for it.
                        discard(&daemon, late).await;
                        daemon.prepared.unclaim(language, uid);
                    }
                }
            }
            Err(e) => {
                daemon.prepared.unclaim(language, uid);
                tracing::warn!(%language, uid, error = %e, "cannot prepare a sandbox");
            }
        }
    });
}

/// Kills a waiting sandbox, waits for its exit, and removes its cgroup and session
/// folder before returning.
pub async fn discard(daemon: &Daemon, b: Built) {
    daemon.spawner.kill(b.call_id);
    remove_when_exited(b).await;
}

/// Waits for a killed sandbox's exit, then removes its cgroup and session folder.
async fn remove_when_exited(mut b: Built) {
    let _ = (&mut b.exited).await;
    let Built {
        cgroup, session, ..
    } = b;
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(cg) = cgroup {
            cg.remove_now();
        }
        session.remove_now();
    })
    .await;
}

/// At shutdown: no more sandboxes are prepared; every waiting one, and every one still
/// being built (waited for up to `BUILDS_WAIT`), is killed and its cgroup and session
/// folder removed before this returns. (Left to drops, the removal would go to a
/// blocking pool that is shutting down, leaving mounts and groups behind.)
pub async fn discard_all(daemon: &Daemon) {
    const BUILDS_WAIT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + BUILDS_WAIT;
    daemon.prepared.close();
    loop {
        let waiting = daemon.prepared.drain();
        // All killed first, so they die together.
        for b in &waiting {
            daemon.spawner.kill(b.call_id);
        }
        for b in waiting {
            remove_when_exited(b).await;
        }
        if daemon.prepared.lock().building.is_empty() || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! The worker identity pool: a numeric uid range the daemon owns (no accounts).
//!
//! A caller, (database, role), is mapped onto one worker uid for as long as it has calls
//! running: its concurrent calls share that uid (each still in its own sandbox, session
//! folder and cgroup), and two callers never share a uid at the same time, so a script
//! can never signal or read the files of another caller's script even through a kernel
//! object that namespaces do not cover. When every uid is held by other callers, a call
//! waits up to `workers.queue_timeout_seconds` for one to free.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

/// Who a worker is mapped to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerKey {
    pub database: String,
    pub role: String,
}

#[derive(Debug, Default)]
struct State {
    free: BTreeSet<u32>,
    /// Worker of each caller with calls running, and how many.
    held: HashMap<CallerKey, (u32, usize)>,
    /// Calls waiting for a worker: while any wait, a newcomer does not take a freed uid
    /// ahead of them.
    waiting: usize,
    /// Each uid's last holder, and how many times the uid went to a caller other than
    /// its last holder (see [`WorkerPool::tenure`]).
    tenures: HashMap<u32, (u64, CallerKey)>,
}

/// The pool; cheap to share.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    state: Arc<Mutex<State>>,
    freed: Arc<Notify>,
}

impl WorkerPool {
    pub fn new(uids: impl IntoIterator<Item = u32>) -> WorkerPool {
        WorkerPool {
            state: Arc::new(Mutex::new(State {
                free: uids.into_iter().collect(),
                held: HashMap::new(),
                waiting: 0,
                tenures: HashMap::new(),
            })),
            freed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a task panicked while holding it; every update below
        // leaves the state consistent before it can panic, so keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The caller's worker now, if it has one or a uid is free (and nobody is queued).
    /// A newly mapped caller gets the first free uid of `preferred` if any is free (the
    /// uids with sandboxes prepared), else the lowest free uid.
    pub fn try_acquire(&self, caller: &CallerKey, preferred: &BTreeSet<u32>) -> Option<Lease> {
        self.take(caller, false, preferred)
    }

    fn take(&self, caller: &CallerKey, queued: bool, preferred: &BTreeSet<u32>) -> Option<Lease> {
        let mut st = self.lock();
        if let Some((uid, n)) = st.held.get_mut(caller) {
            *n += 1;
            return Some(self.lease(caller, *uid));
        }
        if !queued && st.waiting > 0 {
            return None;
        }
        let uid = match preferred.iter().find(|u| st.free.contains(u)) {
            Some(&u) => st.free.take(&u)?,
            None => st.free.pop_first()?,
        };
        st.held.insert(caller.clone(), (uid, 1));
        match st.tenures.get_mut(&uid) {
            Some((n, last)) if last != caller => {
                *n += 1;
                *last = caller.clone();
            }
            Some(_) => {}
            None => {
                st.tenures.insert(uid, (1, caller.clone()));
            }
        }
        Some(self.lease(caller, uid))
    }

    /// Waits up to `timeout` for a worker (see [`try_acquire`](Self::try_acquire) for
    /// `preferred`). None: every worker stayed busy.
    pub async fn acquire(
        &self,
        caller: &CallerKey,
        timeout: Duration,
        preferred: &BTreeSet<u32>,
    ) -> Option<Lease> {
        if let Some(lease) = self.try_acquire(caller, preferred) {
            return Some(lease);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let _queued = Queued::join(self);
        loop {
            // Register for the wake-up before looking, so a release between the look
            // and the wait is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(lease) = self.take(caller, true, preferred) {
                return Some(lease);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    fn lease(&self, caller: &CallerKey, uid: u32) -> Lease {
        Lease {
            pool: self.clone(),
            caller: caller.clone(),
            uid,
        }
    }

    fn release(&self, caller: &CallerKey) {
        let mut st = self.lock();
        if let Some((uid, n)) = st.held.get_mut(caller) {
            *n -= 1;
            if *n == 0 {
                let uid = *uid;
                st.held.remove(caller);
                st.free.insert(uid);
                drop(st);
                self.freed.notify_waiters();
            }
        }
    }

    /// The caller whose scripts ran as `uid` last (it may hold the uid now), and the
    /// uid's tenure: a count that grows each time the uid goes to a caller other than
    /// its last holder. While the tenure stays the same, every script that ran as the
    /// uid was that caller's.
    pub fn tenure(&self, uid: u32) -> (u64, Option<CallerKey>) {
        self.lock()
            .tenures
            .get(&uid)
            .map_or((0, None), |(n, last)| (*n, Some(last.clone())))
    }

    /// Workers held right now, by caller: for monitoring and tests.
    pub fn held(&self) -> Vec<(CallerKey, u32, usize)> {
        let st = self.lock();
        st.held
            .iter()
            .map(|(k, (uid, n))| (k.clone(), *uid, *n))
            .collect()
    }
}

/// Counts a waiting call for as long as it waits (also when its future is dropped).
struct Queued<'a>(&'a WorkerPool);

impl<'a> Queued<'a> {
    fn join(pool: &'a WorkerPool) -> Queued<'a> {
        pool.lock().waiting += 1;
        Queued(pool)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// One call's hold on its caller's worker; released on drop.
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    caller: CallerKey,
    pub uid: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.caller);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeSet<u32> {
        BTreeSet::new()
    }

    fn key(role: &str) -> CallerKey {
        CallerKey {
            database: "db".into(),
            role: role.into(),
        }
    }

    #[test]
    fn one_caller_shares_its_worker_and_others_never_do() {
        let pool = WorkerPool::new([10, 11]);
        let a1 = pool.try_acquire(&key("a"), &none()).unwrap();
        let a2 = pool.try_acquire(&key("a"), &none()).unwrap();
        let b = pool.try_acquire(&key("b"), &none()).unwrap();
        assert_eq!(a1.uid, a2.uid);
        assert_ne!(a1.uid, b.uid);
        assert!(
            pool.try_acquire(&key("c"), &none()).is_none(),
            "two workers, three callers"
        );
        drop(a1);
        assert!(
            pool.try_acquire(&key("c"), &none()).is_none(),
            "a still runs a call"
        );
        drop(a2);
        let c = pool.try_acquire(&key("c"), &none()).unwrap();
        assert_ne!(c.uid, b.uid);
    }

    #[test]
    fn a_uids_tenure_changes_only_when_another_caller_takes_it() {
        let pool = WorkerPool::new([10]);
        assert_eq!(pool.tenure(10), (0, None));
        let a1 = pool.try_acquire(&key("a"), &none()).unwrap();
        let (t, last) = pool.tenure(10);
        assert_eq!(last, Some(key("a")));
        // More calls of the same caller, its calls ending, the uid freed and taken by
        // the same caller again: one tenure.
        let a2 = pool.try_acquire(&key("a"), &none()).unwrap();
        drop(a1);
        drop(a2);
        assert_eq!(pool.tenure(10), (t, Some(key("a"))), "freed: still a's");
        let a3 = pool.try_acquire(&key("a"), &none()).unwrap();
        assert_eq!(pool.tenure(10), (t, Some(key("a"))));
        drop(a3);
        // Another caller: a new tenure.
        let _b = pool.try_acquire(&key("b"), &none()).unwrap();
        assert_eq!(pool.tenure(10), (t + 1, Some(key("b"))));
    }

    #[test]
    fn a_new_caller_gets_a_preferred_free_uid_and_never_a_held_one() {
        let pool = WorkerPool::new([10, 11, 12]);
        let prefer: BTreeSet<u32> = [11, 12].into();
        let a = pool.try_acquire(&key("a"), &prefer).unwrap();
        assert_eq!(a.uid, 11, "the first free preferred uid");
        // b prefers 11, held by a: it gets the lowest free uid instead.
        let b = pool.try_acquire(&key("b"), &[11].into()).unwrap();
        assert_eq!(b.uid, 10);
        // An existing mapping wins over any preference.
        let a2 = pool.try_acquire(&key("a"), &[12].into()).unwrap();
        assert_eq!(a2.uid, 11);
    }

    #[test]
    fn the_same_role_in_another_database_is_another_caller() {
        let pool = WorkerPool::new([10, 11]);
        let a = pool.try_acquire(&key("a"), &none()).unwrap();
        let other = CallerKey {
            database: "other".into(),
            role: "a".into(),
        };
        let b = pool.try_acquire(&other, &none()).unwrap();
        assert_ne!(a.uid, b.uid);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_newcomer_does_not_overtake_a_waiting_call() {
        let pool = WorkerPool::new([10]);
        let held = pool.try_acquire(&key("a"), &none()).unwrap();
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.acquire(&key("b"), Duration::from_secs(10), &none())
                    .await
                    .map(|l| l.uid)
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        // The uid is free, but b waits for it: c must not take it first.
        assert!(pool.try_acquire(&key("c"), &none()).is_none());
        assert_eq!(waiter.await.unwrap(), Some(10));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_waiting_call_gets_the_first_freed_worker_or_times_out() {
        let pool = WorkerPool::new([10]);
        let held = pool.try_acquire(&key("a"), &none()).unwrap();
        assert!(pool
            .acquire(&key("b"), Duration::from_secs(1), &none())
            .await
            .is_none());
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.acquire(&key("b"), Duration::from_secs(10), &none())
                    .await
                    .map(|l| l.uid)
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(10));
    }
}

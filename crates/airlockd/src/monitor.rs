//! What the daemon knows about calls, for the monitoring views: the calls running now,
//! and counters per (language, role) since the daemon started.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use airlock_protocol::{
    audit::{AuditOutcome, Record},
    control::{Caller, Language, SessionInfo, StatsRow},
};
use uuid::Uuid;

#[derive(Debug, Default)]
pub struct Monitor {
    active: Mutex<HashMap<Uuid, SessionInfo>>,
    stats: Mutex<BTreeMap<(String, String), StatsRow>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update below leaves the map consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Monitor {
    /// A call has its worker; it is listed until the returned guard drops.
    pub fn begin(
        self: &Arc<Self>,
        session_id: Uuid,
        caller: &Caller,
        language: Language,
        worker_uid: u32,
    ) -> ActiveGuard {
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        lock(&self.active).insert(
            session_id,
            SessionInfo {
                session_id,
                caller: caller.clone(),
                language,
                worker_uid,
                started_unix_ms,
                state: "starting".into(),
                cpu_ms: 0,
                memory_bytes: 0,
            },
        );
        ActiveGuard {
            monitor: self.clone(),
            session_id,
        }
    }

    /// The sandbox runs.
    pub fn running(&self, session_id: Uuid) {
        if let Some(s) = lock(&self.active).get_mut(&session_id) {
            s.state = "running".into();
        }
    }

    /// What the call's processes used so far.
    pub fn usage(&self, session_id: Uuid, cpu_ms: u64, memory_bytes: u64) {
        if let Some(s) = lock(&self.active).get_mut(&session_id) {
            s.cpu_ms = cpu_ms;
            s.memory_bytes = memory_bytes;
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = lock(&self.active).values().cloned().collect();
        v.sort_by_key(|s| s.started_unix_ms);
        v
    }

    /// Counts a finished call from its audit record.
    pub fn record(&self, r: &Record) {
        let mut stats = lock(&self.stats);
        let row = stats
            .entry((r.language.clone(), r.role.clone()))
            .or_insert_with(|| StatsRow {
                language: r.language.clone(),
                role: r.role.clone(),
                ..StatsRow::default()
            });
        row.calls += 1;
        match r.outcome {
            AuditOutcome::Ok => row.ok += 1,
            AuditOutcome::ScriptError => row.script_errors += 1,
            AuditOutcome::Timeout => row.timeouts += 1,
            AuditOutcome::MemoryLimit => row.memory_limits += 1,
            AuditOutcome::CpuLimit => row.cpu_limits += 1,
            AuditOutcome::Cancelled => row.cancelled += 1,
            AuditOutcome::DaemonError => row.daemon_errors += 1,
        }
        row.total_wall_ms += r.wall_ms;
        row.max_wall_ms = row.max_wall_ms.max(r.wall_ms);
        row.rows_in += r.rows_in.unwrap_or(0);
        row.rows_out += r.rows_out.unwrap_or(0);
    }

    pub fn stats(&self) -> Vec<StatsRow> {
        lock(&self.stats).values().cloned().collect()
    }
}

/// Removes a call from the running list when dropped.
pub struct ActiveGuard {
    monitor: Arc<Monitor>,
    session_id: Uuid,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        lock(&self.monitor.active).remove(&self.session_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: &str) -> Caller {
        Caller {
            database: "db".into(),
            role: role.into(),
            backend_pid: 7,
        }
    }

    #[test]
    fn a_call_is_listed_while_it_runs() {
        let m = Arc::new(Monitor::default());
        let id = Uuid::new_v4();
        let g = m.begin(id, &caller("a"), Language::Python, 61000);
        assert_eq!(m.sessions()[0].state, "starting");
        m.running(id);
        m.usage(id, 12, 34);
        let s = &m.sessions()[0];
        assert_eq!(
            (s.state.as_str(), s.cpu_ms, s.memory_bytes),
            ("running", 12, 34)
        );
        drop(g);
        assert!(m.sessions().is_empty());
    }
}

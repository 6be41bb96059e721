//! The audit log: one JSON record per call, appended to `audit_log` (default
//! `<state_dir>/audit.jsonl`), each carrying the SHA-256 of the line before it.
//!
//! The format and the chain rule are `airlock_protocol::audit`, shared with
//! `airlock audit verify`. This module owns the file: opened once at start with
//! `O_APPEND`, mode 0600, never through a symlink; its last line read back so the chain
//! continues across restarts. One dedicated thread writes and `fdatasync`s each record,
//! so a record is on disk before the next is written and the event loop never waits on
//! the disk: calls hand their record over a channel and go on.
//!
//! Every call that got a worker and a session id gets exactly one record: a
//! [`CallRecord`] is made when the call starts and written when it drops, as a daemon
//! error if the call never reached an outcome.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Instant,
};

use airlock_protocol::{
    audit::{AuditOutcome, Chain, Record},
    control::{Caller, Language, Outcome},
};
use airlock_sandbox::cgroup::CgroupStats;
use nix::sys::signal::Signal;
use uuid::Uuid;

/// A last line longer than this was not written by us (records are a few hundred bytes);
/// the daemon refuses to guess where the chain goes on.
const MAX_TAIL: u64 = 1 << 20;

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the last record of audit log {path}: {source}")]
    ReadTail { path: PathBuf, source: io::Error },
    #[error("audit log {path} ends in a line of {len} bytes, which airlockd did not write; move the file aside to start a new log")]
    TailTooLong { path: PathBuf, len: u64 },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(io::Error),
}

/// The audit file, open and positioned to continue its chain; not yet written to.
pub struct AuditFile {
    path: PathBuf,
    file: File,
    chain: Chain,
    /// The file's last line has no newline (a write cut short): end it before appending.
    unterminated: bool,
}

impl AuditFile {
    /// Opens (creating, mode 0600) the log at `path` and reads its last line.
    pub fn open(path: &Path) -> Result<AuditFile, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            // A symlink planted at the path must not redirect root's writes.
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(io::Error::other("not a regular file")));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the audit log is accessible to other users; chmod 600 it");
        }
        let tail = last_line(&file, meta.len()).map_err(|e| match e {
            TailError::Io(source) => AuditError::ReadTail {
                path: path.to_owned(),
                source,
            },
            TailError::TooLong(len) => AuditError::TailTooLong {
                path: path.to_owned(),
                len,
            },
        })?;
        let (chain, unterminated) = match tail {
            None => (Chain::new(), false),
            Some((line, terminated)) => {
                if let Err(e) = serde_json::from_slice::<Record>(&line) {
                    // Keep going: the next record chains to the damaged line as it is, so
                    // `airlock audit verify` points at the damage rather than at us.
                    tracing::error!(path = %path.display(), error = %e,
                        "the last line of the audit log is not a valid record; continuing the chain after it");
                }
                (Chain::resume(&line), !terminated)
            }
        };
        tracing::info!(path = %path.display(), prev_sha256 = chain.prev(), "audit log open");
        Ok(AuditFile {
            path: path.to_owned(),
            file,
            chain,
            unterminated,
        })
    }

    /// Starts the writer thread. Call after the spawner helper is launched (no threads
    /// before that fork).
    pub fn start(self) -> Result<(AuditLog, AuditWriter), AuditError> {
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || self.write_all(rx))
            .map_err(AuditError::Thread)?;
        Ok((AuditLog { tx, monitor: None }, AuditWriter { thread }))
    }

    /// The writer thread: until every [`AuditLog`] is dropped.
    fn write_all(mut self, rx: mpsc::Receiver<Record>) {
        for record in rx {
            let line = match self.chain.seal(record) {
                Ok(line) => line,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an audit record");
                    continue;
                }
            };
            let mut buf = Vec::with_capacity(line.len() + 2);
            if self.unterminated {
                buf.push(b'\n');
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            // One write per record (O_APPEND: never interleaved, never overwriting), then
            // to disk before the next. If it fails, the chain has still moved on, so
            // verify will report the gap; the record itself goes to the daemon's log.
            match (&self.file).write_all(&buf) {
                Ok(()) => {
                    self.unterminated = false;
                    // The line is complete in the file; only its durability is in doubt.
                    if let Err(e) = self.file.sync_data() {
                        tracing::error!(path = %self.path.display(), error = %e,
                            "cannot sync the audit log to disk");
                    }
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, record = %line,
                        "cannot write the audit log; the record is lost from the file");
                    // A partial write may have left half a line: start the next on its own.
                    self.unterminated = true;
                }
            }
        }
    }
}

/// Where calls send their records; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Record>,
    /// Also counts each record for `airlock.execution_stats`.
    monitor: Option<std::sync::Arc<crate::monitor::Monitor>>,
}

impl AuditLog {
    /// Counts every record in `monitor` as well.
    pub fn with_monitor(mut self, monitor: std::sync::Arc<crate::monitor::Monitor>) -> Self {
        self.monitor = Some(monitor);
        self
    }

    fn send(&self, record: Record) {
        if let Some(m) = &self.monitor {
            m.record(&record);
        }
        if let Err(mpsc::SendError(record)) = self.tx.send(record) {
            // Only if the writer thread panicked.
            tracing::error!(?record, "the audit writer is gone; record lost");
        }
    }
}

/// The writer thread; [`AuditWriter::finish`] waits for it to write what is queued.
pub struct AuditWriter {
    thread: thread::JoinHandle<()>,
}

impl AuditWriter {
    /// Waits until every [`AuditLog`] is dropped and every record is written.
    pub fn finish(self) {
        if self.thread.join().is_err() {
            tracing::error!("the audit writer thread panicked");
        }
    }
}

/// One call's record in the making; written to the log when dropped.
pub struct CallRecord {
    log: AuditLog,
    began: Instant,
    /// Set by [`CallRecord::ended`]; if never set, the call is a daemon error.
    ended: bool,
    /// Always Some until dropped.
    record: Option<Record>,
}

impl CallRecord {
    /// The record of a call that has just been given `worker_uid` and `session_id`.
    pub fn begin(
        log: &AuditLog,
        caller: &Caller,
        worker_uid: u32,
        session_id: Uuid,
        language: Language,
        script_sha256: &str,
    ) -> CallRecord {
        CallRecord {
            log: log.clone(),
            began: Instant::now(),
            ended: false,
            record: Some(Record {
                time: String::new(),
                database: caller.database.clone(),
                role: caller.role.clone(),
                backend_pid: caller.backend_pid,
                worker_uid,
                session_id,
                language: language.as_str().to_owned(),
                script_sha256: script_sha256.to_owned(),
                rows_in: None,
                rows_out: None,
                wall_ms: 0,
                cpu_ms: None,
                peak_memory_bytes: None,
                outcome: AuditOutcome::DaemonError,
                // Set by the writer's chain.
                prev_sha256: String::new(),
            }),
        }
    }

    /// The sandbox is gone: how, and what it used (None without a cgroup).
    pub fn ended(&mut self, outcome: &Outcome, stats: Option<&CgroupStats>) {
        self.ended = true;
        let began = self.began;
        if let Some(r) = &mut self.record {
            stamp(r, began);
            r.outcome = audit_outcome(outcome);
            r.cpu_ms = stats.map(|s| s.cpu_usage_usec / 1000);
            r.peak_memory_bytes = stats.map(|s| s.memory_peak_bytes);
        }
    }

    /// Whether the backend's counts are in.
    pub fn has_report(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.rows_in.is_some())
    }

    /// The backend's count of rows in and out.
    pub fn report(&mut self, rows_in: u64, rows_out: u64) {
        if let Some(r) = &mut self.record {
            r.rows_in = Some(rows_in);
            r.rows_out = Some(rows_out);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        if !self.ended {
            // The call failed before its sandbox ran, or its task was dropped.
            stamp(&mut record, self.began);
        }
        self.log.send(record);
    }
}

/// The end time and the wall-clock time since `began`.
fn stamp(record: &mut Record, began: Instant) {
    record.time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    record.wall_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
}

/// Signals a process gets from its own faults: the script crashed the runtime (or made a
/// syscall seccomp kills for), rather than anything killing it from outside.
const FAULT_SIGNALS: &[Signal] = &[
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
    Signal::SIGSYS,
];

/// The audit log's name for how a sandbox ended.
pub fn audit_outcome(outcome: &Outcome) -> AuditOutcome {
    match outcome {
        Outcome::Exited { code: 0 } => AuditOutcome::Ok,
        Outcome::Exited { .. } => AuditOutcome::ScriptError,
        Outcome::Signaled { signal } if FAULT_SIGNALS.iter().any(|s| *s as i32 == *signal) => {
            AuditOutcome::ScriptError
        }
        // SIGKILL or SIGTERM from outside the sandbox, or a lost spawner: not the
        // script's doing, and not a limit the daemon enforced.
        Outcome::Signaled { .. } => AuditOutcome::DaemonError,
        Outcome::TimedOut { .. } => AuditOutcome::Timeout,
        Outcome::MemoryLimit { .. } => AuditOutcome::MemoryLimit,
        Outcome::CpuLimit { .. } => AuditOutcome::CpuLimit,
        Outcome::Cancelled => AuditOutcome::Cancelled,
    }
}

enum TailError {
    Io(io::Error),
    TooLong(u64),
}

/// The file's last line (without its newline) and whether it had one; None if empty.
fn last_line(file: &File, len: u64) -> Result<Option<(Vec<u8>, bool)>, TailError> {
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)
        .map_err(TailError::Io)?;
    let terminated = last[0] == b'\n';
    let end = if terminated { len - 1 } else { len };
    // Walk back in chunks to the newline before the last line, or the start.
    let mut start = end;
    let mut chunk = vec![0u8; 8192];
    'search: while start > 0 {
        let n = chunk.len().min(start as usize);
        let at = start - n as u64;
        file.read_exact_at(&mut chunk[..n], at)
            .map_err(TailError::Io)?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            start = at + i as u64 + 1;
            break 'search;
        }
        start = at;
        if end - start > MAX_TAIL {
            return Err(TailError::TooLong(end - start));
        }
    }
    if end - start > MAX_TAIL {
        return Err(TailError::TooLong(end - start));
    }
    let mut line = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut line, start)
        .map_err(TailError::Io)?;
    Ok(Some((line, terminated)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_protocol::audit::verify;

    fn caller() -> Caller {
        Caller {
            database: "db".into(),
            role: "analyst".into(),
            backend_pid: 77,
        }
    }

    fn write_calls(path: &Path, outcomes: &[Outcome]) {
        let (log, writer) = AuditFile::open(path).unwrap().start().unwrap();
        for o in outcomes {
            let mut rec = CallRecord::begin(
                &log,
                &caller(),
                62000,
                Uuid::new_v4(),
                Language::Python,
                "ab",
            );
            rec.ended(o, None);
            rec.report(3, 2);
        }
        drop(log);
        writer.finish();
    }

    fn verify_file(path: &Path) -> Result<usize, airlock_protocol::audit::VerifyError> {
        verify(io::BufReader::new(File::open(path).unwrap()))
    }

    #[test]
    fn records_chain_across_restarts_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_calls(
            &path,
            &[Outcome::Exited { code: 0 }, Outcome::Exited { code: 1 }],
        );
        write_calls(&path, &[Outcome::TimedOut { limit_ms: 5 }]);
        assert_eq!(verify_file(&path).unwrap(), 3);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let outcomes: Vec<_> = records.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                AuditOutcome::Ok,
                AuditOutcome::ScriptError,
                AuditOutcome::Timeout
            ]
        );
        assert_eq!(records[0].rows_in, Some(3));
        assert_eq!(records[0].rows_out, Some(2));
        assert_eq!(records[0].cpu_ms, None);
        assert!(records[0].time.ends_with('Z'), "{}", records[0].time);
    }

    #[test]
    fn a_call_that_never_ended_is_a_daemon_error_without_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, writer) = AuditFile::open(&path).unwrap().start().unwrap();
        drop(CallRecord::begin(
            &log,
            &caller(),
            62000,
            Uuid::nil(),
            Language::Python,
            "ab",
        ));
        drop(log);
        writer.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let r: Record = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(r.outcome, AuditOutcome::DaemonError);
        assert_eq!((r.rows_in, r.rows_out), (None, None));
        assert!(text.contains("\"rows_out\":null"), "{text}");
    }

    #[test]
    fn a_cut_off_last_line_is_ended_and_chained_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_calls(
            &path,
            &[Outcome::Exited { code: 0 }, Outcome::Exited { code: 0 }],
        );
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        write_calls(&path, &[Outcome::Exited { code: 0 }]);
        let e = verify_file(&path).unwrap_err();
        assert_eq!(e.record, 2, "{e}");
        assert!(e.to_string().contains("unparsable JSON"), "{e}");
        // The new record starts a line of its own.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        let path = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            AuditFile::open(&path),
            Err(AuditError::Open { .. })
        ));
        assert!(!target.exists());
    }

    #[test]
    fn outcomes_map_to_the_audit_names() {
        assert_eq!(
            audit_outcome(&Outcome::Exited { code: 0 }),
            AuditOutcome::Ok
        );
        assert_eq!(
            audit_outcome(&Outcome::Exited { code: 2 }),
            AuditOutcome::ScriptError
        );
        assert_eq!(
            audit_outcome(&Outcome::Signaled {
                signal: Signal::SIGSEGV as i32
            }),
            AuditOutcome::ScriptError
        );
        assert_eq!(
            audit_outcome(&Outcome::Signaled {
                signal: Signal::SIGKILL as i32
            }),
            AuditOutcome::DaemonError
        );
        assert_eq!(
            audit_outcome(&Outcome::CpuLimit { limit_seconds: 1 }),
            AuditOutcome::CpuLimit
        );
        assert_eq!(
            audit_outcome(&Outcome::MemoryLimit { limit_bytes: 1 }),
            AuditOutcome::MemoryLimit
        );
        assert_eq!(audit_outcome(&Outcome::Cancelled), AuditOutcome::Cancelled);
    }
}

//! The control conversation: Postgres backend ⇄ `airlockd`, over the daemon's socket.
//!
//! ```text
//! backend                               airlockd
//!   Hello{version}            ───────►
//!                             ◄───────  Hello{version} | Refused
//!   Execute{language, ...}    ───────►
//!                             ◄───────  Started{session_id, worker_uid} + SCM_RIGHTS(data fd)
//!                                       | Refused
//!   ... backend and runtime talk over the data fd ...
//!   Report{rows_in, rows_out} ───────►   (after the runtime's done or script_error)
//!                             ◄───────  Ended{outcome}       (when the sandbox is gone)
//! ```
//! Closing the control connection before `Ended` means "cancel": the daemon kills the
//! call's sandbox. `Report` and `Ended` may cross: the backend sends its report without
//! waiting, and the daemon waits a while for it after `Ended` to complete its audit
//! record. Anything else the backend sends after `Execute` counts as hanging up.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A script language the daemon can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    /// R (runtimes/r): users write `language => 'R'` or `'r'`.
    R,
}

impl Language {
    pub const ALL: &'static [Language] = &[Language::Python, Language::R];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::R => "r",
        }
    }

    /// Parses a user-supplied language name, case-insensitively.
    pub fn parse(name: &str) -> Option<Language> {
        Language::ALL
            .iter()
            .copied()
            .find(|l| l.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is asking, as the backend knows it. The daemon records it; it never decides
/// permissions from it (the extension already did).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub database: String,
    pub role: String,
    pub backend_pid: i32,
}

/// Backend → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        version: u32,
        /// Free-form name of the client build, for the daemon's log.
        client: String,
    },
    Execute {
        language: Language,
        caller: Caller,
        /// Hex SHA-256 of the script text, for the daemon's records.
        script_sha256: String,
    },
    /// What the backend counted, for the daemon's audit record: rows sent to the script,
    /// and rows of its output accepted (0 after a script error).
    Report { rows_in: u64, rows_out: u64 },
    /// Every call running now, for `airlock.active_sessions`.
    ListSessions,
    /// Counters per language and role since the daemon started, for
    /// `airlock.execution_stats`.
    Stats,
}

/// Why the daemon refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The peer speaks another protocol version.
    Version,
    /// The language has no runtime configured on this daemon.
    Language,
    /// Every worker identity is busy.
    Busy,
    /// The sandbox could not be created.
    Sandbox,
    /// The request was not valid at this point of the conversation.
    Protocol,
}

/// How a call's sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The runtime exited by itself with this status.
    Exited { code: i32 },
    /// The runtime was killed by a signal the daemon did not send.
    Signaled { signal: i32 },
    /// The daemon killed the sandbox at the wall-clock limit.
    TimedOut { limit_ms: u64 },
    /// The sandbox hit its memory limit and was killed.
    MemoryLimit { limit_bytes: u64 },
    /// The sandbox's processes used up their CPU-time limit and were killed.
    CpuLimit { limit_seconds: u64 },
    /// The backend went away (cancel, statement_timeout, error) and the daemon killed the
    /// sandbox.
    Cancelled,
}

/// Daemon → backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        daemon: String,
    },
    Refused {
        reason: RefusalKind,
        message: String,
    },
    /// The sandbox is running; this frame carries the backend's end of the data
    /// socketpair as `SCM_RIGHTS`.
    Started {
        session_id: Uuid,
        worker_uid: u32,
        /// Wall-clock limit the daemon enforces, so the backend can name it in errors.
        wall_limit_ms: u64,
    },
    Ended {
        outcome: Outcome,
    },
    Sessions {
        sessions: Vec<SessionInfo>,
    },
    Stats {
        rows: Vec<StatsRow>,
    },
}

/// One running call, as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: Uuid,
    pub caller: Caller,
    pub language: Language,
    pub worker_uid: u32,
    /// Milliseconds since the Unix epoch when the call got its worker.
    pub started_unix_ms: u64,
    /// "starting" until the sandbox runs, then "running".
    pub state: String,
    /// CPU time and peak memory of the call's processes so far (0 without cgroups).
    pub cpu_ms: u64,
    pub memory_bytes: u64,
}

/// Counters of one (language, role) since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRow {
    pub language: String,
    pub role: String,
    pub calls: u64,
    pub ok: u64,
    pub script_errors: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub cpu_limits: u64,
    pub cancelled: u64,
    pub daemon_errors: u64,
    pub total_wall_ms: u64,
    pub max_wall_ms: u64,
    pub rows_in: u64,
    pub rows_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_is_stable() {
        let r = Request::Execute {
            language: Language::Python,
            caller: Caller {
                database: "db".into(),
                role: "r".into(),
                backend_pid: 4,
            },
            script_sha256: "ab".into(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"type":"execute","language":"python","caller":{"database":"db","role":"r","backend_pid":4},"script_sha256":"ab"}"#
        );
        let e = Reply::Ended {
            outcome: Outcome::TimedOut { limit_ms: 5 },
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"ended","outcome":{"kind":"timed_out","limit_ms":5}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Report {
                rows_in: 3,
                rows_out: 2
            })
            .unwrap(),
            r#"{"type":"report","rows_in":3,"rows_out":2}"#
        );
    }

    #[test]
    fn language_parse() {
        assert_eq!(Language::parse(" Python "), Some(Language::Python));
        assert_eq!(Language::parse("R"), Some(Language::R));
        assert_eq!(Language::parse("r"), Some(Language::R));
        assert_eq!(Language::parse("cobol"), None);
        assert_eq!(serde_json::to_string(&Language::R).unwrap(), r#""r""#);
    }
}

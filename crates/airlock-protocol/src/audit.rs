//! The audit log's format: one JSON [`Record`] per line, each carrying the SHA-256 of the
//! line before it, and the check of that chain ([`verify`]).
//!
//! The daemon writes the log (`airlockd::audit`); `airlock audit verify` reads it. Both use
//! this module, so the format and the chain rule live in one place. Nothing here opens
//! files: the writer hands in its last line, the verifier hands in a reader.
//!
//! The chain rule: `prev_sha256` of a record is the lowercase hex SHA-256 of the previous
//! line's exact bytes, without its newline; the first record's is [`GENESIS`]. Editing a
//! record changes its hash, so the next record's `prev_sha256` no longer matches; deleting
//! one leaves its successor pointing at a line that is not there. Neither can be hidden
//! without rewriting every later record (see docs/SECURITY.md for what that leaves open).

use std::io::BufRead;

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// `prev_sha256` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a call ended, as the audit log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// The runtime exited with status 0.
    Ok,
    /// The script failed: an exception (non-zero exit), or the runtime killed itself with
    /// a fault signal (segfault, abort, a syscall seccomp kills for).
    ScriptError,
    /// The wall-clock limit.
    Timeout,
    /// The memory limit (the cgroup's OOM kill).
    MemoryLimit,
    /// The CPU-time limit.
    CpuLimit,
    /// The backend went away first (cancel, statement_timeout, an error in the backend).
    Cancelled,
    /// The daemon could not run the call (session folder, cgroup, spawner), or the
    /// sandbox was killed by something other than its own fault.
    DaemonError,
}

/// One call. Field order is the order on disk; nullable fields must still be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the call ended, RFC 3339 in UTC.
    pub time: String,
    pub database: String,
    /// The calling role as the backend reported it (the effective role).
    pub role: String,
    pub backend_pid: i32,
    pub worker_uid: u32,
    pub session_id: Uuid,
    /// A string, not [`crate::control::Language`], so that a verifier older than the
    /// daemon still reads records of languages it does not know.
    pub language: String,
    /// Hex SHA-256 of the script text.
    pub script_sha256: String,
    /// Rows the backend sent the script; null if the backend did not report.
    #[serde(deserialize_with = "required")]
    pub rows_in: Option<u64>,
    /// Rows the backend accepted from the script; null if the backend did not report.
    #[serde(deserialize_with = "required")]
    pub rows_out: Option<u64>,
    /// From the request to the end of the sandbox.
    pub wall_ms: u64,
    /// CPU time of every process of the call (cgroup); null without cgroups.
    #[serde(deserialize_with = "required")]
    pub cpu_ms: Option<u64>,
    /// Peak memory of the call's cgroup; null without cgroups.
    #[serde(deserialize_with = "required")]
    pub peak_memory_bytes: Option<u64>,
    pub outcome: AuditOutcome,
    /// Hex SHA-256 of the previous line; [`GENESIS`] for the first. Set by [`Chain::seal`].
    pub prev_sha256: String,
}

/// A nullable field that must still be present: serde's default for `Option` would read
/// a deleted field as null, hiding the edit.
fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(d)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The writer's end of the chain: the hash of the last line written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    prev: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

impl Chain {
    /// A new, empty log.
    pub fn new() -> Chain {
        Chain {
            prev: GENESIS.to_owned(),
        }
    }

    /// Continues a log whose last line (without its newline) is `last_line`, whatever it
    /// holds: if that line is damaged, the next record still points at it, and
    /// [`verify`] reports the damage where it is.
    pub fn resume(last_line: &[u8]) -> Chain {
        Chain {
            prev: sha256_hex(last_line),
        }
    }

    /// What the next record's `prev_sha256` will be.
    pub fn prev(&self) -> &str {
        &self.prev
    }

    /// Sets `record.prev_sha256`, serializes it as one line (no newline) and advances the
    /// chain past it.
    pub fn seal(&mut self, mut record: Record) -> Result<String, serde_json::Error> {
        record.prev_sha256 = std::mem::take(&mut self.prev);
        match serde_json::to_string(&record) {
            Ok(line) => {
                self.prev = sha256_hex(line.as_bytes());
                Ok(line)
            }
            Err(e) => {
                self.prev = record.prev_sha256;
                Err(e)
            }
        }
    }
}

/// What is wrong at the first broken link.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error("cannot read the line: {0}")]
    Read(#[source] std::io::Error),
    #[error("unparsable JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("not a valid record: {0}")]
    Field(#[source] serde_json::Error),
    #[error("record {record} was modified, or the record after it deleted (record {next}'s prev_sha256 does not match)", next = .record + 1)]
    Modified { record: usize },
    #[error("prev_sha256 is not {GENESIS}: the first record was modified, or the records before it deleted")]
    NotFirst,
}

/// The first broken link of a log: record `record` (1-based, which is also its line).
#[derive(Debug, thiserror::Error)]
#[error("audit log BROKEN at record {record} (line {record}): {what}")]
pub struct VerifyError {
    pub record: usize,
    pub what: Broken,
}

/// Reads a whole log and checks every link. Returns how many records it holds.
///
/// A record whose `prev_sha256` does not match is reported as a modification of the
/// record before it (that is the line whose hash changed), or, for the first record, as
/// a broken start. A last line without its newline is accepted if it is a whole record;
/// a cut-off record is unparsable JSON.
pub fn verify<R: BufRead>(mut reader: R) -> Result<usize, VerifyError> {
    let mut prev = GENESIS.to_owned();
    let mut line = Vec::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let broken = |what| VerifyError {
            record: n + 1,
            what,
        };
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(n),
            Ok(_) => {}
            Err(e) => return Err(broken(Broken::Read(e))),
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let record: Record = serde_json::from_slice(&line).map_err(|e| {
            broken(if e.is_data() {
                Broken::Field(e)
            } else {
                Broken::Json(e)
            })
        })?;
        if record.prev_sha256 != prev {
            return Err(if n == 0 {
                broken(Broken::NotFirst)
            } else {
                VerifyError {
                    record: n,
                    what: Broken::Modified { record: n },
                }
            });
        }
        prev = sha256_hex(&line);
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> Record {
        Record {
            time: format!("2025-01-0{i}T00:00:00.000Z"),
            database: "db".into(),
            role: "analyst".into(),
            backend_pid: 4242,
            worker_uid: 62000,
            session_id: Uuid::nil(),
            language: "python".into(),
            script_sha256: sha256_hex(b"OutputDataSet = InputDataSet"),
            rows_in: Some(3),
            rows_out: Some(i),
            wall_ms: 120,
            cpu_ms: None,
            peak_memory_bytes: Some(1 << 20),
            outcome: AuditOutcome::Ok,
            prev_sha256: String::new(),
        }
    }

    /// Three records, as the daemon writes them.
    fn three() -> Vec<String> {
        let mut chain = Chain::new();
        (1..=3).map(|i| chain.seal(record(i)).unwrap()).collect()
    }

    fn file(lines: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }

    fn check(bytes: &[u8]) -> Result<usize, VerifyError> {
        verify(std::io::Cursor::new(bytes))
    }

    #[test]
    fn three_records_verify() {
        let lines = three();
        assert!(lines[0].contains(&format!("\"prev_sha256\":\"{GENESIS}\"")));
        assert!(lines[2].contains(&sha256_hex(lines[1].as_bytes())));
        assert_eq!(check(&file(&lines)).unwrap(), 3);
        assert_eq!(check(b"").unwrap(), 0);
    }

    #[test]
    fn record_shape_is_stable() {
        let line = Chain::new().seal(record(1)).unwrap();
        assert_eq!(
            line,
            format!(
                r#"{{"time":"2025-01-01T00:00:00.000Z","database":"db","role":"analyst","backend_pid":4242,"worker_uid":62000,"session_id":"00000000-0000-0000-0000-000000000000","language":"python","script_sha256":"{}","rows_in":3,"rows_out":1,"wall_ms":120,"cpu_ms":null,"peak_memory_bytes":1048576,"outcome":"ok","prev_sha256":"{GENESIS}"}}"#,
                sha256_hex(b"OutputDataSet = InputDataSet")
            )
        );
    }

    #[test]
    fn an_edited_record_is_named() {
        let mut lines = three();
        lines[1] = lines[1].replace("\"rows_out\":2", "\"rows_out\":7");
        let e = check(&file(&lines)).unwrap_err();
        assert_eq!(e.record, 2);
        assert_eq!(
            e.to_string(),
            "audit log BROKEN at record 2 (line 2): record 2 was modified, or the record after it deleted (record 3's prev_sha256 does not match)"
        );
    }

    #[test]
    fn an_edited_first_record_is_named() {
        let mut lines = three();
        lines[0] = lines[0].replace("analyst", "someone");
        let e = check(&file(&lines)).unwrap_err();
        assert_eq!(e.record, 1);
        assert!(matches!(e.what, Broken::Modified { record: 1 }), "{e}");
    }

    #[test]
    fn a_deleted_middle_record_is_found() {
        let mut lines = three();
        lines.remove(1);
        let e = check(&file(&lines)).unwrap_err();
        // The record before the gap is where the chain breaks.
        assert_eq!(e.record, 1);
        assert!(matches!(e.what, Broken::Modified { record: 1 }), "{e}");
    }

    #[test]
    fn a_deleted_first_record_is_found() {
        let mut lines = three();
        lines.remove(0);
        let e = check(&file(&lines)).unwrap_err();
        assert_eq!(e.record, 1);
        assert!(matches!(e.what, Broken::NotFirst), "{e}");
    }

    #[test]
    fn a_truncated_last_line_is_unparsable() {
        let bytes = file(&three());
        let cut = &bytes[..bytes.len() - 20];
        let e = check(cut).unwrap_err();
        assert_eq!(e.record, 3);
        assert!(matches!(e.what, Broken::Json(_)), "{e}");
        assert!(e.to_string().contains("unparsable JSON"), "{e}");
    }

    #[test]
    fn a_missing_newline_at_the_end_is_accepted() {
        let bytes = file(&three());
        assert_eq!(check(&bytes[..bytes.len() - 1]).unwrap(), 3);
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let mut lines = three();
        lines[1] = lines[1].replace("\"rows_out\":2,", "");
        let e = check(&file(&lines)).unwrap_err();
        assert_eq!(e.record, 2);
        assert!(e.to_string().contains("missing field `rows_out`"), "{e}");

        let mut lines = three();
        lines[2] = lines[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"fine\"");
        let e = check(&file(&lines)).unwrap_err();
        assert_eq!(e.record, 3);
        assert!(matches!(e.what, Broken::Field(_)), "{e}");
    }

    #[test]
    fn a_blank_line_is_a_broken_record() {
        let mut bytes = file(&three());
        bytes.splice(0..0, *b"\n");
        let e = check(&bytes).unwrap_err();
        assert_eq!(e.record, 1);
        assert!(matches!(e.what, Broken::Json(_)), "{e}");
    }

    #[test]
    fn a_resumed_chain_continues_from_the_last_line() {
        let lines = three();
        let mut chain = Chain::resume(lines[2].as_bytes());
        let mut all = lines.clone();
        all.push(chain.seal(record(4)).unwrap());
        assert_eq!(check(&file(&all)).unwrap(), 4);
        assert_eq!(chain.prev(), sha256_hex(all[3].as_bytes()));
    }

    #[test]
    fn a_resumed_chain_after_a_damaged_line_points_at_the_damage() {
        // The daemon restarts after a crash cut its last write short: the next record
        // still chains to the damaged bytes, and verify names the damaged line.
        let mut bytes = file(&three());
        bytes.truncate(bytes.len() - 20);
        let damaged = bytes[bytes.iter().rposition(|&b| b == b'\n').unwrap() + 1..].to_vec();
        let mut chain = Chain::resume(&damaged);
        bytes.push(b'\n');
        bytes.extend_from_slice(chain.seal(record(4)).unwrap().as_bytes());
        bytes.push(b'\n');
        let e = check(&bytes).unwrap_err();
        assert_eq!(e.record, 3);
        assert!(matches!(e.what, Broken::Json(_)), "{e}");
    }
}

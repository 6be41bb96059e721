//! `airlock audit verify`: checks the daemon's audit log, whose format and chain rule are
//! `airlock_protocol::audit`.

use std::{fs::File, io::BufReader, path::Path};

use airlock_protocol::audit;
use anyhow::{Context, Result};

/// Where `airlockd` writes its log with the README's config (`state_dir =
/// "/var/lib/airlock"`, no `audit_log`).
pub const DEFAULT_LOG: &str = "/var/lib/airlock/audit.jsonl";

/// Verifies the log at `path`, printing the verdict. Ok(false): the chain is broken.
pub fn verify(path: &Path) -> Result<bool> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match audit::verify(BufReader::new(file)) {
        Ok(n) => {
            println!("audit log OK: {n} records");
            Ok(true)
        }
        Err(e) => {
            println!("{e}");
            Ok(false)
        }
    }
}

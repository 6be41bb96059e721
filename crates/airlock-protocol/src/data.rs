//! The data conversation: Postgres backend ⇄ sandboxed runtime, over the socketpair the
//! daemon hands to both. The runtime shims (`runtimes/`) implement the other end of this
//! module in their own language; keep them in step.
//!
//! ```text
//! backend                                  runtime
//!   Start{script, names, limits}  ───────►
//!   Arrow(batch) *                ───────►   input rows, zero or more batches
//!   InputEnd                      ───────►
//!                                 ◄───────   Print{text} *       (interleaved, any time)
//!                                 ◄───────   Arrow(batch) *      output rows
//!                                 ◄───────   Done{rows} | ScriptError{...}
//! ```
//! Every output batch has the same schema. A runtime that produces zero rows still sends
//! one (empty) batch so the backend can check the columns.
//!
//! The runtime may send output (and prints) before `InputEnd`: with `rows_per_read` the
//! script runs once per chunk while the rest of the input is still coming, so the backend
//! reads whatever the runtime sends while it writes input.
//!
//! **Loopback queries** (`airlock.query` / `airlock.execute` in a script): the runtime
//! sends `Query`, then one Arrow frame with the parameters (one row, one column per
//! `$n`) if `has_params`. The backend runs the statement through SPI as the calling role,
//! in the caller's transaction, and answers `QueryBegin`, the result rows as Arrow frames
//! (for `query`), then `QueryEnd`; or `QueryError` at any point (rows already sent are
//! void). Input frames sent before the answer belong to the input: a runtime waiting for
//! an answer keeps them for later.
//!
//! ```text
//!                                 ◄───────   Query{sql, mode, has_params}
//!                                 ◄───────   Arrow(params)        if has_params
//!   QueryBegin                    ───────►
//!   Arrow(rows) *                 ───────►
//!   QueryEnd{rows} | QueryError   ───────►
//! ```
//!
//! Every input field carries its Postgres type in its metadata
//! ([`crate::types::TYPE_METADATA_KEY`]); `output_columns` gives the caller's declared
//! output types. docs/TYPES.md is the mapping both shims implement.

use serde::{Deserialize, Serialize};

use crate::types::PgType;

/// One column of the caller's column definition list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub pg_type: PgType,
}

/// Backend → runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRuntime {
    Start {
        version: u32,
        script: String,
        /// Variable that holds the input data frame.
        input_name: String,
        /// Variable the script assigns its output data frame to.
        output_name: String,
        /// False when the call had no input query: the script gets an empty frame.
        has_input: bool,
        /// Most bytes of printed output the runtime forwards; past it, one `Print` says
        /// how much was cut.
        max_print_bytes: u64,
        /// Most rows per output batch; the backend refuses larger batches.
        output_batch_rows: u64,
        /// Largest frame the backend accepts from the runtime; larger batches must be
        /// split.
        max_frame_bytes: u64,
        /// Variables set before the script runs: the members of the call's `params`
        /// object. Names are checked by the backend (identifiers, not the input or output
        /// name); values are JSON.
        #[serde(default)]
        params: serde_json::Map<String, serde_json::Value>,
        /// The caller's output columns, in order, with their declared types.
        output_columns: Vec<OutputColumn>,
        /// When set, the output is one row made of these script variables (in this order,
        /// one per output column) instead of the `output_name` data frame.
        #[serde(default)]
        output_params: Option<Vec<String>>,
        /// When set, the script runs once per chunk of at most this many input rows (at
        /// least once, with an empty frame, when there are none), in one process and one
        /// global scope; each run's output frame is sent as it is made.
        #[serde(default)]
        rows_per_read: Option<u64>,
    },
    InputEnd,
    /// The answer to a loopback query starts; Arrow frames up to `QueryEnd` are its rows.
    QueryBegin,
    /// The loopback statement finished: rows returned (`query`) or affected (`execute`).
    QueryEnd {
        rows: u64,
    },
    /// The loopback statement failed; the script gets an exception with these fields.
    QueryError {
        sqlstate: String,
        message: String,
        #[serde(default)]
        detail: Option<String>,
        #[serde(default)]
        hint: Option<String>,
    },
}

/// What a loopback statement returns to the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// The rows, as a data frame.
    Query,
    /// The number of rows affected.
    Execute,
}

/// What part of the runtime's work failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPhase {
    /// The script raised.
    Script,
    /// The script finished but did not leave a usable output frame.
    Output,
    /// The runtime could not read its input.
    Input,
}

/// Runtime → backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromRuntime {
    Print {
        text: String,
    },
    ScriptError {
        phase: ErrorPhase,
        /// The exception's type name, e.g. `ZeroDivisionError`.
        error_type: String,
        message: String,
        traceback: String,
    },
    Done {
        rows: u64,
    },
    /// A loopback statement, run by the backend as the caller.
    Query {
        sql: String,
        mode: QueryMode,
        /// An Arrow frame with the parameters follows.
        #[serde(default)]
        has_params: bool,
    },
}

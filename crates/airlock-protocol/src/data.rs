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

use serde::{Deserialize, Serialize};

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
    },
    InputEnd,
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
}

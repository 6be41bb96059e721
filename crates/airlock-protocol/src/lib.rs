//! Airlock's wire protocol.
//!
//! Three conversations cross process boundaries, and all of them use the same framing:
//!
//! * **control**: the Postgres backend (extension) and the launcher daemon `airlockd`,
//!   over the daemon's Unix socket ([`control`]).
//! * **data**: the Postgres backend and the sandboxed runtime, over a socketpair that the
//!   daemon creates and hands to both ends with `SCM_RIGHTS` ([`data`]).
//! * **spawner**: the daemon and its single-threaded sandbox spawner ([`spawner`]).
//!
//! It also holds the format of the daemon's audit log and its hash chain ([`audit`]),
//! which the daemon writes and `airlock audit verify` checks.
//!
//! A frame is `u32` little-endian length `n`, then `n` bytes: one kind byte and the
//! payload. [`FrameKind::Control`] payloads are one JSON-encoded message; a
//! [`FrameKind::Arrow`] payload is one complete Arrow IPC stream (schema, one record
//! batch, end-of-stream marker). This crate encodes and decodes; it does no I/O and sets
//! no policy on timeouts or blocking.
#![forbid(unsafe_code)]

pub mod audit;
pub mod control;
pub mod data;
pub mod frame;
pub mod spawner;
pub mod types;

pub use frame::{
    begin_frame, decode_control, encode_arrow, encode_control, finish_frame, Frame, FrameDecoder,
    FrameKind,
};

/// Version of the protocol spoken by this build. Both hellos carry it; a peer with a
/// different version is refused with [`control::Reply::Refused`].
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame either side accepts: 1 GiB. A larger length prefix is an error, so a
/// hostile peer cannot make the reader allocate without bound.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// Errors from encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("no memory for a frame of {len} bytes")]
    OutOfMemory { len: usize },
    #[error("empty frame (no kind byte)")]
    EmptyFrame,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
    #[error("malformed control message: {0}")]
    Json(#[from] serde_json::Error),
}

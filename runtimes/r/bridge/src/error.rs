//! What can go wrong in the bridge. Every error reaches R as a value (see
//! `lib.rs::reply`), never as a Rust panic or an R longjmp through Rust frames.

use airlock_protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The backend broke the protocol: bad frame, unexpected message, bad Arrow.
    #[error("{0}")]
    Protocol(String),
    #[error("malformed frame: {0}")]
    Frame(#[from] ProtocolError),
    #[error("the data socket failed: {0}")]
    Io(#[from] std::io::Error),
    /// An input value R cannot hold.
    #[error("{0}")]
    Input(String),
    /// The script's output does not fit the declared columns.
    #[error("{0}")]
    Output(String),
    #[error("a string holds a NUL byte, which R strings cannot")]
    NulInString,
    #[error("{0} elements are more than R allows in one vector or string")]
    TooLong(usize),
    #[error("R refused an operation: {0}")]
    R(String),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("the bridge was called out of order: {0}")]
    State(&'static str),
}

impl BridgeError {
    /// The `error_type` a script_error carries for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            BridgeError::Protocol(_) | BridgeError::Frame(_) | BridgeError::Io(_) => {
                "ProtocolError"
            }
            BridgeError::Input(_) | BridgeError::NulInString => "InputError",
            BridgeError::Output(_) => "OutputError",
            BridgeError::TooLong(_)
            | BridgeError::R(_)
            | BridgeError::Arrow(_)
            | BridgeError::State(_) => "RuntimeFailure",
        }
    }
}

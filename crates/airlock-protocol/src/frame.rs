//! Length-prefixed framing and the incremental decoder.

use serde::{de::DeserializeOwned, Serialize};

use crate::{ProtocolError, MAX_FRAME_LEN};

/// What a frame's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// One JSON-encoded message of the conversation's message type.
    Control = 1,
    /// One complete Arrow IPC stream holding one record batch.
    Arrow = 2,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;
    fn try_from(b: u8) -> Result<Self, ProtocolError> {
        match b {
            1 => Ok(FrameKind::Control),
            2 => Ok(FrameKind::Arrow),
            other => Err(ProtocolError::UnknownKind(other)),
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decodes a control frame's payload as `T`.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        if self.kind != FrameKind::Control {
            return Err(ProtocolError::UnexpectedKind {
                expected: FrameKind::Control,
                got: self.kind,
            });
        }
        decode_control(&self.payload)
    }
}

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

fn encode(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let len = payload.len() + 1;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    // The check above keeps len below 2^30, so it fits in u32.
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Encodes one control message as a complete frame.
pub fn encode_control<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let json = serde_json::to_vec(msg)?;
    encode(FrameKind::Control, &json)
}

/// Encodes one Arrow IPC stream as a complete frame.
pub fn encode_arrow(ipc: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    encode(FrameKind::Arrow, ipc)
}

/// Starts a frame in place: returns a buffer holding a placeholder header, to which the
/// caller appends the payload (for example an Arrow IPC writer writing into it) before
/// calling [`finish_frame`]. Saves copying large payloads.
pub fn begin_frame(kind: FrameKind, capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 1 + capacity);
    buf.extend_from_slice(&[0, 0, 0, 0, kind as u8]);
    buf
}

/// Completes a frame started with [`begin_frame`] by writing its length prefix.
pub fn finish_frame(buf: &mut [u8]) -> Result<(), ProtocolError> {
    if buf.len() <= HEADER_LEN {
        return Err(ProtocolError::EmptyFrame);
    }
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // Checked above: len fits in u32.
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Decodes a control payload.
pub fn decode_control<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Incremental decoder: feed it bytes as they arrive, take frames out as they complete.
///
/// It never holds more than one partial frame plus whatever complete frames the caller
/// has not taken yet, and it refuses a length prefix above [`MAX_FRAME_LEN`] before
/// allocating for it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            limit: MAX_FRAME_LEN,
        }
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses frames above `limit` bytes (at most [`MAX_FRAME_LEN`]):
    /// for reading from an untrusted peer with a tighter memory budget.
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            limit: limit.min(MAX_FRAME_LEN),
            ..Self::default()
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes the frame being assembled needs, if known; a hint for readers
    /// that want to read a large payload in one call.
    pub fn wanted(&self) -> usize {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return HEADER_LEN - avail.len();
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        (HEADER_LEN + len).saturating_sub(avail.len()).max(1)
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.limit {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.limit,
            });
        }
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if avail.len() < HEADER_LEN + len {
            let more = HEADER_LEN + len - avail.len();
            self.buf
                .try_reserve(more)
                .map_err(|_| ProtocolError::OutOfMemory { len })?;
            self.compact();
            return Ok(None);
        }
        let kind = FrameKind::try_from(avail[HEADER_LEN])?;
        let payload = avail[HEADER_LEN + 1..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(Frame { kind, payload }))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Request;

    #[test]
    fn round_trip_byte_by_byte() {
        let msg = Request::Hello {
            version: 7,
            client: "test".into(),
        };
        let mut bytes = encode_control(&msg).unwrap();
        bytes.extend(encode_arrow(b"arrow bytes").unwrap());
        let mut dec = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in &bytes {
            dec.extend(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].control::<Request>().unwrap(), msg);
        assert_eq!(frames[1].kind, FrameKind::Arrow);
        assert_eq!(frames[1].payload, b"arrow bytes");
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn in_place_frame_matches_encoded_frame() {
        let mut buf = begin_frame(FrameKind::Arrow, 3);
        buf.extend_from_slice(b"abc");
        finish_frame(&mut buf).unwrap();
        assert_eq!(buf, encode_arrow(b"abc").unwrap());
    }

    #[test]
    fn refuses_oversized_length_before_allocating() {
        let mut dec = FrameDecoder::new();
        dec.extend(&u32::MAX.to_le_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn a_tighter_limit_is_enforced() {
        let mut dec = FrameDecoder::with_limit(10);
        dec.extend(&11u32.to_le_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(ProtocolError::FrameTooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn refuses_unknown_kind_and_empty_frame() {
        let mut dec = FrameDecoder::new();
        dec.extend(&[1, 0, 0, 0, 9]);
        assert!(matches!(
            dec.next_frame(),
            Err(ProtocolError::UnknownKind(9))
        ));
        let mut dec = FrameDecoder::new();
        dec.extend(&[0, 0, 0, 0]);
        assert!(matches!(dec.next_frame(), Err(ProtocolError::EmptyFrame)));
    }

    #[test]
    fn control_on_arrow_frame_is_an_error() {
        let f = Frame {
            kind: FrameKind::Arrow,
            payload: vec![],
        };
        assert!(matches!(
            f.control::<Request>(),
            Err(ProtocolError::UnexpectedKind { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap stand-in for the fuzz target: every prefix of every mutation decodes to
        // frames or an error, never a panic.
        let base = encode_control(&Request::Hello {
            version: 1,
            client: "x".into(),
        })
        .unwrap();
        for i in 0..base.len() {
            for v in [0u8, 1, 2, 0x7f, 0xff] {
                let mut m = base.clone();
                m[i] = v;
                let mut dec = FrameDecoder::new();
                dec.extend(&m);
                while let Ok(Some(f)) = dec.next_frame() {
                    let _ = f.control::<Request>();
                }
            }
        }
    }
}

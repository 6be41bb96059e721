//! Frames over fd 3, the data socket: blocking reads on R's main thread, sends from
//! either thread serialized by one lock (printed output comes from the print thread).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use airlock_protocol::{
    data::FromRuntime, encode_control, finish_frame, Frame, FrameDecoder, MAX_FRAME_LEN,
};

use crate::error::BridgeError;

/// The fd the sandbox hands the runtime its data socket on.
pub const SOCKET_FD: i32 = 3;

/// Largest frame read from the backend. The backend is trusted more than the script, but
/// a frame is still bounded before anything is allocated for it: the protocol's limit.
pub const INPUT_FRAME_LIMIT: usize = MAX_FRAME_LEN;

pub struct Channel {
    fd: File,
    /// Reader state; only R's main thread reads.
    decoder: Mutex<FrameDecoder>,
    /// Held for the whole of each frame's write.
    send_lock: Mutex<()>,
    /// Largest frame the backend accepts from us; Start's max_frame_bytes lowers it.
    max_frame: AtomicUsize,
    /// Input frames that arrived while a loopback query waited for its answer.
    backlog: Mutex<std::collections::VecDeque<Frame>>,
}

impl Channel {
    /// Takes fd 3.
    pub fn open() -> Result<Channel, BridgeError> {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor table.
        if unsafe { libc::fcntl(SOCKET_FD, libc::F_GETFD) } < 0 {
            return Err(BridgeError::Protocol(
                "fd 3 (the data socket) is not open".into(),
            ));
        }
        // SAFETY: fd 3 is the data socket the sandbox (or the test) opened for this
        // process; nothing else in the process owns it, and Channel::open runs once (the
        // bridge state is created once), so this is its only owner.
        let fd = unsafe { File::from_raw_fd(SOCKET_FD) };
        Ok(Channel {
            fd,
            decoder: Mutex::new(FrameDecoder::with_limit(INPUT_FRAME_LIMIT)),
            send_lock: Mutex::new(()),
            max_frame: AtomicUsize::new(MAX_FRAME_LEN),
            backlog: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    pub fn set_max_frame(&self, n: usize) {
        self.max_frame
            .store(n.min(MAX_FRAME_LEN), Ordering::Relaxed);
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    /// The next frame (kept ones first), or `None` on a clean end of stream between
    /// frames.
    pub fn recv(&self) -> Result<Option<Frame>, BridgeError> {
        let kept = self
            .backlog
            .lock()
            .map_err(|_| BridgeError::State("backlog lock poisoned"))?
            .pop_front();
        match kept {
            Some(frame) => Ok(Some(frame)),
            None => self.recv_wire(),
        }
    }

    /// Keeps a frame for a later `recv`.
    pub fn keep(&self, frame: Frame) -> Result<(), BridgeError> {
        self.backlog
            .lock()
            .map_err(|_| BridgeError::State("backlog lock poisoned"))?
            .push_back(frame);
        Ok(())
    }

    /// The next frame from the socket itself.
    pub fn recv_wire(&self) -> Result<Option<Frame>, BridgeError> {
        let mut dec = self
            .decoder
            .lock()
            .map_err(|_| BridgeError::State("reader lock poisoned"))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(frame) = dec.next_frame()? {
                return Ok(Some(frame));
            }
            let want = dec.wanted().clamp(1, 16 << 20);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let n = match (&self.fd).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if dec.buffered() == 0 {
                    return Ok(None);
                }
                return Err(BridgeError::Protocol(format!(
                    "the backend closed the connection in the middle of a frame ({} bytes \
                     of it read)",
                    dec.buffered()
                )));
            }
            dec.extend(&buf[..n]);
        }
    }

    /// Sends one control message.
    pub fn send_control(&self, msg: &FromRuntime) -> Result<(), BridgeError> {
        let frame = encode_control(msg)?;
        self.send_frame(frame)
    }

    /// Sends one complete frame (made with `begin_frame`, length still to be written).
    pub fn send_started_frame(&self, mut frame: Vec<u8>) -> Result<(), BridgeError> {
        finish_frame(&mut frame)?;
        self.send_frame(frame)
    }

    fn send_frame(&self, frame: Vec<u8>) -> Result<(), BridgeError> {
        let len = frame.len() - airlock_protocol::frame::HEADER_LEN;
        if len > self.max_frame() {
            return Err(BridgeError::Output(format!(
                "a frame of {len} bytes is above the backend's limit of {}",
                self.max_frame()
            )));
        }
        let _guard = self
            .send_lock
            .lock()
            .map_err(|_| BridgeError::State("send lock poisoned"))?;
        let mut rest = &frame[..];
        while !rest.is_empty() {
            // SAFETY: rest is a valid readable buffer of rest.len() bytes; fd is our open
            // socket. MSG_NOSIGNAL: a closed peer is EPIPE here, not SIGPIPE, whose R
            // handler would raise an R error on whichever thread got it.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            // n is positive and at most rest.len().
            rest = &rest[n as usize..];
        }
        Ok(())
    }
}

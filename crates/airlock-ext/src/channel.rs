//! Interruptible socket I/O for a backend.
//!
//! A backend must never block where a cancel or statement_timeout cannot reach it. Every
//! socket here is nonblocking, and every wait goes through `WaitLatchOrSocket`, so a
//! pending interrupt wakes the wait and `CHECK_FOR_INTERRUPTS` turns it into the usual
//! ERROR. Unwinding from that ERROR drops the sockets, which is how the daemon learns the
//! call was cancelled. This module holds the extension's FFI for waits and fd passing.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Instant,
};

use airlock_protocol::{Frame, FrameDecoder};
use nix::{
    cmsg_space,
    errno::Errno,
    sys::socket::{
        connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr,
    },
};
use pgrx::pg_sys;

use crate::error::CallError;

/// Which peer a channel talks to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Daemon,
    Runtime,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Daemon => "airlockd",
            Peer::Runtime => "the script's runtime",
        }
    }
}

/// Largest frame the backend accepts from the runtime. The runtime is untrusted and each
/// frame is held in memory outside Postgres' memory contexts, so this is below the
/// protocol's limit; the runtime is told it in `Start` and splits larger batches. It
/// bounds one output row: room for a 200 MB value.
pub const RUNTIME_MAX_FRAME: usize = 256 << 20;

/// Largest frame the backend accepts from the daemon (only small control messages).
const DAEMON_MAX_FRAME: usize = 1 << 20;

/// Size of each read from a socket.
const READ_CHUNK: usize = 256 * 1024;

/// A nonblocking Unix stream socket with frame buffering.
pub struct Channel {
    sock: OwnedFd,
    dec: FrameDecoder,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    peer: Peer,
    eof: bool,
}

/// What a wait ended with.
enum Ready {
    /// The socket is ready for what was asked (both, if both were).
    Socket {
        readable: bool,
    },
    Timeout,
}

/// What to wait for.
#[derive(Clone, Copy)]
enum Want {
    Read,
    Write,
    Either,
}

/// Waits until `fd` is ready as wanted, the timeout passes, or an interrupt is pending,
/// in which case this does not return: CHECK_FOR_INTERRUPTS raises the ERROR.
fn wait(fd: RawFd, want: Want, deadline: Option<Instant>) -> Ready {
    loop {
        // An interrupt may already be pending (the latch was reset by an earlier wait).
        pgrx::check_for_interrupts!();
        let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH;
        events |= match want {
            Want::Read => pg_sys::WL_SOCKET_READABLE,
            Want::Write => pg_sys::WL_SOCKET_WRITEABLE,
            Want::Either => pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE,
        };
        let timeout_ms: i64 = match deadline {
            Some(d) => {
                events |= pg_sys::WL_TIMEOUT;
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ready::Timeout;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i64
            }
            None => -1,
        };
        // SAFETY: MyLatch is the backend's own latch, set up before any SQL function
        // runs; `fd` is a socket we own and keep open for the duration of the call.
        let rc = unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                fd,
                timeout_ms as _,
                pg_sys::PG_WAIT_EXTENSION,
            )
        } as u32;
        if rc & pg_sys::WL_LATCH_SET != 0 {
            // SAFETY: as above; resetting our own latch before checking for interrupts
            // is the documented latch protocol.
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            pgrx::check_for_interrupts!();
        }
        if rc & (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE) != 0 {
            return Ready::Socket {
                readable: rc & pg_sys::WL_SOCKET_READABLE != 0,
            };
        }
        if rc & pg_sys::WL_TIMEOUT != 0 {
            return Ready::Timeout;
        }
    }
}

/// Sleeps `ms` milliseconds, waking early (and raising) on an interrupt.
fn sleep(ms: i64) {
    // SAFETY: MyLatch is the backend's own latch; no socket is involved.
    let rc = unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        )
    } as u32;
    if rc & pg_sys::WL_LATCH_SET != 0 {
        // SAFETY: as above.
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
    }
    pgrx::check_for_interrupts!();
}

impl Channel {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Channel, CallError> {
        let unavailable = |source: Errno| CallError::DaemonUnavailable {
            path: path.display().to_string(),
            source,
        };
        let addr = UnixAddr::new(path).map_err(unavailable)?;
        let sock = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(unavailable)?;
        loop {
            match connect(sock.as_raw_fd(), &addr) {
                Ok(()) => break,
                // The listener's backlog is full: wait a little and try again.
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                    if Instant::now() >= deadline {
                        return Err(CallError::DaemonTimeout {
                            what: "accept the connection",
                        });
                    }
                    sleep(10);
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(Channel::from_owned(sock, Peer::Daemon))
    }

    /// Wraps a connected socket (set nonblocking here).
    pub fn from_owned(sock: OwnedFd, peer: Peer) -> Channel {
        let _ = nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let limit = match peer {
            Peer::Daemon => DAEMON_MAX_FRAME,
            Peer::Runtime => RUNTIME_MAX_FRAME,
        };
        Channel {
            sock,
            dec: FrameDecoder::with_limit(limit),
            buf: Vec::new(),
            fds: Vec::new(),
            peer,
            eof: false,
        }
    }

    /// Sends all of `bytes`. `Err(PeerGone)` if the peer closed its end.
    pub fn send(&mut self, bytes: &[u8], deadline: Option<Instant>) -> Result<(), CallError> {
        self.send_all(bytes, deadline, None)
    }

    /// Sends all of `bytes` with no deadline, handing every frame that arrives meanwhile
    /// to `on_frame`: a peer that writes while we write (printed output, output rows of
    /// an earlier chunk) cannot deadlock us. `Err(PeerGone)` if the peer closed its end.
    pub fn send_reading(
        &mut self,
        bytes: &[u8],
        on_frame: &mut dyn FnMut(Frame) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
        self.send_all(bytes, None, Some(on_frame))
    }

    /// The send loop of both: while the socket is full, wait until it is writable (up to
    /// `deadline`), or, with `on_frame`, also take whatever the peer sends meanwhile.
    fn send_all(
        &mut self,
        bytes: &[u8],
        deadline: Option<Instant>,
        mut on_frame: Option<&mut dyn FnMut(Frame) -> Result<(), CallError>>,
    ) -> Result<(), CallError> {
        let mut sent = 0;
        while sent < bytes.len() {
            let iov = [IoSlice::new(&bytes[sent..])];
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                &[],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(n) => sent += n,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => match on_frame.as_deref_mut() {
                    Some(on_frame) => {
                        let want = if self.eof { Want::Write } else { Want::Either };
                        if let Ready::Socket { readable: true } =
                            wait(self.sock.as_raw_fd(), want, None)
                        {
                            self.read_available(on_frame)?;
                        }
                    }
                    None => {
                        if let Ready::Timeout = wait(self.sock.as_raw_fd(), Want::Write, deadline) {
                            return Err(CallError::PeerTimeout {
                                peer: self.peer,
                                what: "accept data",
                            });
                        }
                    }
                },
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => {
                    return Err(CallError::PeerGone { peer: self.peer })
                }
                Err(source) => {
                    return Err(CallError::Io {
                        peer: self.peer,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads what is there without waiting and hands each complete frame to `on_frame`.
    fn read_available(
        &mut self,
        on_frame: &mut dyn FnMut(Frame) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
        // End of stream only sets eof: the next send sees EPIPE, and recv() reports what
        // is left.
        self.read_once()?;
        while let Some(frame) = self.next_buffered()? {
            on_frame(frame)?;
        }
        Ok(())
    }

    /// Receives the next frame; `Ok(None)` at end of stream.
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>, CallError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(Some(frame));
            }
            if self.eof {
                if self.dec.buffered() > 0 {
                    return Err(CallError::Protocol {
                        peer: self.peer,
                        message: "connection closed in the middle of a frame".into(),
                    });
                }
                return Ok(None);
            }
            if self.read_once()? {
                if let Ready::Timeout = wait(self.sock.as_raw_fd(), Want::Read, deadline) {
                    return Err(CallError::PeerTimeout {
                        peer: self.peer,
                        what: "answer",
                    });
                }
            }
        }
    }

    /// The next complete frame already read, if any.
    fn next_buffered(&mut self) -> Result<Option<Frame>, CallError> {
        self.dec.next_frame().map_err(|e| CallError::Protocol {
            peer: self.peer,
            message: e.to_string(),
        })
    }

    /// One nonblocking read into the decoder. Sets `eof` at end of stream; returns
    /// whether the read would have blocked.
    fn read_once(&mut self) -> Result<bool, CallError> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_CHUNK];
        }
        let mut buf = std::mem::take(&mut self.buf);
        let got = self.recv_some(&mut buf);
        if let Ok(n) = got {
            self.dec.extend(&buf[..n]);
        }
        self.buf = buf;
        match got {
            Ok(0) | Err(Errno::ECONNRESET) => self.eof = true,
            Ok(_) => {}
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Ok(true),
            Err(source) => {
                return Err(CallError::Io {
                    peer: self.peer,
                    source,
                })
            }
        }
        Ok(false)
    }

    /// Takes the oldest file descriptor received with SCM_RIGHTS.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        if self.fds.is_empty() {
            None
        } else {
            Some(self.fds.remove(0))
        }
    }

    fn recv_some(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        if self.peer == Peer::Runtime {
            // The runtime is untrusted: no control buffer, so any fds it tries to pass
            // are discarded by the kernel instead of landing in the backend.
            let iov = [IoSliceMut::new(buf)];
            let mut iov = iov;
            return recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                None,
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|m| m.bytes);
        }
        let mut space = cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for this
                    // message; nothing else refers to it, so we take ownership.
                    self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Ok(msg.bytes)
    }
}

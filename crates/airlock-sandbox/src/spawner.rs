//! The spawner: a single-threaded loop that owns every sandbox of the daemon.
//!
//! `airlockd` fork+execs itself as `airlockd __spawner` holding one end of a
//! `SOCK_SEQPACKET` socketpair and calls [`run_spawner`]. One datagram carries one frame
//! (u32 LE length, kind byte, JSON payload: see `airlock_protocol::frame`); a
//! `ToSpawner::Spawn` datagram carries exactly one fd by SCM_RIGHTS, the sandbox's data
//! socket. Seqpacket keeps each fd bound to its own message, which a byte stream would
//! not. [`send_message`] and [`recv_message`] are the daemon's side of it too.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use airlock_protocol::spawner::{FromSpawner, SpawnRequest, ToSpawner};
use airlock_protocol::{encode_control, FrameDecoder};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::setgroups;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{spawn, sys, Sandbox, SandboxError};

/// Largest message the spawner reads; a `SpawnRequest` is a few KiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// Runs the spawner until the daemon closes its end of `sock`, then kills and reaps
/// every sandbox still running and returns `Ok`. On any other error (malformed message,
/// socket failure) it also kills and reaps everything, then returns the error.
///
/// Must run in a single-threaded process (see [`spawn`]), as root. It first drops the
/// process's supplementary groups, so sandboxes inherit none of root's.
pub fn run_spawner(sock: OwnedFd) -> Result<(), SandboxError> {
    setgroups(&[]).map_err(SandboxError::SetGroups)?;
    let mut live: Vec<(u64, Sandbox)> = Vec::new();
    let result = serve(sock.as_fd(), &mut live);
    // Whatever ended the loop, no sandbox outlives the spawner: all are killed first,
    // then reaped (each wait returns once that sandbox's pid namespace is empty).
    for (_, sandbox) in &live {
        let _ = sandbox.kill();
    }
    for (_, mut sandbox) in live.drain(..) {
        let _ = sandbox.wait();
    }
    result
}

fn serve(sock: BorrowedFd<'_>, live: &mut Vec<(u64, Sandbox)>) -> Result<(), SandboxError> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        let (sock_ready, exited) = {
            let mut fds: Vec<PollFd<'_>> = std::iter::once(sock)
                .chain(live.iter().map(|(_, s)| s.pidfd.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SandboxError::Poll(e)),
            }
            let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            let exited: Vec<usize> = fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, p)| ready(p))
                .map(|(i, _)| i)
                .collect();
            (ready(&fds[0]), exited)
        };
        // Highest index first, so swap_remove never moves an entry still to be handled.
        for i in exited.into_iter().rev() {
            let (call_id, mut sandbox) = live.swap_remove(i);
            let status = sandbox.wait()?;
            send_message(sock, &FromSpawner::Exited { call_id, status }, None)?;
        }
        if sock_ready {
            match recv_message::<ToSpawner>(sock, &mut buf)? {
                None => return Ok(()),
                Some((ToSpawner::Spawn(req), fds)) => handle_spawn(sock, live, *req, fds)?,
                Some((ToSpawner::Kill { call_id }, _)) => {
                    // An unknown call has already exited; its Exited is sent or on its way.
                    if let Some((_, sandbox)) = live.iter().find(|(id, _)| *id == call_id) {
                        sandbox.kill()?;
                    }
                }
            }
        }
    }
}

fn handle_spawn(
    sock: BorrowedFd<'_>,
    live: &mut Vec<(u64, Sandbox)>,
    req: SpawnRequest,
    mut fds: Vec<OwnedFd>,
) -> Result<(), SandboxError> {
    let call_id = req.call_id;
    let refuse = |error: String| FromSpawner::SpawnFailed { call_id, error };
    let reply = if fds.len() != 1 {
        refuse(format!(
            "a spawn request carries exactly one fd (the data socket), this one carried {}",
            fds.len()
        ))
    } else if live.iter().any(|(id, _)| *id == call_id) {
        refuse(format!("call {call_id} already has a running sandbox"))
    } else {
        // The length was checked just above.
        let data = fds.remove(0);
        match spawn(&req, data) {
            Ok(sandbox) => {
                let pid = sandbox.pid;
                // Tracked before replying, so a failed reply still gets it killed.
                live.push((call_id, sandbox));
                FromSpawner::Spawned { call_id, pid }
            }
            Err(e) => refuse(e.to_string()),
        }
    };
    send_message(sock, &reply, None)
}

/// Sends `msg` as one frame in one datagram, with `fd` attached by SCM_RIGHTS.
pub fn send_message<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), SandboxError> {
    let frame = encode_control(msg)?;
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(_) => return Err(SandboxError::Truncated { len: frame.len() }),
            Err(Errno::EINTR) => continue,
            Err(source) => return Err(SandboxError::Socket { op: "send", source }),
        }
    }
}

/// Receives one datagram holding one frame, with the fds attached to it. `Ok(None)` at
/// EOF (the peer closed its end). `buf` bounds the message size.
pub fn recv_message<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<Option<(T, Vec<OwnedFd>)>, SandboxError> {
    let received = loop {
        match sys::recv_with_fds(sock, buf) {
            Ok(r) => break r,
            Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(SandboxError::Socket {
                    op: "receive",
                    source,
                })
            }
        }
    };
    if received.truncated {
        return Err(SandboxError::Truncated { len: received.len });
    }
    if received.len == 0 && received.fds.is_empty() {
        return Ok(None);
    }
    let mut decoder = FrameDecoder::new();
    decoder.extend(&buf[..received.len]);
    match decoder.next_frame()? {
        Some(frame) if decoder.buffered() == 0 => Ok(Some((frame.control()?, received.fds))),
        _ => Err(SandboxError::NotOneFrame { len: received.len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use nix::unistd::{pipe, read, write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn message_and_fd_cross_together_and_eof_is_none() {
        let (a, b) = pair();
        let (r, w) = pipe().unwrap();
        let msg = ToSpawner::Kill { call_id: 7 };
        send_message(a.as_fd(), &msg, Some(w.as_fd())).unwrap();
        drop(w);
        let mut buf = vec![0; 4096];
        let (got, fds) = recv_message::<ToSpawner>(b.as_fd(), &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        write(&fds[0], b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(read(&r, &mut one).unwrap(), 1);
        drop(a);
        assert!(recv_message::<ToSpawner>(b.as_fd(), &mut buf)
            .unwrap()
            .is_none());
    }

    #[test]
    fn oversized_and_garbage_messages_are_errors() {
        let (a, b) = pair();
        let frame = encode_control(&ToSpawner::Kill { call_id: 1 }).unwrap();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut small = vec![0; 8];
        assert!(matches!(
            recv_message::<ToSpawner>(b.as_fd(), &mut small),
            Err(SandboxError::Truncated { .. })
        ));
        let mut garbage = frame.clone();
        garbage.extend_from_slice(b"trailing");
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&garbage)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = vec![0; 4096];
        assert!(matches!(
            recv_message::<ToSpawner>(b.as_fd(), &mut buf),
            Err(SandboxError::NotOneFrame { .. })
        ));
    }
}

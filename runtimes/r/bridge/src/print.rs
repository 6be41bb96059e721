//! Printed output: fds 1 and 2 become one pipe, and a Rust thread sends what arrives as
//! `Print` frames, the way the Python shim's PrintForwarder does.
//!
//! The thread only reads the pipe and writes to the socket (under the channel's send
//! lock); it never calls into R. Runs of complete lines are sent as they arrive (or
//! [`PRINT_CHUNK_BYTES`] without a newline); after `max_print_bytes` the rest is counted
//! and one final line says how much was cut.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use airlock_protocol::data::FromRuntime;

use crate::channel::Channel;
use crate::error::BridgeError;

/// Output without a newline is sent once this much is pending.
const PRINT_CHUNK_BYTES: usize = 8 * 1024;
/// How long to wait, after the script, for processes it started that still hold fds 1
/// or 2; what they write later is dropped.
const DRAIN: Duration = Duration::from_secs(1);

struct State {
    limit: u64,
    pending: Vec<u8>,
    forwarded: u64,
    dropped: u64,
    truncating: bool,
    closed: bool,
    /// Whether the last text sent ended without a newline.
    line_open: bool,
    /// The start of a UTF-8 sequence cut by a read boundary.
    carry: Vec<u8>,
}

pub struct Forwarder {
    chan: Arc<Channel>,
    state: Arc<Mutex<State>>,
    done: mpsc::Receiver<()>,
}

impl Forwarder {
    /// Points fds 1 and 2 at a new pipe and starts the thread that reads it.
    pub fn start(chan: Arc<Channel>, limit: u64) -> Result<Forwarder, BridgeError> {
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        flush_stdio();
        for target in [1, 2] {
            // SAFETY: dup2 onto 1 and 2 replaces the process's stdout/stderr (which the
            // process owns, /dev/null in the sandbox); write_end stays valid. dup2
            // clears close-on-exec, so child processes inherit the pipe as their output.
            if unsafe { libc::dup2(write_end.as_raw_fd(), target) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        drop(write_end);
        let state = Arc::new(Mutex::new(State {
            limit,
            pending: Vec::new(),
            forwarded: 0,
            dropped: 0,
            truncating: false,
            closed: false,
            line_open: false,
            carry: Vec::new(),
        }));
        let (tx, done) = mpsc::channel();
        let (t_chan, t_state) = (chan.clone(), state.clone());
        std::thread::Builder::new()
            .name("airlock-print".into())
            .spawn(move || {
                pump(File::from(read_end), &t_chan, &t_state);
                let _ = tx.send(());
            })?;
        Ok(Forwarder { chan, state, done })
    }

    /// Collects the rest of the output and sends it; nothing is forwarded afterwards.
    pub fn stop(self) -> Result<(), BridgeError> {
        flush_stdio();
        // Closing our write ends lets the reader see end of file, unless a process the
        // script started still holds them.
        let devnull = File::options().write(true).open("/dev/null")?;
        for target in [1, 2] {
            // SAFETY: as in start: fds 1 and 2 are the process's to replace.
            if unsafe { libc::dup2(devnull.as_raw_fd(), target) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let _ = self.done.recv_timeout(DRAIN);
        let mut st = self
            .state
            .lock()
            .map_err(|_| BridgeError::State("print lock poisoned"))?;
        st.closed = true;
        let rest = std::mem::take(&mut st.pending);
        send_bytes(&self.chan, &mut st, &rest, true);
        if st.dropped > 0 {
            let mut text = format!(
                "[airlock: output truncated: {} more bytes not shown]\n",
                st.dropped
            );
            if st.line_open {
                text.insert(0, '\n');
            }
            send_text(&self.chan, &mut st, text);
        }
        Ok(())
    }
}

/// Flushes C stdio buffers (R's console writes go through stdout/stderr FILEs).
fn flush_stdio() {
    // SAFETY: fflush(NULL) flushes every open output stream; always allowed.
    unsafe {
        libc::fflush(std::ptr::null_mut());
    }
}

fn pump(mut pipe: File, chan: &Channel, state: &Mutex<State>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let Ok(mut st) = state.lock() else { return };
        if st.closed {
            return;
        }
        feed(chan, &mut st, &buf[..n]);
    }
}

fn feed(chan: &Channel, st: &mut State, data: &[u8]) {
    if st.truncating {
        st.dropped += data.len() as u64;
    } else {
        let room = st
            .limit
            .saturating_sub(st.forwarded + st.pending.len() as u64);
        let mut data = data;
        if data.len() as u64 > room {
            // room < data.len(), so it fits in usize.
            let mut cut = room as usize;
            // Do not split a UTF-8 sequence at the cut.
            while cut > 0 && cut < data.len() && (data[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            st.dropped += (data.len() - cut) as u64;
            data = &data[..cut];
            st.truncating = true;
        }
        st.pending.extend_from_slice(data);
    }
    let mut end = st
        .pending
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    if end == 0 && st.pending.len() >= PRINT_CHUNK_BYTES {
        end = st.pending.len();
    }
    if end > 0 {
        let chunk: Vec<u8> = st.pending.drain(..end).collect();
        send_bytes(chan, st, &chunk, false);
    }
}

/// Decodes `chunk` as UTF-8 (invalid bytes become U+FFFD, a sequence cut at the end is
/// kept for the next chunk unless `last`) and sends it.
fn send_bytes(chan: &Channel, st: &mut State, chunk: &[u8], last: bool) {
    st.forwarded += chunk.len() as u64;
    let mut bytes = std::mem::take(&mut st.carry);
    bytes.extend_from_slice(chunk);
    let mut text = String::with_capacity(bytes.len());
    let mut rest = &bytes[..];
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // valid_up_to marks a valid prefix.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        text.push('\u{FFFD}');
                        rest = &after[n..];
                    }
                    None if last => {
                        text.push('\u{FFFD}');
                        break;
                    }
                    None => {
                        st.carry = after.to_vec();
                        break;
                    }
                }
            }
        }
    }
    if !text.is_empty() {
        send_text(chan, st, text);
    }
}

fn send_text(chan: &Channel, st: &mut State, text: String) {
    st.line_open = !text.ends_with('\n');
    // Each piece's frame stays under the backend's limit even if every character were
    // escaped by JSON (6 bytes per byte at worst, plus the message's own keys).
    let piece = (chan.max_frame().saturating_sub(64) / 6).max(4);
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let mut cut = rest.len().min(piece);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (now, later) = rest.split_at(cut);
        rest = later;
        // The backend went away: the main thread finds out on its next send.
        let _ = chan.send_control(&FromRuntime::Print {
            text: now.to_owned(),
        });
    }
}

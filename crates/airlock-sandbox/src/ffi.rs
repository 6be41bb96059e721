//! The C ABI of the warm path: what a pre-initialised interpreter (the Python zygote,
//! `runtimes/python/airlock_warm.py`) calls, through `libairlock_sandbox.so`, to clone
//! one call's sandbox from itself with exactly the steps of the cold path
//! ([`crate::spawn_in_place`]).
//!
//! One function, [`airlock_spawn_in_place`]. The interpreter must be single-threaded
//! (the zygote checks `/proc/self/task` before every call) and must hold its own
//! interpreter lock across the call (Python: `ctypes.PyDLL`, never `CDLL`), so the clone
//! copies a consistent interpreter.

use std::ffi::c_int;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use airlock_protocol::spawner::SpawnRequest;

use crate::{spawn_in_place, Forked, SandboxError};

/// Returned in the new process, now inside its finished sandbox.
pub const IN_SANDBOX: c_int = 0;
/// Returned in the interpreter: `out_pid` and `out_pidfd` are set.
pub const STARTED: c_int = 1;
/// Returned in the interpreter: nothing was started; `error` holds the message.
pub const FAILED: c_int = -1;

/// Clones one sandbox from the calling process, as [`crate::spawn_in_place`].
///
/// `request`/`request_len`: a `SpawnRequest` as JSON. `data_fd`: the call's data
/// socket; ownership passes to this function in every case (it becomes fd 3 in the
/// sandbox and is closed in the caller). Returns [`IN_SANDBOX`] in the new process,
/// [`STARTED`] in the caller with the sandbox init's pid and a pidfd (which the caller
/// owns; it must also reap the process, its child), or [`FAILED`] with a NUL-terminated
/// message of at most `error_cap` bytes in `error`.
///
/// # Safety
/// `request` must be valid for `request_len` bytes; `out_pid` and `out_pidfd` must be
/// valid for writes; `error` valid for `error_cap` bytes of writes (or null with 0);
/// `data_fd` an open fd nothing else owns; the caller single-threaded.
#[no_mangle]
pub unsafe extern "C" fn airlock_spawn_in_place(
    request: *const u8,
    request_len: usize,
    data_fd: c_int,
    out_pid: *mut c_int,
    out_pidfd: *mut c_int,
    error: *mut u8,
    error_cap: usize,
) -> c_int {
    // SAFETY: the caller passes an open fd it gives up (this function's contract).
    let data = unsafe { OwnedFd::from_raw_fd(data_fd) };
    // SAFETY: the caller guarantees `request` is readable for `request_len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(request, request_len) };
    let outcome = std::panic::catch_unwind(move || -> Result<Forked, SandboxError> {
        let req: SpawnRequest = serde_json::from_slice(bytes).map_err(SandboxError::WarmRequest)?;
        spawn_in_place(&req, data)
    });
    let message = match outcome {
        Ok(Ok(Forked::InSandbox)) => return IN_SANDBOX,
        Ok(Ok(Forked::Parent(sandbox))) => match sandbox.into_parts() {
            Ok((pid, pidfd)) => {
                // SAFETY: the caller guarantees both pointers are valid for writes.
                unsafe {
                    *out_pid = pid;
                    *out_pidfd = pidfd.into_raw_fd();
                }
                return STARTED;
            }
            Err(e) => e.to_string(),
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the sandbox library panicked".to_string(),
    };
    if !error.is_null() && error_cap > 0 {
        let n = message.len().min(error_cap - 1);
        // SAFETY: `error` is valid for `error_cap` bytes of writes and n + 1 <= error_cap.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr(), error, n);
            *error.add(n) = 0;
        }
    }
    FAILED
}

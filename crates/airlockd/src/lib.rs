//! `airlockd`, Airlock's launcher daemon.
//!
//! It owns everything privileged: it listens on a Unix socket that only the Postgres
//! server's uid may use (SO_PEERCRED, no passwords), allocates a worker identity and a
//! session folder per call, asks its single-threaded spawner helper for a sandbox, hands
//! the backend its end of the data socket, and kills the sandbox on timeout or when the
//! backend hangs up; it writes one hash-chained audit record per call ([`audit`]). It
//! never decides who may run what: the extension did that.
#![deny(unsafe_code)]

pub mod audit;
pub mod config;
pub mod enforcement;
pub mod monitor;
pub mod pool;
pub mod prepared;
pub mod runtime;
pub mod server;
pub mod session;
pub mod spawner;
#[allow(unsafe_code)] // fd passing and pre_exec; every block has a SAFETY comment
mod sys;

/// Runs slow cleanup (removing a session folder, a cgroup) without stalling the event
/// loop that serves every other call: on tokio's blocking pool when a runtime is
/// running, else right here.
pub(crate) fn off_event_loop(work: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => drop(handle.spawn_blocking(work)),
        Err(_) => work(),
    }
}

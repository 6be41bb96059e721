//! Airlock's sandboxes: one per script call, built by a single-threaded spawner that
//! `airlockd` starts as `airlockd __spawner`.
//!
//! This crate owns the isolation of the runtime (Python, R) from the host:
//!
//! * [`spawn`] clones the runtime's init into fresh user, mount, pid, network, IPC and
//!   UTS namespaces, maps only the worker uid/gid, builds a read-only root from the
//!   request's mounts (the private `setup` module: one function per step, in order,
//!   each saying what it defends against), drops every privilege and execs the runtime
//!   with the data socket as fd 3 ([`DATA_FD`]).
//! * [`run_spawner`] is the loop around it: spawn, kill and exit reports over a
//!   socketpair with the daemon (`airlock_protocol::spawner`).
//!
//! Seccomp, Landlock and cgroup limits are not applied yet. All `unsafe` code is in the
//! private `sys` module; the lint below keeps it there.
#![deny(unsafe_code)]

mod error;
mod plan;
mod policy;
mod setup;
mod spawn;
mod spawner;
#[allow(unsafe_code)] // The one module of raw syscalls; every block has a SAFETY comment.
mod sys;

pub use error::SandboxError;
pub use setup::DATA_FD;
pub use spawn::{spawn, Sandbox};
pub use spawner::{recv_message, run_spawner, send_message, MAX_MESSAGE_LEN};

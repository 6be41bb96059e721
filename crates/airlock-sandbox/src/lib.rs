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
//! * Before exec the runtime is also confined by Landlock (filesystem access by inode:
//!   read/execute on its mounts, write only to the session folder and /tmp), resource
//!   limits, and a seccomp denylist (no namespaces, mounts, ptrace, io_uring, bpf,
//!   keyrings or non-Unix sockets), each declared as data in the private `policy`
//!   module. A kernel that does not fully enforce one of them makes [`spawn`] fail;
//!   [`probe()`] reports each layer for `airlockd --check`.
//!
//! * [`spawn_in_place`] is the warm path: the same steps, but the sandbox init returns
//!   into the caller's code instead of exec, so a pre-initialised interpreter (pandas
//!   already imported, no user code ever run in it) continues inside each call's fresh
//!   sandbox. [`ffi`] is its C ABI, built into `libairlock_sandbox.so`.
//!
//! All `unsafe` code is in the private `sys` module (and the C ABI in `ffi`); the lint below keeps it there.
#![deny(unsafe_code)]

pub mod cgroup;
mod error;
#[allow(unsafe_code)] // The C ABI of the warm path (no_mangle, raw pointers); SAFETY on each block.
pub mod ffi;
mod landlock_rules;
mod plan;
mod policy;
pub mod probe;
mod seccomp;
mod setup;
mod spawn;
mod spawner;
#[allow(unsafe_code)] // The one module of raw syscalls; every block has a SAFETY comment.
mod sys;

pub use error::SandboxError;
pub use probe::{probe, Layer, LayerStatus};
pub use setup::DATA_FD;
pub use spawn::{spawn, spawn_in_place, Forked, Sandbox};
pub use spawner::{recv_message, run_spawner, send_message, MAX_MESSAGE_LEN};

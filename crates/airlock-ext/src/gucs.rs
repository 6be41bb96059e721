//! Every setting of the extension, declared in one place.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// The server switch. Off by default: a superuser turns it on with ALTER SYSTEM.
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Where the launcher daemon listens.
pub static SOCKET_PATH: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/run/airlock/airlockd.sock"));

/// How long to wait for the daemon to accept a call, milliseconds.
pub static CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);

/// Rows per input batch sent to the runtime.
pub static BATCH_ROWS: GucSetting<i32> = GucSetting::<i32>::new(65_536);

/// Most bytes of script output relayed as NOTICEs per call.
pub static MAX_PRINT_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1 << 20);

/// What a script's loopback queries (airlock.query / airlock.execute) may do.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Loopback {
    /// No loopback queries.
    #[name = c"off"]
    Off,
    /// Statements run in a read-only state: any write, even inside a function, fails.
    #[name = c"read_only"]
    ReadOnly,
    /// Statements may write, in the caller's transaction.
    #[name = c"read_write"]
    ReadWrite,
}

/// airlock.loopback: superuser-only, so a role gets read_write only from a superuser
/// (ALTER ROLE … SET airlock.loopback = read_write).
pub static LOOPBACK: GucSetting<Loopback> = GucSetting::<Loopback>::new(Loopback::ReadOnly);

/// Most rows one loopback query may return.
pub static LOOPBACK_MAX_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);

/// Most loopback statements one call may run.
pub static LOOPBACK_MAX_STATEMENTS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

pub const DEFAULT_SOCKET_PATH: &str = "/run/airlock/airlockd.sock";

pub fn init() {
    GucRegistry::define_bool_guc(
        c"airlock.enabled",
        c"Allows external scripts to run on this server.",
        c"The server switch, like SQL Server's 'external scripts enabled'. Off by default.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"airlock.socket_path",
        c"Unix socket of the airlockd launcher daemon.",
        c"Must match socket_path in the daemon's config file. Superusers may set it per session.",
        &SOCKET_PATH,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"airlock.connect_timeout",
        c"How long to wait for airlockd to start a sandbox.",
        c"",
        &CONNECT_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"airlock.batch_rows",
        c"Rows per batch when streaming input rows to a script.",
        c"",
        &BATCH_ROWS,
        1,
        10_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"airlock.loopback",
        c"What a script's loopback queries may do: off, read_only or read_write.",
        c"Loopback queries run as the calling role in its transaction. Only superusers may change it, e.g. per role with ALTER ROLE.",
        &LOOPBACK,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"airlock.loopback_max_rows",
        c"Most rows one loopback query may return to a script.",
        c"",
        &LOOPBACK_MAX_ROWS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"airlock.loopback_max_statements",
        c"Most loopback statements one call of a script may run.",
        c"",
        &LOOPBACK_MAX_STATEMENTS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"airlock.max_print_bytes",
        c"Most bytes of a script's printed output relayed as NOTICEs per call.",
        c"Output past the limit is dropped and one NOTICE says how much.",
        &MAX_PRINT_BYTES,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_BYTE,
    );
}

pub fn socket_path() -> String {
    SOCKET_PATH
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.to_owned())
}

//! `airlock`, the PostgreSQL extension.
//!
//! It owns the SQL surface and every decision about who may run what: the server switch
//! (`airlock.enabled`), the `airlock_script_executor` role, the input query run through
//! SPI as the calling role, and the conversion of the script's output to the caller's
//! column definition list. It never forks, never runs user code, and never blocks where
//! a cancel cannot reach it; sandboxes belong to the daemon `airlockd`.

use pgrx::prelude::*;

mod call;
mod channel;
mod convert;
mod error;
mod gucs;
mod loopback;
mod monitor;
mod receiver;

::pgrx::pg_module_magic!();

extension_sql!(
    r#"
-- The right to run scripts (SQL Server's EXECUTE ANY EXTERNAL SCRIPT). Roles are
-- cluster-wide, so the role may already exist from another database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_script_executor') THEN
        CREATE ROLE airlock_script_executor NOLOGIN;
    END IF;
    -- The right to run scripts in one language only (SQL Server 2019's EXECUTE EXTERNAL
    -- SCRIPT ON EXTERNAL LANGUAGE).
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_python_executor') THEN
        CREATE ROLE airlock_python_executor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'airlock_r_executor') THEN
        CREATE ROLE airlock_r_executor NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE airlock_script_executor IS 'May run airlock external scripts in every language';
COMMENT ON ROLE airlock_python_executor IS 'May run airlock external scripts in Python';
COMMENT ON ROLE airlock_r_executor IS 'May run airlock external scripts in R';
COMMENT ON SCHEMA airlock IS 'Airlock: sandboxed scripts next to your data';
-- Anyone may see the functions; who may run scripts is checked inside them.
GRANT USAGE ON SCHEMA airlock TO PUBLIC;
"#,
    name = "bootstrap",
    bootstrap
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    // SAFETY: called once at library load; the prefix is a static C string.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"airlock".as_ptr()) };
}

/// Runs a script in a sandbox and returns its output frame as rows.
#[pg_extern(sql = r#"
CREATE FUNCTION airlock.execute_external_script(
    language text,
    script text,
    input_data_1 text DEFAULT NULL,
    input_data_1_name text DEFAULT 'InputDataSet',
    output_data_1_name text DEFAULT 'OutputDataSet',
    params jsonb DEFAULT NULL,
    rows_per_read bigint DEFAULT NULL
) RETURNS SETOF record
VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION airlock.execute_external_script(text, text, text, text, text, jsonb, bigint) IS
    'Runs a script in a sandbox; its output data frame comes back as rows';
"#)]
#[allow(clippy::too_many_arguments)]
fn execute_external_script(
    language: Option<&str>,
    script: Option<&str>,
    input_data_1: Option<&str>,
    input_data_1_name: Option<&str>,
    output_data_1_name: Option<&str>,
    params: Option<pgrx::JsonB>,
    rows_per_read: Option<i64>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: fcinfo is this function's own call info, passed by pgrx.
    unsafe {
        call::execute(
            fcinfo,
            call::CallArgs {
                language,
                script,
                input_query: input_data_1,
                input_name: input_data_1_name,
                output_name: output_data_1_name,
                params: params.map(|p| p.0),
                rows_per_read,
                output_params: None,
            },
        )
    }
}

/// The same function under SQL Server's name.
#[pg_extern(sql = r#"
CREATE FUNCTION airlock.sp_execute_external_script(
    language text,
    script text,
    input_data_1 text DEFAULT NULL,
    input_data_1_name text DEFAULT 'InputDataSet',
    output_data_1_name text DEFAULT 'OutputDataSet',
    params jsonb DEFAULT NULL,
    rows_per_read bigint DEFAULT NULL
) RETURNS SETOF record
VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION airlock.sp_execute_external_script(text, text, text, text, text, jsonb, bigint) IS
    'Alias of airlock.execute_external_script, for people coming from SQL Server';
"#, requires = [execute_external_script])]
#[allow(clippy::too_many_arguments)]
fn sp_execute_external_script(
    language: Option<&str>,
    script: Option<&str>,
    input_data_1: Option<&str>,
    input_data_1_name: Option<&str>,
    output_data_1_name: Option<&str>,
    params: Option<pgrx::JsonB>,
    rows_per_read: Option<i64>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    execute_external_script(
        language,
        script,
        input_data_1,
        input_data_1_name,
        output_data_1_name,
        params,
        rows_per_read,
        fcinfo,
    )
}

/// Runs a script and returns one row of its variables named by output_params (SQL
/// Server's @params … OUTPUT).
#[pg_extern(sql = r#"
CREATE FUNCTION airlock.execute_external_script_outputs(
    language text,
    script text,
    input_data_1 text DEFAULT NULL,
    input_data_1_name text DEFAULT 'InputDataSet',
    params jsonb DEFAULT NULL,
    output_params text[] DEFAULT NULL
) RETURNS SETOF record
VOLATILE CALLED ON NULL INPUT PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION airlock.execute_external_script_outputs(text, text, text, text, jsonb, text[]) IS
    'Runs a script in a sandbox; returns one row of the script variables named by output_params';
"#, requires = [execute_external_script])]
fn execute_external_script_outputs(
    language: Option<&str>,
    script: Option<&str>,
    input_data_1: Option<&str>,
    input_data_1_name: Option<&str>,
    params: Option<pgrx::JsonB>,
    output_params: Option<Vec<Option<String>>>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: fcinfo is this function's own call info, passed by pgrx.
    unsafe {
        call::execute(
            fcinfo,
            call::CallArgs {
                language,
                script,
                input_query: input_data_1,
                input_name: input_data_1_name,
                output_name: None,
                params: params.map(|p| p.0),
                rows_per_read: None,
                // NULL or empty: the call fails naming the missing list.
                output_params: Some(output_params.unwrap_or_default()),
            },
        )
    }
}

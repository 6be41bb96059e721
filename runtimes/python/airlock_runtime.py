"""Airlock's Python runtime shim: the sandboxed end of the data protocol.

The sandbox runs ``venv/bin/python3 -I -B airlock_runtime.py`` as an unprivileged uid,
with fds 0-2 on /dev/null and fd 3 a connected Unix stream socket to the Postgres
backend. The conversation (crates/airlock-protocol/src/data.rs is authoritative; keep
this file in step with it):

    backend                                  runtime
      start{script, names, limits}  ───────►
      Arrow(batch) *                ───────►   input rows
      input_end                     ───────►
                                    ◄───────   print{text} *
                                    ◄───────   Arrow(batch) *   output rows, one schema
                                    ◄───────   done{rows} | script_error{...}

A frame is a u32 little-endian length n, then n bytes: a kind byte (1 control JSON,
2 Arrow IPC stream) and the payload.

Exit status: 0 done, 1 the script or its output failed, 2 the input or the protocol
failed. Only the standard library plus pandas, numpy and pyarrow; one file, so the
sandbox needs nothing but the venv and this.
"""

import codecs
import collections
import datetime
import decimal
import json
import linecache
import os
import select
import socket
import sys
import threading
import traceback
import types
import uuid

PROTOCOL_VERSION = 3
SOCKET_FD = 3
# Largest frame (kind byte plus payload) either side accepts; the backend's MAX_FRAME_LEN.
MAX_FRAME_LEN = 1 << 30
KIND_CONTROL = 1
KIND_ARROW = 2
SCRIPT_FILENAME = "<script>"
# Printed output is sent when a line completes or this much is pending without a newline.
PRINT_CHUNK_BYTES = 8 * 1024
# Longest error message or traceback sent; a script can raise with an enormous message.
MAX_ERROR_TEXT = 1 << 20
# How long to wait, after the script, for processes it started that still hold
# stdout or stderr; what they write later is dropped.
PRINT_DRAIN_SECONDS = 1.0

EXIT_OK = 0
EXIT_SCRIPT = 1
EXIT_INPUT = 2


class ProtocolError(Exception):
    """The backend sent something this runtime cannot follow."""


class InputError(Exception):
    """The input rows could not be turned into a DataFrame."""


class OutputError(Exception):
    """The script's output is missing or cannot be sent as Arrow."""


class Failure(Exception):
    """Carries a ready ``script_error`` message and the exit status that goes with it."""

    def __init__(self, phase, error_type, message, traceback_text, status):
        super().__init__(message)
        self.phase = phase
        self.error_type = error_type
        self.message = message
        self.traceback_text = traceback_text
        self.status = status


# How soon the start of a call the sandbox was built for arrives (see run()).
CALL_AT_ONCE_SECONDS = 0.01


def main():
    try:
        sock = socket.socket(fileno=SOCKET_FD)
    except OSError:
        # No socket: nobody to report to.
        return EXIT_INPUT
    chan = Channel(sock)
    try:
        return run(chan)
    except Failure as f:
        failure = f
    except Exception as e:
        # A bug in this file, or the machine ran out of something: still say so.
        failure = Failure(
            "output",
            "RuntimeFailure",
            f"the Python runtime failed: {e!r}",
            "".join(traceback.format_exception(e)),
            EXIT_SCRIPT,
        )
    try:
        chan.send_control(
            {
                "type": "script_error",
                "phase": failure.phase,
                "error_type": clean_text(failure.error_type),
                "message": clean_text(failure.message),
                "traceback": clean_text(failure.traceback_text),
            }
        )
    except OSError:
        pass  # The backend is gone; the exit status is all that is left.
    return failure.status


def run(chan):
    """The whole conversation; raises Failure for anything that ends in script_error."""
    try:
        # Libraries first: a sandbox prepared ahead of its call imports them while it
        # waits for the call's start, and warms them up if the call does not come at
        # once. A sandbox built for a waiting call gets its start within a few ms (the
        # backend is handed the socket as the sandbox is ready): warming up would only
        # delay that call.
        libs = import_libraries()
        if not chan.readable(CALL_AT_ONCE_SECONDS):
            warm_up(libs)
        forwarder = PrintForwarder(chan)
        forwarder.open()
        start = read_start(chan)
        chunks = input_chunks(chan, start, libs)
        first = next(chunks)
    except (ProtocolError, InputError) as e:
        raise Failure("input", type(e).__name__, str(e), "", EXIT_INPUT) from None

    forwarder.start(start["max_print_bytes"])
    code = compile_script(start)
    scope = new_scope(start, libs, loopback_module(chan, libs))
    rows = 0
    chunk_number = 0
    try:
        frame = first
        while frame is not None:
            chunk_number += 1
            scope[start["input_name"]] = frame
            scope.pop(start["output_name"], None)
            if start["rows_per_read"] is not None:
                scope["airlock_chunk"] = chunk_number
            del frame
            run_script(code, scope)
            try:
                batches, n = prepare_output(scope, start, libs)
            except OutputError as e:
                raise Failure("output", "OutputError", str(e), "", EXIT_SCRIPT) from None
            for batch in batches:
                send_batch(chan, batch, libs)
            rows += n
            del batches
            if start["rows_per_read"] is None:
                break
            try:
                frame = next(chunks, None)
            except (ProtocolError, InputError) as e:
                raise Failure("input", type(e).__name__, str(e), "", EXIT_INPUT) from None
    finally:
        # Printed output goes out before the outcome, whatever the outcome.
        forwarder.stop()
    chan.send_control({"type": "done", "rows": rows})
    return EXIT_OK


# --- The socket ----------------------------------------------------------------------


class Channel:
    """Frames over the socket. Sends are locked: printed output comes from a thread."""

    def __init__(self, sock):
        self.sock = sock
        self.send_lock = threading.Lock()
        # Largest frame the backend accepts from us; start's max_frame_bytes lowers it.
        self.max_frame = MAX_FRAME_LEN
        # Input frames that arrived while a loopback query waited for its answer.
        self.backlog = collections.deque()

    def readable(self, timeout):
        """Whether bytes (or end of stream) arrive within `timeout` seconds."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def recv_frame(self):
        """Returns (kind, payload), or None on a clean end of stream between frames."""
        if self.backlog:
            return self.backlog.popleft()
        return self.recv_wire_frame()

    def recv_wire_frame(self):
        """The next frame from the socket itself, ignoring the backlog."""
        header = self._recv_exact(4, allow_eof=True)
        if header is None:
            return None
        length = int.from_bytes(header, "little")
        if length == 0:
            raise ProtocolError("malformed frame: zero length")
        if length > MAX_FRAME_LEN:
            raise ProtocolError(
                f"malformed frame: length {length} is above the limit of {MAX_FRAME_LEN}"
            )
        kind = self._recv_exact(1)[0]
        if kind not in (KIND_CONTROL, KIND_ARROW):
            raise ProtocolError(f"malformed frame: unknown kind {kind}")
        # The payload gets its own buffer so that Arrow data in it starts aligned.
        return kind, self._recv_exact(length - 1)

    def _recv_exact(self, n, allow_eof=False):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except InterruptedError:
                continue
            if k == 0:
                if got == 0 and allow_eof:
                    return None
                raise ProtocolError(
                    f"the backend closed the connection in the middle of a frame "
                    f"({got} of {n} bytes read)"
                )
            got += k
        return buf

    def send_control(self, msg):
        payload = json.dumps(msg, ensure_ascii=False).encode("utf-8")
        self._send(KIND_CONTROL, payload)

    def send_arrow(self, payload):
        self._send(KIND_ARROW, payload)

    def _send(self, kind, payload):
        length = len(payload) + 1
        if length > self.max_frame:
            raise ValueError(f"frame of {length} bytes is above the limit of {self.max_frame}")
        header = length.to_bytes(4, "little") + bytes([kind])
        with self.send_lock:
            if length < 64 * 1024:
                self.sock.sendall(header + bytes(payload))
            else:
                self.sock.sendall(header)
                self.sock.sendall(memoryview(payload))


def clean_text(s):
    """A str that encodes as UTF-8: lone surrogates (from undecodable bytes) escaped."""
    s = str(s)
    if len(s) > MAX_ERROR_TEXT:
        s = s[:MAX_ERROR_TEXT] + f"\n[airlock: {len(s) - MAX_ERROR_TEXT} more characters not shown]"
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


# --- Input ---------------------------------------------------------------------------


def read_start(chan):
    frame = chan.recv_frame()
    if frame is None:
        raise ProtocolError("the backend closed the connection before sending start")
    msg = decode_control(frame)
    if msg.get("type") != "start":
        raise ProtocolError(f"expected a start message, got {describe(msg)}")
    version = msg.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r}; this runtime speaks version "
            f"{PROTOCOL_VERSION}"
        )
    fields = {
        "script": str,
        "input_name": str,
        "output_name": str,
        "has_input": bool,
        "max_print_bytes": int,
        "output_batch_rows": int,
        "max_frame_bytes": int,
    }
    for name, typ in fields.items():
        value = msg.get(name)
        # bool is an int in Python; a JSON true is not a byte count.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProtocolError(f"start message: {name} is missing or not a {typ.__name__}")
    if msg["max_print_bytes"] < 0:
        raise ProtocolError("start message: max_print_bytes is negative")
    if msg["output_batch_rows"] < 1:
        raise ProtocolError("start message: output_batch_rows must be at least 1")
    if msg["max_frame_bytes"] < 1024:
        raise ProtocolError("start message: max_frame_bytes must be at least 1024")
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError("start message: params is not an object")
    msg["params"] = params
    columns = msg.get("output_columns")
    if not isinstance(columns, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("type"), str)
        for c in columns
    ):
        raise ProtocolError("start message: output_columns is missing or malformed")
    out_params = msg.get("output_params")
    if out_params is not None and (
        not isinstance(out_params, list)
        or not all(isinstance(n, str) for n in out_params)
        or len(out_params) != len(columns)
    ):
        raise ProtocolError("start message: output_params is malformed")
    msg["output_params"] = out_params
    per_read = msg.get("rows_per_read")
    if per_read is not None and (
        not isinstance(per_read, int) or isinstance(per_read, bool) or per_read < 1
    ):
        raise ProtocolError("start message: rows_per_read must be a positive integer")
    msg["rows_per_read"] = per_read
    chan.max_frame = min(MAX_FRAME_LEN, msg["max_frame_bytes"])
    return msg


def decode_control(frame):
    kind, payload = frame
    if kind != KIND_CONTROL:
        raise ProtocolError("expected a control message, got an Arrow frame")
    try:
        msg = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"malformed control message: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed control message: not a JSON object")
    return msg


def describe(msg):
    t = msg.get("type")
    return f"a {t} message" if isinstance(t, str) else "a message without a type"


class Libraries:
    """pandas, numpy and pyarrow, imported once the socket is up so a broken install is
    reported to the backend instead of dying silently on /dev/null."""

    def __init__(self):
        import numpy
        import pandas
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (a submodule; loads the IPC bindings)

        self.np = numpy
        self.pd = pandas
        self.pa = pyarrow


def import_libraries():
    try:
        return Libraries()
    except Exception as e:
        raise InputError(f"the Python runtime cannot import its libraries: {e!r}") from None


def warm_up(libs):
    """Runs the conversions every call takes, once, on data of our own (never a call's),
    before the call's start is read. pandas and pyarrow import more of themselves on
    first use, and a process cloned from the warm path's interpreter copies each page it
    first writes: done here, both happen while a prepared sandbox waits for its call
    instead of during the call."""
    pa = libs.pa
    types = [("i", pa.int64(), "int8"), ("f", pa.float64(), "float8"), ("s", pa.string(), "text")]
    schema = pa.schema(
        [pa.field(n, t, metadata={TYPE_METADATA_KEY: pg.encode()}) for n, t, pg in types]
    )
    table = pa.table([pa.array([1, None]), pa.array([0.5, None]), pa.array(["a", None])], schema=schema)
    frame = table_to_frame(table, libs)
    # What scripts build most: a frame from a dict of Python lists; and the empty input
    # frame of a call without input (its constructor imports numpy.rec on first use).
    libs.pd.DataFrame({"i": [1, 2], "f": [0.5, None], "s": ["a", None]})
    libs.pd.DataFrame()
    start = {
        "output_columns": [{"name": n, "type": pg} for n, _, pg in types],
        "output_params": None,
        "output_name": "out",
        "output_batch_rows": 1024,
    }
    batches, _ = prepare_output({"out": frame}, start, libs)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        writer.write_batch(batches[0])
    pa.ipc.open_stream(sink.getvalue()).read_all()
    compile("out = None", "<warm-up>", "exec")


def input_chunks(chan, start, libs):
    """Yields the script's input DataFrames: the whole input once, or with rows_per_read
    chunks of at most that many rows (at least one, possibly empty). Reads Arrow frames
    until input_end as it goes."""
    pa = libs.pa
    per_read = start["rows_per_read"]
    schema = None
    pending = []
    pending_rows = 0
    yielded = False

    def take(n):
        nonlocal pending, pending_rows
        table = pa.Table.from_batches(pending, schema=schema)
        head, rest = table.slice(0, n), table.slice(n)
        pending = rest.to_batches() if rest.num_rows else []
        pending_rows = rest.num_rows
        return to_frame(head)

    def to_frame(table, ready=None):
        try:
            return table_to_frame(table, libs, ready)
        except (InputError, ProtocolError):
            raise
        except Exception as e:
            raise InputError(f"could not build the input DataFrame: {e}") from None

    # Without rows_per_read the whole input becomes one frame: its bool, integer and
    # float columns are copied into their final arrays as the batches arrive, while the
    # backend is still sending, instead of being joined after input_end. Anything
    # unexpected turns this off and the frame is built from the batches as before.
    numeric = None

    def add_numeric(batch):
        nonlocal numeric
        try:
            if numeric is None:
                numeric = numeric_columns(schema, libs)
            for i, column in numeric.items():
                column.add(batch.column(i))
        except Exception:
            numeric = {}

    while True:
        frame = chan.recv_frame()
        if frame is None:
            raise ProtocolError("the backend closed the connection before input_end")
        kind, payload = frame
        if kind == KIND_CONTROL:
            msg = decode_control(frame)
            if msg.get("type") == "input_end":
                break
            raise ProtocolError(f"expected input rows or input_end, got {describe(msg)}")
        if not start["has_input"]:
            raise ProtocolError("received input rows, but start said has_input is false")
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(payload))
            stream_batches = list(reader)
            stream_schema = reader.schema
        except (pa.ArrowException, ValueError, OSError) as e:
            raise ProtocolError(f"malformed Arrow frame: {e}") from None
        if schema is None:
            schema = stream_schema
        elif not schema.equals(stream_schema, check_metadata=True):
            raise ProtocolError(
                f"input batches disagree on the schema: first {schema}, then {stream_schema}"
            )
        for batch in stream_batches:
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
                if per_read is None and numeric != {}:
                    add_numeric(batch)
        while per_read is not None and pending_rows >= per_read:
            yielded = True
            yield take(per_read)

    if not start["has_input"]:
        yield libs.pd.DataFrame()
        return
    if schema is None:
        raise ProtocolError("has_input is true, but no input batch (not even an empty one) arrived")
    if per_read is None and numeric and pending_rows:
        table = pa.Table.from_batches(pending, schema=schema)
        yield to_frame(table, {i: column.column() for i, column in numeric.items()})
        return
    if pending_rows or not yielded:
        yield take(pending_rows)


NUMERIC_TYPES = ("bool", "int2", "int4", "int8", "float4", "float8")


def numeric_columns(schema, libs):
    """NumericColumns for the bool, integer and float columns of schema, by index."""
    return {
        i: NumericColumn(field_pg_type(field), libs)
        for i, field in enumerate(schema)
        if field_pg_type(field) in NUMERIC_TYPES
    }


class NumericColumn:
    """One bool, integer or float input column, copied batch by batch into one array
    (grown by doubling), with a NULL mask once a NULL was seen. column() gives what
    column_to_pandas gives for the same values."""

    def __init__(self, pg_type, libs):
        self.pg_type = pg_type
        self.libs = libs
        self.values = None
        self.mask = None
        self.n = 0

    def add(self, chunk):
        np = self.libs.np
        k = len(chunk)
        if chunk.null_count:
            fill = False if self.pg_type == "bool" else 0
            # fill_null keeps NaN: only NULL slots are filled, and the mask marks them.
            values = chunk.fill_null(fill).to_numpy(zero_copy_only=False)
            mask = chunk.is_null().to_numpy(zero_copy_only=False)
        else:
            values = chunk.to_numpy(zero_copy_only=False)
            mask = None
        end = self.n + k
        if self.values is None or end > len(self.values):
            cap = max(end, 2 * (0 if self.values is None else len(self.values)))
            grown = np.empty(cap, dtype=values.dtype)
            if self.n:
                grown[: self.n] = self.values[: self.n]
            self.values = grown
            if self.mask is not None:
                grown_mask = np.zeros(cap, dtype=bool)
                grown_mask[: self.n] = self.mask[: self.n]
                self.mask = grown_mask
        self.values[self.n : end] = values
        if mask is not None and self.mask is None:
            self.mask = np.zeros(len(self.values), dtype=bool)
        if self.mask is not None:
            self.mask[self.n : end] = False if mask is None else mask
        self.n = end

    def column(self):
        pd = self.libs.pd
        values = self.values[: self.n]
        if self.mask is None:
            return values
        mask = self.mask[: self.n]
        if self.pg_type == "bool":
            return pd.arrays.BooleanArray(values, mask)
        if self.pg_type.startswith("float"):
            return pd.arrays.FloatingArray(values, mask)
        return pd.arrays.IntegerArray(values, mask)


def table_to_frame(table, libs, ready=None):
    """Arrow table to DataFrame, each column by its Postgres type (docs/TYPES.md):

    bool, int2/4/8      numpy bool/int without NULLs, pandas boolean/Int16/... with
    float4/8            numpy float without NULLs, pandas Float32/Float64 with (NaN and
                        NULL stay apart)
    text, json, jsonb   string (pandas' Arrow-backed strings), NULL as pd.NA
    numeric             object of decimal.Decimal
    uuid                object of uuid.UUID
    interval            object of pandas.DateOffset
    arrays              object of Python lists, elements as above, None for NULL
    everything else     pyarrow's conversion: bytes, datetime.date, datetime.time,
                        datetime64[us] (with UTC for timestamptz)
    Column names are kept exactly and in order. `ready` holds columns already converted
    (NumericColumn), by index.
    """
    pd = libs.pd
    columns = []
    for i, field in enumerate(table.schema):
        if ready and i in ready:
            columns.append(ready[i])
            continue
        pg_type = field_pg_type(field)
        try:
            columns.append(column_to_pandas(table.column(i), pg_type, libs))
        except InputError:
            raise
        except Exception as e:
            raise InputError(
                f"column {i + 1} ({field.name!r}, {pg_type}) cannot be given to the script: "
                f"{first_arg(e)}"
            ) from None
    if not columns:
        return pd.DataFrame(index=pd.RangeIndex(table.num_rows))
    frame = pd.DataFrame(dict(enumerate(columns)), copy=False)
    frame.columns = pd.Index(table.schema.names, dtype=object)
    return frame


TYPE_METADATA_KEY = b"airlock.type"


def field_pg_type(field):
    meta = field.metadata or {}
    t = meta.get(TYPE_METADATA_KEY)
    if t is None:
        raise ProtocolError(f"input column {field.name!r} carries no airlock.type")
    return t.decode("utf-8")


def column_to_pandas(col, pg_type, libs):
    pa, pd, np = libs.pa, libs.pd, libs.np
    if pg_type.endswith("[]"):
        convert = element_converter(pg_type[:-2], libs)
        values = np.empty(len(col), dtype=object)
        for i, items in enumerate(col.to_pylist()):
            values[i] = None if items is None else [convert(v) for v in items]
        return values
    if pg_type in ("bool", "int2", "int4", "int8", "float4", "float8"):
        if col.null_count == 0:
            return col.to_numpy()
        is_float = pg_type.startswith("float")
        fill = False if pg_type == "bool" else 0
        # fill_null keeps NaN: only NULL slots are filled, and the mask marks them.
        data = col.fill_null(fill).to_numpy()
        mask = col.is_null().to_numpy()
        if pg_type == "bool":
            return pd.arrays.BooleanArray(data, mask)
        if is_float:
            return pd.arrays.FloatingArray(data, mask)
        return pd.arrays.IntegerArray(data, mask)
    if pg_type in ("numeric", "uuid", "interval"):
        convert = element_converter(pg_type, libs)
        values = np.empty(len(col), dtype=object)
        for i, v in enumerate(col.to_pylist()):
            values[i] = convert(v)
        return values
    if pg_type in ("text", "json", "jsonb"):
        # pandas' Arrow-backed strings: the column's buffers are used as they are (no
        # Python object per value), values are str, NULL is pd.NA.
        if col.type != pa.string():
            col = col.cast(pa.string())
        return pd.arrays.ArrowStringArray(col)
    if pg_type in ("bytea", "date", "time"):
        return col.to_pandas().to_numpy(dtype=object)
    if pg_type in ("timestamp", "timestamptz"):
        return col.to_pandas()
    raise ProtocolError(f"unknown airlock.type {pg_type!r}")


def element_converter(pg_type, libs):
    """Python value (as pyarrow's to_pylist gives it) to what the script sees."""
    pd = libs.pd
    if pg_type == "numeric":
        return lambda v: None if v is None else decimal.Decimal(v)
    if pg_type == "uuid":
        return lambda v: None if v is None else uuid.UUID(bytes=bytes(v))
    if pg_type == "interval":
        return lambda v: (
            None
            if v is None
            else pd.DateOffset(
                months=v.months,
                days=v.days,
                microseconds=v.nanoseconds // 1000,
            )
        )
    return lambda v: v


# --- The script ----------------------------------------------------------------------


def compile_script(start):
    """Compiles the script; raises Failure on a syntax error."""
    script = start["script"]
    # Lets tracebacks quote the script's lines; mtime None keeps checkcache from dropping it.
    linecache.cache[SCRIPT_FILENAME] = (
        len(script),
        None,
        script.splitlines(keepends=True),
        SCRIPT_FILENAME,
    )
    try:
        return compile(script, SCRIPT_FILENAME, "exec", dont_inherit=True)
    except BaseException as e:
        raise Failure(
            "script", exception_name(type(e)), str(e), format_script_traceback(e), EXIT_SCRIPT
        ) from None


def new_scope(start, libs, module):
    """The script's globals: pd, np, the airlock module, and the call's params."""
    scope = {
        "__name__": "__main__",
        "__builtins__": __builtins__,
        "pd": libs.pd,
        "np": libs.np,
        "airlock": module,
    }
    scope.update(start["params"])
    return scope


# --- Loopback queries ---------------------------------------------------------------


class QueryError(Exception):
    """A loopback statement failed in the database. Attributes: sqlstate (e.g. "42501"),
    message, detail, hint."""

    def __init__(self, sqlstate, message, detail=None, hint=None):
        super().__init__(f"{message} (SQLSTATE {sqlstate})")
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint


QueryError.__module__ = "airlock"


def loopback_module(chan, libs):
    """The `airlock` module scripts import: query() and execute() run SQL in the calling
    session, as the calling role, in its transaction; the backend does it, over fd 3."""
    lock = threading.Lock()

    def query(sql, params=None):
        """Runs a statement that returns rows; returns them as a DataFrame, with the same
        types as the input data frame."""
        with lock:
            batches, schema = loopback(chan, libs, "query", sql, params)
        table = libs.pa.Table.from_batches(batches, schema=schema)
        return table_to_frame(table, libs)

    def execute(sql, params=None):
        """Runs a statement; returns the number of rows it affected (or returned)."""
        with lock:
            return loopback(chan, libs, "execute", sql, params)

    module = types.ModuleType("airlock", "Queries from a script into the calling session.")
    module.query = query
    module.execute = execute
    module.QueryError = QueryError
    sys.modules["airlock"] = module
    return module


def loopback(chan, libs, mode, sql, params):
    if not isinstance(sql, str):
        raise TypeError(f"sql must be a str, not {type(sql).__qualname__}")
    if params is not None and not isinstance(params, (list, tuple)):
        raise TypeError("params must be a list or tuple of values for $1, $2, …")
    chan.send_control(
        {"type": "query", "sql": sql, "mode": mode, "has_params": bool(params)}
    )
    if params:
        send_batch(chan, params_batch(params, libs), libs)
    batches = []
    schema = None
    begun = False
    while True:
        frame = chan.recv_wire_frame()
        if frame is None:
            raise ProtocolError("the backend closed the connection during a loopback query")
        kind, payload = frame
        if not begun:
            if kind == KIND_CONTROL:
                msg = decode_control(frame)
                t = msg.get("type")
                if t == "query_begin":
                    begun = True
                    continue
                if t == "query_error":
                    raise query_error(msg)
            # Input sent before the answer: it is read later, in order.
            chan.backlog.append(frame)
            continue
        if kind == KIND_ARROW:
            reader = libs.pa.ipc.open_stream(libs.pa.py_buffer(payload))
            schema = reader.schema
            batches.extend(reader)
            continue
        msg = decode_control(frame)
        t = msg.get("type")
        if t == "query_end":
            rows = msg.get("rows")
            if mode == "execute":
                return rows
            if schema is None:
                raise ProtocolError("a loopback query answered without a schema")
            return batches, schema
        if t == "query_error":
            raise query_error(msg)
        raise ProtocolError(f"expected a loopback answer, got {describe(msg)}")


def query_error(msg):
    return QueryError(
        str(msg.get("sqlstate")), str(msg.get("message")), msg.get("detail"), msg.get("hint")
    )


def params_batch(params, libs):
    """$1, $2, … as one Arrow row; each column typed by its Python value."""
    pa = libs.pa
    arrays, fields = [], []
    for i, v in enumerate(params):
        name = f"${i + 1}"
        meta = None
        if isinstance(v, libs.np.generic):
            v = v.item()
        if isinstance(v, decimal.Decimal):
            arr, meta = pa.array([str(v)]), "numeric"
        elif isinstance(v, uuid.UUID):
            arr, meta = pa.array([v.bytes], type=pa.binary(16)), "uuid"
        elif isinstance(v, dict):
            arr, meta = pa.array([json.dumps(v)]), "jsonb"
        elif isinstance(v, (datetime.timedelta, libs.pd.Timedelta)):
            arr = pa.array([pa.MonthDayNano([0, 0, int(libs.pd.Timedelta(v).value)])])
        else:
            try:
                arr = pa.array([v], from_pandas=False)
            except Exception as e:
                raise TypeError(
                    f"parameter {name} ({type(v).__qualname__}) cannot be sent: {first_arg(e)}"
                ) from None
        field = pa.field(name, arr.type, metadata={"airlock.type": meta} if meta else None)
        arrays.append(arr)
        fields.append(field)
    return pa.record_batch(arrays, schema=pa.schema(fields))


def run_script(code, scope):
    """Runs the script in scope. Raises Failure if it raised."""
    try:
        exec(code, scope)
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return
        raise Failure(
            "script",
            "SystemExit",
            f"script called exit({e.code!r})",
            format_script_traceback(e),
            EXIT_SCRIPT,
        ) from None
    except BaseException as e:
        raise Failure(
            "script", exception_name(type(e)), str(e), format_script_traceback(e), EXIT_SCRIPT
        ) from None


def exception_name(cls):
    """ZeroDivisionError, MyError (defined in the script), pandas.errors.MergeError."""
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def format_script_traceback(exc):
    """The traceback with only the script's frames: the shim's and the libraries' frames
    are noise to the user (and name paths inside the sandbox)."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    seen = set()

    def keep_script_frames(t):
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        frames = [f for f in t.stack if f.filename == SCRIPT_FILENAME]
        t.stack = traceback.StackSummary.from_list(frames)
        keep_script_frames(t.__cause__)
        keep_script_frames(t.__context__)
        for sub in getattr(t, "exceptions", None) or ():
            keep_script_frames(sub)

    keep_script_frames(te)
    return "".join(te.format())


# --- Printed output ------------------------------------------------------------------


class PrintForwarder:
    """Sends what the script writes to stdout and stderr as print messages.

    fds 1 and 2 become one pipe, so output from C code and child processes is caught
    too, and sys.stdout and sys.stderr are line-buffered writers on them. A thread reads
    the pipe, sends each run of complete lines (or PRINT_CHUNK_BYTES without a newline),
    stops forwarding after `limit` bytes and counts what it drops.
    """

    def __init__(self, chan):
        self.chan = chan
        self.limit = 0
        self.lock = threading.Lock()
        self.pending = bytearray()
        self.forwarded = 0
        self.dropped = 0
        self.truncating = False
        self.closed = False
        # Whether the last text sent ended without a newline.
        self.line_open = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.read_fd = None
        self.write_fd = None
        self.thread = None
        self.streams = []

    def open(self):
        """The pipe and the thread, made before the call's start is read (a prepared
        sandbox has them ready); nothing is written to the pipe until `start`."""
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=self._pump, name="airlock-print", daemon=True)
        self.thread.start()

    def start(self, limit):
        """fds 1 and 2 and sys.stdout/sys.stderr into the pipe; forwards up to `limit`
        bytes."""
        self.limit = limit
        os.dup2(self.write_fd, 1)
        os.dup2(self.write_fd, 2)
        os.close(self.write_fd)
        sys.stdout = self._stream(1)
        sys.stderr = self._stream(2)
        self.streams = [sys.stdout, sys.stderr]

    @staticmethod
    def _stream(fd):
        return open(
            fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )

    def stop(self):
        """Collects the rest of the output and sends it; nothing is forwarded afterwards."""
        for stream in self.streams:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        # Closing our write ends lets the reader see end of file, unless a process the
        # script started still holds them.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        self.thread.join(PRINT_DRAIN_SECONDS)
        with self.lock:
            self.closed = True
            self._send(bytes(self.pending), final=True)
            self.pending.clear()
            if self.dropped:
                text = f"[airlock: output truncated: {self.dropped} more bytes not shown]\n"
                if self.line_open:
                    text = "\n" + text
                self._send_text(text)

    def _pump(self):
        while True:
            try:
                data = os.read(self.read_fd, 64 * 1024)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            with self.lock:
                if self.closed:
                    return
                self._feed(data)

    def _feed(self, data):
        if not self.truncating:
            room = self.limit - self.forwarded - len(self.pending)
            if len(data) > room:
                cut = max(room, 0)
                # Do not split a UTF-8 sequence at the cut.
                while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
                    cut -= 1
                self.dropped += len(data) - cut
                data = data[:cut]
                self.truncating = True
            self.pending += data
        else:
            self.dropped += len(data)
        end = self.pending.rfind(b"\n") + 1
        if end == 0 and len(self.pending) >= PRINT_CHUNK_BYTES:
            end = len(self.pending)
        if end:
            chunk = bytes(self.pending[:end])
            del self.pending[:end]
            self._send(chunk, final=False)

    def _send(self, chunk, final):
        self.forwarded += len(chunk)
        text = self.decoder.decode(chunk, final)
        if text:
            self._send_text(text)

    def _send_text(self, text):
        self.line_open = not text.endswith("\n")
        try:
            self.chan.send_control({"type": "print", "text": text})
        except OSError:
            # The backend went away; the main thread finds out on its next send.
            pass


# --- Output --------------------------------------------------------------------------


def prepare_output(scope, start, libs):
    """The script's output as record batches of at most output_batch_rows rows, at least
    one; returns (batches, rows). Each column is converted by its declared type."""
    pa, pd = libs.pa, libs.pd
    columns = start["output_columns"]
    if start["output_params"] is not None:
        name = "output_params"
        frame = params_frame(scope, start["output_params"], libs)
    else:
        name = start["output_name"]
        if name not in scope:
            raise OutputError(f"the script did not set {name}")
        frame = scope[name]
        if not isinstance(frame, pd.DataFrame):
            raise OutputError(f"{name} is a {type(frame).__qualname__}, not a pandas DataFrame")
    names = [str(c) for c in frame.columns]
    seen = set()
    for n in names:
        if n in seen:
            raise OutputError(f"{name} has more than one column named {n!r}")
        seen.add(n)
    arrays = []
    for i, n in enumerate(names):
        pg_type = columns[i]["type"] if i < len(columns) else None
        series = frame.iloc[:, i]
        try:
            arrays.append(column_to_arrow(series, pg_type, libs))
        except Exception as e:
            raise OutputError(
                f"column {i + 1} ({n!r}) of {name} cannot be converted"
                + (f" to {pg_type}" if pg_type else "")
                + f": {first_arg(e)} (dtype {series.dtype})"
            ) from None
    if not arrays:
        # No columns: the backend names the count mismatch.
        return [pa.record_batch([], schema=pa.schema([]))], len(frame)
    table = pa.Table.from_arrays(arrays, names=names)
    batches = [b for b in table.to_batches(max_chunksize=start["output_batch_rows"]) if b.num_rows]
    if not batches:
        batches = [
            pa.record_batch([pa.array([], type=f.type) for f in table.schema], schema=table.schema)
        ]
    return batches, len(frame)


def params_frame(scope, names, libs):
    """One row: column i is the script variable names[i]."""
    pd, np = libs.pd, libs.np
    data = {}
    for n in names:
        if n not in scope:
            raise OutputError(f"the script did not set {n}, named in output_params")
        value = scope[n]
        if isinstance(value, (pd.DataFrame, pd.Series)):
            raise OutputError(
                f"{n} is a {type(value).__qualname__}; an output parameter holds one value"
            )
        if isinstance(value, (str, bytes, bytearray, list, tuple, dict, np.ndarray)):
            # Kept whole in one object cell (a list is one array value, not a column).
            cell = np.empty(1, dtype=object)
            cell[0] = value
            data[n] = pd.Series(cell)
        else:
            data[n] = pd.Series([value])
    return pd.DataFrame(data)


def first_arg(e):
    return str(e.args[0]) if len(e.args) >= 1 else str(e)


def column_to_arrow(series, pg_type, libs):
    """One output column as an Arrow array, converted toward its declared type."""
    pa, pd, np = libs.pa, libs.pd, libs.np
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        series = series.astype(dtype.categories.dtype if len(dtype.categories) else object)
        dtype = series.dtype
    base = pg_type[:-2] if pg_type and pg_type.endswith("[]") else pg_type
    is_array = pg_type is not None and pg_type.endswith("[]")
    if dtype == object:
        if is_array:
            convert = output_element_converter(base, libs)
            values = [
                None if is_missing(v, pd) else [None if is_missing(x, pd) else convert(x) for x in v]
                for v in series.tolist()
            ]
            return pa.array(values, from_pandas=False)
        if base != "uuid":
            # A column of str and None (text built in pandas) converts in one call.
            # Every converter below leaves a str as it is (uuid parses it: excluded) and
            # None is None, so a string result is exactly what the loop would give; any
            # other value (pd.NA, bytes, numbers) takes the loop.
            try:
                arr = pa.array(series.to_numpy(dtype=object), from_pandas=False)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                arr = None
            if arr is not None and pa.types.is_string(arr.type):
                return arr
        convert = output_element_converter(base, libs)
        values = [None if is_missing(v, pd) else convert(v) for v in series.tolist()]
        if base == "uuid" and all(v is None or isinstance(v, bytes) for v in values):
            return pa.array(values, type=pa.binary(16))
        return pa.array(values, from_pandas=False)
    if base == "date" and pd.api.types.is_datetime64_any_dtype(dtype):
        # A datetime column into a date column: only whole days pass.
        return pa.array(series).cast(pa.date32(), safe=True)
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        # NaN is a value here, not a NULL.
        return pa.array(series.to_numpy(), from_pandas=False)
    arr = pa.array(series, from_pandas=True)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    elif pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary())
    return arr


def is_missing(v, pd):
    return v is None or v is pd.NA or v is pd.NaT


def output_element_converter(pg_type, libs):
    """A Python value toward what the backend accepts for pg_type (docs/TYPES.md)."""
    np = libs.np
    if pg_type == "numeric":

        def numeric(v):
            if isinstance(v, (decimal.Decimal, int, np.integer)) and not isinstance(v, bool):
                return str(v)
            if isinstance(v, (float, np.floating)):
                f = float(v)
                if f != f:
                    return "NaN"
                if f in (float("inf"), float("-inf")):
                    return "Infinity" if f > 0 else "-Infinity"
                return repr(f)
            return v

        return numeric
    if pg_type == "uuid":
        # Text is parsed here, so a column may mix UUID objects and strings.
        return lambda v: (uuid.UUID(v) if isinstance(v, str) else v).bytes
    if pg_type in ("json", "jsonb"):
        return lambda v: v if isinstance(v, str) else json.dumps(plain(v, np), allow_nan=False)
    if pg_type == "interval":
        pa = libs.pa

        def interval(v):
            # Timedelta and DateOffset may mix in one column: both as month-day-nano.
            if isinstance(v, (datetime.timedelta, np.timedelta64)):
                return pa.MonthDayNano([0, 0, int(libs.pd.Timedelta(v).value)])
            return v

        return interval
    if pg_type == "bytea":
        return lambda v: bytes(v) if isinstance(v, (bytearray, memoryview)) else v
    return lambda v: v.item() if isinstance(v, np.generic) else v


def plain(v, np):
    """numpy scalars and arrays inside a JSON value as Python ones."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: plain(x, np) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x, np) for x in v]
    return v


def send_batch(chan, batch, libs):
    """Sends one batch as one Arrow frame, splitting it if it would pass the frame limit."""
    pa = libs.pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    buf = sink.getvalue()
    if buf.size + 1 > chan.max_frame:
        if batch.num_rows <= 1:
            raise Failure(
                "output",
                "OutputError",
                f"one row of the output takes {buf.size} bytes, above the frame limit "
                f"of {chan.max_frame}",
                "",
                EXIT_SCRIPT,
            )
        del buf, sink
        half = batch.num_rows // 2
        send_batch(chan, batch.slice(0, half), libs)
        send_batch(chan, batch.slice(half), libs)
        return
    chan.send_arrow(buf)


if __name__ == "__main__":
    status = main()
    # os._exit: threads the script started must not keep the process alive, and there is
    # nothing left to flush (fds 1 and 2 are /dev/null again).
    os._exit(status)

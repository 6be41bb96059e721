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
import json
import linecache
import os
import socket
import sys
import threading
import traceback

PROTOCOL_VERSION = 2
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
        start = read_start(chan)
        libs = import_libraries()
        input_frame = read_input(chan, start, libs)
    except (ProtocolError, InputError) as e:
        raise Failure("input", type(e).__name__, str(e), "", EXIT_INPUT) from None

    forwarder = PrintForwarder(chan, start["max_print_bytes"])
    forwarder.start()
    try:
        try:
            scope = run_script(start, input_frame, libs)
            batches, rows = prepare_output(scope, start, libs)
        finally:
            # Printed output goes out before the outcome, whatever the outcome.
            forwarder.stop()
    except OutputError as e:
        raise Failure("output", "OutputError", str(e), "", EXIT_SCRIPT) from None
    del scope, input_frame

    for batch in batches:
        send_batch(chan, batch, libs)
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

    def recv_frame(self):
        """Returns (kind, payload), or None on a clean end of stream between frames."""
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


def read_input(chan, start, libs):
    """Reads Arrow frames until input_end; returns the script's input DataFrame."""
    pa = libs.pa
    schema = None
    batches = []
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
        elif not schema.equals(stream_schema, check_metadata=False):
            raise ProtocolError(
                f"input batches disagree on the schema: first {schema}, then {stream_schema}"
            )
        batches.extend(stream_batches)

    if not start["has_input"]:
        return libs.pd.DataFrame()
    if schema is None:
        raise ProtocolError("has_input is true, but no input batch (not even an empty one) arrived")
    try:
        table = pa.Table.from_batches(batches, schema=schema)
        del batches
        return table_to_frame(table, libs)
    except (InputError, ProtocolError):
        raise
    except Exception as e:
        raise InputError(f"could not build the input DataFrame: {e}") from None


def table_to_frame(table, libs):
    """Arrow table to DataFrame with the dtypes scripts are promised:

    int8..int64, uint8..uint64  numpy ints without NULLs, pandas Int16/Int32/... with
    bool                        numpy bool without NULLs, pandas "boolean" with
    float16/32/64               numpy float, NULL as NaN
    utf8, large_utf8            object, Python str, NULL as None
    anything else               pyarrow's default conversion
    Column names are kept exactly, duplicates and order included.
    """
    pa, pd, np = libs.pa, libs.pd, libs.np
    columns = []
    for i, field in enumerate(table.schema):
        col = table.column(i)
        t = field.type
        if pa.types.is_integer(t) or pa.types.is_boolean(t):
            if col.null_count == 0:
                values = col.to_numpy()
            else:
                fill = False if pa.types.is_boolean(t) else 0
                data = col.fill_null(fill).to_numpy()
                mask = col.is_null().to_numpy()
                if pa.types.is_boolean(t):
                    values = pd.arrays.BooleanArray(data, mask)
                else:
                    values = pd.arrays.IntegerArray(data, mask)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            values = col.to_pandas().to_numpy(dtype=object)
        else:
            values = col.to_pandas().to_numpy() if pa.types.is_floating(t) else col.to_pandas()
        columns.append(values)
    if not columns:
        return pd.DataFrame(index=pd.RangeIndex(table.num_rows))
    frame = pd.DataFrame(dict(enumerate(columns)), copy=False)
    frame.columns = pd.Index(table.schema.names, dtype=object)
    return frame


# --- The script ----------------------------------------------------------------------


def run_script(start, input_frame, libs):
    """Runs the script; returns its globals. Raises Failure if it raised."""
    script = start["script"]
    # Lets tracebacks quote the script's lines; mtime None keeps checkcache from dropping it.
    linecache.cache[SCRIPT_FILENAME] = (
        len(script),
        None,
        script.splitlines(keepends=True),
        SCRIPT_FILENAME,
    )
    scope = {
        "__name__": "__main__",
        "__builtins__": __builtins__,
        "pd": libs.pd,
        "np": libs.np,
        start["input_name"]: input_frame,
    }
    try:
        code = compile(script, SCRIPT_FILENAME, "exec", dont_inherit=True)
        exec(code, scope)
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return scope
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
    return scope


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

    def __init__(self, chan, limit):
        self.chan = chan
        self.limit = limit
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
        self.thread = None
        self.streams = []

    def start(self):
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.read_fd = read_fd
        self.thread = threading.Thread(target=self._pump, name="airlock-print", daemon=True)
        self.thread.start()
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
    one; returns (batches, rows)."""
    pa, pd = libs.pa, libs.pd
    name = start["output_name"]
    if name not in scope:
        raise OutputError(f"the script did not set {name}")
    out = scope[name]
    if not isinstance(out, pd.DataFrame):
        raise OutputError(f"{name} is a {type(out).__qualname__}, not a pandas DataFrame")
    names = [str(c) for c in out.columns]
    seen = set()
    for n in names:
        if n in seen:
            raise OutputError(f"{name} has more than one column named {n!r}")
        seen.add(n)
    frame = out.copy(deep=False)
    frame.columns = names
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except Exception as e:
        raise OutputError(describe_conversion_error(frame, name, e, libs)) from None
    table = table.replace_schema_metadata(None)
    table = normalize_types(table, name, libs)
    batches = [b for b in table.to_batches(max_chunksize=start["output_batch_rows"]) if b.num_rows]
    if not batches:
        batches = [
            pa.record_batch([pa.array([], type=f.type) for f in table.schema], schema=table.schema)
        ]
    return batches, sum(b.num_rows for b in batches)


def describe_conversion_error(frame, name, err, libs):
    """Finds the column pyarrow choked on so the message can name it."""
    pa = libs.pa
    for i, col in enumerate(frame.columns):
        try:
            pa.Array.from_pandas(frame.iloc[:, i])
        except Exception as e:
            return (
                f"column {i + 1} ({col!r}) of {name} cannot be converted to Arrow: "
                f"{first_arg(e)} (dtype {frame.iloc[:, i].dtype})"
            )
    return f"{name} cannot be converted to Arrow: {first_arg(err)}"


def first_arg(e):
    return str(e.args[0]) if len(e.args) >= 1 else str(e)


def normalize_types(table, name, libs):
    """Fewer Arrow types for the backend to know: large_string becomes string,
    large_binary becomes binary, dictionary (pandas category) becomes its values."""
    pa = libs.pa
    fields = []
    for field in table.schema:
        t = field.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_large_string(t):
            t = pa.string()
        elif pa.types.is_large_binary(t):
            t = pa.binary()
        fields.append(field.with_type(t))
    target = pa.schema(fields)
    if target.equals(table.schema):
        return table
    try:
        return table.cast(target)
    except Exception as e:
        raise OutputError(f"{name} cannot be converted to Arrow: {first_arg(e)}") from None


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

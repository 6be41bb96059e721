"""Tests for the Python runtime shim, speaking the data protocol from the backend's side.

Each test runs airlock_runtime.py as a subprocess with one end of a socketpair as fd 3,
the way the sandbox does, using the interpreter running the tests (the runtime's venv):

    /opt/airlock/runtimes/python/venv/bin/python3 -m unittest discover \\
        -s runtimes/python -p 'test_*.py'

AIRLOCK_SHIM=/path/to/airlock_runtime.py tests an installed copy instead of this one.
"""

import json
import os
import socket
import subprocess
import sys
import unittest

import pyarrow as pa
import pyarrow.ipc  # noqa: F401

SHIM = os.environ.get(
    "AIRLOCK_SHIM", os.path.join(os.path.dirname(os.path.abspath(__file__)), "airlock_runtime.py")
)
TIMEOUT = 60


def frame(kind, payload):
    return (len(payload) + 1).to_bytes(4, "little") + bytes([kind]) + payload


def control(msg):
    return frame(1, json.dumps(msg).encode())


# What the backend sends for each Arrow type (crates/airlock-ext/src/convert.rs).
PG_TYPES = {
    pa.bool_(): "bool",
    pa.int16(): "int2",
    pa.int32(): "int4",
    pa.int64(): "int8",
    pa.float32(): "float4",
    pa.float64(): "float8",
    pa.string(): "text",
    pa.binary(): "bytea",
    pa.date32(): "date",
    pa.timestamp("us"): "timestamp",
    pa.timestamp("us", "UTC"): "timestamptz",
    pa.time64("us"): "time",
    pa.month_day_nano_interval(): "interval",
}


def typed(batch, **types):
    """The batch with airlock.type metadata on every field: from `types` by name, else
    from the Arrow type as the backend maps it."""
    fields = []
    for f in batch.schema:
        if f.metadata and b"airlock.type" in f.metadata:
            fields.append(f)
            continue
        t = types.get(f.name)
        if t is None:
            if pa.types.is_list(f.type):
                t = PG_TYPES[f.type.value_type] + "[]"
            else:
                t = PG_TYPES[f.type]
        fields.append(f.with_metadata({"airlock.type": t}))
    return pa.record_batch(batch.columns, schema=pa.schema(fields))


def arrow(batch, **types):
    batch = typed(batch, **types)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return frame(2, sink.getvalue().to_pybytes())


def start_msg(script, **overrides):
    msg = {
        "type": "start",
        "version": 3,
        "script": script,
        "input_name": "InputDataSet",
        "output_name": "OutputDataSet",
        "has_input": False,
        "max_print_bytes": 1 << 20,
        "output_batch_rows": 65536,
        "max_frame_bytes": 64 << 20,
        "output_columns": [],
    }
    msg.update(overrides)
    return msg


class Result:
    def __init__(self):
        self.messages = []  # control messages in order, Arrow frames as ("arrow", batch)
        self.batches = []
        self.status = None
        self.stderr = b""

    @property
    def prints(self):
        return "".join(m["text"] for m in self.controls if m["type"] == "print")

    @property
    def controls(self):
        return [m for m in self.messages if isinstance(m, dict)]

    @property
    def last(self):
        return self.messages[-1] if self.messages else None

    @property
    def error(self):
        last = self.last
        return last if isinstance(last, dict) and last["type"] == "script_error" else None

    def table(self):
        return pa.Table.from_batches(self.batches)


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError:
            # A shim that stops reading early (bad input) and exits resets the
            # connection after its last frame; that is its end of stream.
            chunk = b""
        if not chunk:
            return None if not buf else bytes(buf)
        buf += chunk
    return bytes(buf)


def run_raw(data):
    """Starts the shim, sends `data`, reads frames until it closes the socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", SHIM],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(3, fd) if fd != 3 else (3,),
        preexec_fn=(lambda: os.dup2(fd, 3)) if fd != 3 else None,
    )
    theirs.close()
    result = Result()
    try:
        ours.settimeout(TIMEOUT)
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        while True:
            header = recv_exact(ours, 4)
            if header is None:
                break
            n = int.from_bytes(header, "little")
            body = recv_exact(ours, n)
            assert body is not None and len(body) == n, "truncated frame from the shim"
            if body[0] == 1:
                result.messages.append(json.loads(body[1:].decode("utf-8")))
            elif body[0] == 2:
                reader = pa.ipc.open_stream(pa.py_buffer(body[1:]))
                batches = list(reader)
                assert len(batches) == 1, f"an Arrow frame holds {len(batches)} batches"
                result.batches.append(batches[0])
                result.messages.append(("arrow", batches[0]))
            else:
                raise AssertionError(f"unknown frame kind {body[0]}")
    finally:
        ours.close()
        _, result.stderr = proc.communicate(timeout=TIMEOUT)
        result.status = proc.returncode
    return result


def run(script, input_batches=None, **start):
    if input_batches is not None:
        start.setdefault("has_input", True)
    data = control(start_msg(script, **start))
    for batch in input_batches or []:
        data += arrow(batch)
    data += control({"type": "input_end"})
    return run_raw(data)


def typed_input():
    return pa.record_batch(
        [
            pa.array([1, None, 3], pa.int64()),
            pa.array([1, 2, 3], pa.int64()),
            pa.array([10, None, 30], pa.int32()),
            pa.array([10, 20, 30], pa.int32()),
            pa.array([5, None, 7], pa.int16()),
            pa.array([1.5, None, float("nan")], pa.float64()),
            pa.array([True, None, False], pa.bool_()),
            pa.array([True, False, True], pa.bool_()),
            pa.array(["a", None, "ü ☃"], pa.string()),
        ],
        names=["i64n", "i64", "i32n", "i32", "i16n", "f64n", "booln", "bool", "text"],
    )


class RuntimeTest(unittest.TestCase):
    def assertDone(self, r, rows):
        self.assertIsNone(r.error, f"script_error: {r.error}")
        self.assertEqual(r.last, {"type": "done", "rows": rows}, r.stderr.decode())
        self.assertEqual(r.status, 0)

    def assertError(self, r, phase, error_type, status):
        self.assertIsNotNone(r.error, f"expected script_error, got {r.messages}")
        self.assertEqual(r.error["phase"], phase)
        self.assertEqual(r.error["error_type"], error_type)
        self.assertEqual(r.status, status)
        self.assertFalse(r.batches, "no output rows with an error")

    # --- input and output types ---

    def test_round_trip_types_with_nulls(self):
        script = """
want = {"i64n": "Int64", "i64": "int64", "i32n": "Int32", "i32": "int32",
        "i16n": "Int16", "f64n": "Float64", "booln": "boolean", "bool": "bool",
        "text": "string"}
got = {c: str(t) for c, t in InputDataSet.dtypes.items()}
assert got == want, got
assert InputDataSet["i64n"].isna().tolist() == [False, True, False]
assert InputDataSet["f64n"].isna().tolist() == [False, True, False]  # NaN is not NULL
assert np.isnan(InputDataSet["f64n"].to_numpy(dtype="float64", na_value=0.0)[2])
assert InputDataSet["text"].tolist() == ["a", pd.NA, "ü ☃"]
assert all(type(v) is str for v in InputDataSet["text"].dropna())
assert type(InputDataSet["i64"][0]) is np.int64
OutputDataSet = InputDataSet
"""
        r = run(script, [typed_input()])
        self.assertDone(r, 3)
        out = r.table()
        self.assertEqual(
            [str(f.type) for f in out.schema],
            ["int64", "int64", "int32", "int32", "int16", "double", "bool", "bool", "string"],
        )
        # Bit for bit, NaN and NULL apart: compare the Arrow arrays themselves.
        # repr tells NaN from None and prints floats exactly.
        self.assertEqual(
            repr(out.to_pylist()), repr(pa.Table.from_batches([typed_input()]).to_pylist())
        )

    def test_input_split_over_several_batches(self):
        batch = typed_input()
        r = run(
            "assert len(InputDataSet) == 6\nOutputDataSet = InputDataSet[['i64n']]",
            [batch, batch.slice(0, 0), batch],
        )
        self.assertDone(r, 6)
        self.assertEqual(r.table().column(0).to_pylist(), [1, None, 3] * 2)

    def test_numeric_columns_built_while_batches_arrive_match_one_batch(self):
        # NULLs first seen in a later batch, NaN beside NULL, many batches (the arrays
        # grow): the same dtypes and values as the whole input in one batch.
        whole = typed_input()
        no_nulls = pa.record_batch(
            [
                pa.array([7, 8, 9], pa.int64()),
                pa.array([7, 8, 9], pa.int64()),
                pa.array([7, 8, 9], pa.int32()),
                pa.array([7, 8, 9], pa.int32()),
                pa.array([7, 8, 9], pa.int16()),
                pa.array([float("nan"), 0.5, -0.0], pa.float64()),
                pa.array([False, True, False], pa.bool_()),
                pa.array([False, True, False], pa.bool_()),
                pa.array(["x", "y", "z"], pa.string()),
            ],
            schema=whole.schema,
        )
        batches = [no_nulls, whole] + [no_nulls] * 30
        script = """
OutputDataSet = pd.DataFrame({
    "dtypes": [",".join(str(t) for t in InputDataSet.dtypes)],
    "values": [repr([InputDataSet[c].tolist() for c in InputDataSet.columns])],
})
"""
        split = run(script, batches)
        one = run(script, [pa.Table.from_batches(batches).combine_chunks().to_batches()[0]])
        self.assertDone(split, 1)
        self.assertDone(one, 1)
        self.assertEqual(split.table().to_pylist(), one.table().to_pylist())
        self.assertEqual(
            split.table().column("dtypes").to_pylist(),
            ["Int64,int64,Int32,int32,Int16,Float64,boolean,bool,string"],
        )

    def test_no_input(self):
        script = """
assert isinstance(InputDataSet, pd.DataFrame) and InputDataSet.shape == (0, 0)
OutputDataSet = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", None]})
"""
        r = run(script)
        self.assertDone(r, 3)
        self.assertEqual(str(r.table().schema.field("x").type), "int64")
        self.assertEqual(r.table().to_pydict(), {"x": [1, 2, 3], "y": ["a", "b", None]})

    def test_zero_row_input_keeps_columns_and_dtypes(self):
        empty = typed_input().slice(0, 0)
        script = """
assert list(InputDataSet.columns) == ["i64n", "i64", "i32n", "i32", "i16n", "f64n",
                                      "booln", "bool", "text"], list(InputDataSet.columns)
assert len(InputDataSet) == 0
got = [str(t) for t in InputDataSet.dtypes]
assert got == ["int64", "int64", "int32", "int32", "int16", "float64", "bool", "bool",
               "string"], got
OutputDataSet = InputDataSet
"""
        r = run(script, [empty])
        self.assertDone(r, 0)
        self.assertEqual(len(r.batches), 1)
        # The empty string column keeps its type.
        self.assertEqual(
            [str(f.type) for f in r.batches[0].schema],
            ["int64", "int64", "int32", "int32", "int16", "double", "bool", "bool", "string"],
        )

    def test_duplicate_input_column_names_kept_in_order(self):
        batch = pa.record_batch(
            [pa.array([1]), pa.array(["x"]), pa.array([2])], names=["a", "b", "a"]
        )
        r = run(
            "assert list(InputDataSet.columns) == ['a', 'b', 'a']\n"
            "assert InputDataSet.iloc[0].tolist() == [1, 'x', 2]\n"
            "OutputDataSet = pd.DataFrame({'ok': [1]})",
            [batch],
        )
        self.assertDone(r, 1)

    def test_output_dtype_mapping(self):
        script = """
import datetime, decimal
OutputDataSet = pd.DataFrame({
    "nullable_int": pd.array([1, None], dtype="Int64"),
    "nullable_bool": pd.array([True, None], dtype="boolean"),
    "nan_float": [1.0, np.nan],
    "f32": np.array([1.0, 2.0], dtype=np.float32),
    "pd_string": pd.array(["a", None], dtype="string"),
    "arrow_string": pd.array(["a", None], dtype="string[pyarrow]"),
    "category": pd.Series(["a", "b"], dtype="category"),
    "ts": pd.to_datetime(["2020-01-01", None]),
    "ts_utc": pd.to_datetime(["2020-01-01", None]).tz_localize("UTC"),
    "date": [datetime.date(2020, 1, 1), None],
    "dec": [decimal.Decimal("1.50"), None],
    "bytes": [b"x", None],
    "all_none": [None, None],
    7: [1, 2],
})
"""
        r = run(script)
        self.assertDone(r, 2)
        types = {f.name: str(f.type) for f in r.table().schema}
        self.assertEqual(
            types,
            {
                "nullable_int": "int64",
                "nullable_bool": "bool",
                "nan_float": "double",
                "f32": "float",
                "pd_string": "string",
                "arrow_string": "string",
                "category": "string",
                "ts": "timestamp[ns]",
                "ts_utc": "timestamp[ns, tz=UTC]",
                "date": "date32[day]",
                "dec": "decimal128(3, 2)",
                "bytes": "binary",
                "all_none": "null",
                "7": "int64",
            },
        )
        d = r.table().to_pydict()
        self.assertEqual(d["nullable_int"], [1, None])
        self.assertTrue(d["nan_float"][0] == 1.0 and d["nan_float"][1] != d["nan_float"][1])  # NaN stays NaN
        self.assertEqual(d["category"], ["a", "b"])
        self.assertIsNone(r.table().schema.metadata)

    def test_object_text_columns_convert_as_value_by_value(self):
        # str and None convert in one call; anything else in an object column takes the
        # value-by-value path, with the same results as before.
        script = """
OutputDataSet = pd.DataFrame({
    "plain": pd.Series(["a", None, "ü😀", ""], dtype=object),
    "np_str": pd.Series([np.str_("x"), "y", None, "z"], dtype=object),
    "with_na": pd.Series(["a", pd.NA, None, "d"], dtype=object),
    "json": pd.Series(['{"a": 1}', {"b": [1, 2]}, None, "[]"], dtype=object),
    "uuid": pd.Series(["00000000-0000-0000-0000-000000000001", None, None, None], dtype=object),
    "mixed_bytes": pd.Series(["a", b"b", None, "c"], dtype=object),
})
"""
        cols = [
            {"name": "plain", "type": "text"},
            {"name": "np_str", "type": "text"},
            {"name": "with_na", "type": "text"},
            {"name": "json", "type": "jsonb"},
            {"name": "uuid", "type": "uuid"},
            {"name": "mixed_bytes", "type": "text"},
        ]
        r = run(script, output_columns=cols)
        self.assertDone(r, 4)
        t = r.table()
        types = {f.name: str(f.type) for f in t.schema}
        self.assertEqual(
            types,
            {
                "plain": "string",
                "np_str": "string",
                "with_na": "string",
                "json": "string",
                "uuid": "fixed_size_binary[16]",
                "mixed_bytes": "binary",
            },
        )
        d = t.to_pydict()
        self.assertEqual(d["plain"], ["a", None, "ü😀", ""])
        self.assertEqual(d["np_str"], ["x", "y", None, "z"])
        self.assertEqual(d["with_na"], ["a", None, None, "d"])
        self.assertEqual(d["json"], ['{"a": 1}', '{"b": [1, 2]}', None, "[]"])
        self.assertEqual(d["mixed_bytes"], [b"a", b"b", None, b"c"])

    def test_object_text_column_with_nan_is_still_refused(self):
        r = run(
            "OutputDataSet = pd.DataFrame({'s': pd.Series(['a', np.nan], dtype=object)})",
            output_columns=[{"name": "s", "type": "text"}],
        )
        self.assertError(r, "output", "OutputError", 1)
        self.assertIn("column 1 ('s')", r.error["message"])

    def test_output_batches_are_cut_at_output_batch_rows(self):
        r = run("OutputDataSet = pd.DataFrame({'x': range(10)})", output_batch_rows=4)
        self.assertDone(r, 10)
        self.assertEqual([b.num_rows for b in r.batches], [4, 4, 2])
        self.assertEqual(r.table().column(0).to_pylist(), list(range(10)))

    def test_empty_output_sends_one_empty_batch_with_schema(self):
        r = run(
            "OutputDataSet = pd.DataFrame({'a': pd.Series([], dtype='int64'),"
            " 'b': pd.Series([], dtype='float64')})"
        )
        self.assertDone(r, 0)
        self.assertEqual(len(r.batches), 1)
        self.assertEqual(r.batches[0].num_rows, 0)
        self.assertEqual(r.batches[0].schema, pa.schema([("a", pa.int64()), ("b", pa.float64())]))
        self.assertEqual(r.messages[-2][0], "arrow")

    def test_large_input_and_output(self):
        n = 3_000_000
        batch = pa.record_batch(
            [pa.array(range(n), pa.int64()), pa.array(["row %d" % i for i in range(n)])],
            names=["id", "label"],
        )
        r = run(
            "assert len(InputDataSet) == %d\nOutputDataSet = InputDataSet" % n,
            [batch],
            output_batch_rows=1_000_000,
        )
        self.assertDone(r, n)
        self.assertEqual([b.num_rows for b in r.batches], [1_000_000] * 3)
        self.assertTrue(r.table().equals(pa.Table.from_batches([batch])))

    # --- script errors ---

    def test_exception_reports_type_message_and_script_traceback(self):
        script = "def f(x):\n    return 1 / x\n\ny = f(0)\n"
        r = run(script)
        self.assertError(r, "script", "ZeroDivisionError", 1)
        self.assertEqual(r.error["message"], "division by zero")
        tb = r.error["traceback"]
        self.assertIn('File "<script>", line 4', tb)
        self.assertIn('File "<script>", line 2, in f', tb)
        self.assertIn("return 1 / x", tb)
        self.assertNotIn("airlock_runtime", tb)
        self.assertTrue(tb.rstrip().endswith("ZeroDivisionError: division by zero"), tb)

    def test_exception_inside_pandas_keeps_only_script_frames(self):
        r = run("df = pd.DataFrame({'a': [1]})\nx = df['missing']\n")
        self.assertError(r, "script", "KeyError", 1)
        self.assertEqual(r.error["message"], "'missing'")
        tb = r.error["traceback"]
        self.assertIn('File "<script>", line 2', tb)
        self.assertNotIn("site-packages", tb)
        self.assertNotIn("airlock_runtime", tb)

    def test_exception_class_defined_in_script(self):
        r = run("class Bad(Exception):\n    pass\nraise Bad('nope')\n")
        self.assertError(r, "script", "Bad", 1)
        self.assertEqual(r.error["message"], "nope")

    def test_syntax_error(self):
        r = run("x = 1\ny = = 2\n")
        self.assertError(r, "script", "SyntaxError", 1)
        self.assertIn('File "<script>", line 2', r.error["traceback"])
        self.assertNotIn("airlock_runtime", r.error["traceback"])

    def test_exit_zero_is_normal_completion(self):
        r = run("import sys\nOutputDataSet = pd.DataFrame({'a': [1]})\nsys.exit(0)\n")
        self.assertDone(r, 1)

    def test_exit_nonzero_is_an_error(self):
        r = run("import sys\nsys.exit(3)\n")
        self.assertError(r, "script", "SystemExit", 1)
        self.assertEqual(r.error["message"], "script called exit(3)")

    # --- output errors ---

    def test_missing_output(self):
        r = run("x = 1")
        self.assertError(r, "output", "OutputError", 1)
        self.assertEqual(r.error["message"], "the script did not set OutputDataSet")

    def test_missing_output_uses_the_configured_name(self):
        r = run("OutputDataSet = pd.DataFrame()", output_name="result")
        self.assertError(r, "output", "OutputError", 1)
        self.assertEqual(r.error["message"], "the script did not set result")

    def test_output_not_a_dataframe(self):
        r = run("OutputDataSet = [1, 2, 3]")
        self.assertError(r, "output", "OutputError", 1)
        self.assertEqual(r.error["message"], "OutputDataSet is a list, not a pandas DataFrame")

    def test_output_column_that_arrow_cannot_convert_is_named(self):
        r = run("OutputDataSet = pd.DataFrame({'ok': [1, 2], 'mixed': [1, 'a']})")
        self.assertError(r, "output", "OutputError", 1)
        self.assertIn("column 2 ('mixed')", r.error["message"])

    def test_output_duplicate_column_names(self):
        r = run("OutputDataSet = pd.DataFrame([[1, 2]], columns=['a', 'a'])")
        self.assertError(r, "output", "OutputError", 1)
        self.assertIn("more than one column named 'a'", r.error["message"])

    # --- printed output ---

    def test_printed_output_arrives_as_print_messages(self):
        script = """
import os, sys, warnings
print("hello")
print("to stderr", file=sys.stderr)
sys.stdout.write("no newline")
sys.stdout.flush()
os.write(1, b" raw fd write\\n")
os.system("echo from a child process")
warnings.warn("careful")
OutputDataSet = pd.DataFrame({"a": [1]})
"""
        r = run(script)
        self.assertDone(r, 1)
        text = r.prints
        for want in ["hello\n", "to stderr\n", "no newline raw fd write\n",
                     "from a child process\n", "UserWarning: careful"]:
            self.assertIn(want, text)
        self.assertLess(text.index("hello"), text.index("from a child process"))
        # Every print comes before the output.
        kinds = [m[0] if isinstance(m, tuple) else m["type"] for m in r.messages]
        self.assertEqual(kinds, ["print"] * kinds.count("print") + ["arrow", "done"])

    def test_print_before_an_error_is_still_sent(self):
        r = run("print('about to fail')\nraise ValueError('x')")
        self.assertEqual(r.prints, "about to fail\n")
        self.assertError(r, "script", "ValueError", 1)

    def test_print_cap_truncates_and_says_how_much(self):
        script = "for i in range(100):\n    print('x' * 99)\nOutputDataSet = pd.DataFrame()"
        r = run(script, max_print_bytes=1000)
        self.assertDone(r, 0)
        prints = [m["text"] for m in r.controls if m["type"] == "print"]
        note = prints[-1]
        shown = "".join(prints[:-1])
        self.assertEqual(shown, ("x" * 99 + "\n") * 10)
        self.assertEqual(note, "[airlock: output truncated: 9000 more bytes not shown]\n")

    def test_print_cap_does_not_split_a_utf8_character(self):
        r = run("print('é' * 10)\nOutputDataSet = pd.DataFrame()", max_print_bytes=5)
        self.assertDone(r, 0)
        self.assertTrue(r.prints.startswith("éé\n[airlock: output truncated: 17 more"), r.prints)

    # --- protocol ---

    def test_bad_protocol_version(self):
        r = run("OutputDataSet = pd.DataFrame()", version=99)
        self.assertError(r, "input", "ProtocolError", 2)
        self.assertIn("version 99", r.error["message"])

    def test_malformed_frame(self):
        data = control(start_msg("x = 1")) + (5).to_bytes(4, "little") + b"\x09abcd"
        r = run_raw(data)
        self.assertError(r, "input", "ProtocolError", 2)
        self.assertIn("unknown kind 9", r.error["message"])

    def test_garbage_arrow_frame(self):
        data = control(start_msg("x = 1", has_input=True)) + frame(2, b"not arrow at all")
        r = run_raw(data)
        self.assertError(r, "input", "ProtocolError", 2)

    def test_connection_closed_early(self):
        r = run_raw(control(start_msg("x = 1")))
        self.assertError(r, "input", "ProtocolError", 2)
        self.assertIn("before input_end", r.error["message"])

    def test_missing_input_batch(self):
        r = run("x = 1", [], has_input=True)
        self.assertError(r, "input", "ProtocolError", 2)


def run_interactive(script, first, answer, **start):
    """Starts the shim, sends start and the bytes `first`, then answers each loopback
    query with the bytes answer(query, params_batch) returns; reads until it closes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", SHIM],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(3, fd) if fd != 3 else (3,),
        preexec_fn=(lambda: os.dup2(fd, 3)) if fd != 3 else None,
    )
    theirs.close()
    result = Result()
    pending_query = None
    try:
        ours.settimeout(TIMEOUT)
        ours.sendall(control(start_msg(script, **start)) + first)
        while True:
            header = recv_exact(ours, 4)
            if header is None:
                break
            body = recv_exact(ours, int.from_bytes(header, "little"))
            if body[0] == 1:
                msg = json.loads(body[1:].decode("utf-8"))
                if msg["type"] == "query":
                    if msg["has_params"]:
                        pending_query = msg
                        continue
                    ours.sendall(answer(msg, None))
                    continue
                result.messages.append(msg)
            else:
                batch = list(pa.ipc.open_stream(pa.py_buffer(body[1:])))[0]
                if pending_query is not None:
                    q, pending_query = pending_query, None
                    ours.sendall(answer(q, batch))
                    continue
                result.batches.append(batch)
                result.messages.append(("arrow", batch))
    finally:
        ours.close()
        _, result.stderr = proc.communicate(timeout=TIMEOUT)
        result.status = proc.returncode
    return result


class ContractTest(unittest.TestCase):
    """Start's params, output_params and rows_per_read, and loopback queries."""

    def assertDone(self, r, rows):
        self.assertIsNone(r.error, f"script_error: {r.error}")
        self.assertEqual(r.last, {"type": "done", "rows": rows}, r.stderr.decode())

    def test_params_become_variables(self):
        r = run(
            "OutputDataSet = pd.DataFrame({'a': [alpha], 'n': [n], 's': [name], 'k': [type(n).__name__]})",
            params={"alpha": 0.5, "n": 10, "name": "x"},
        )
        self.assertDone(r, 1)
        self.assertEqual(r.table().to_pylist(), [{"a": 0.5, "n": 10, "s": "x", "k": "int"}])

    def test_output_params_make_one_row(self):
        r = run(
            "import decimal\nmodel = b'\\x00bytes'\nrmse = 0.25\nd = decimal.Decimal('1.10')",
            output_params=["model", "rmse", "d"],
            output_columns=[
                {"name": "model", "type": "bytea"},
                {"name": "rmse", "type": "float8"},
                {"name": "d", "type": "numeric"},
            ],
        )
        self.assertDone(r, 1)
        self.assertEqual(
            r.table().to_pylist(), [{"model": b"\x00bytes", "rmse": 0.25, "d": "1.10"}]
        )
        r = run("a = 1", output_params=["a", "b"], output_columns=[
            {"name": "a", "type": "int4"}, {"name": "b", "type": "int4"}])
        self.assertIn("the script did not set b", r.error["message"])

    def test_rows_per_read_runs_per_chunk(self):
        batch = pa.record_batch([pa.array(range(7), pa.int64())], names=["x"])
        r = run(
            "OutputDataSet = pd.DataFrame({'chunk': [airlock_chunk], 'rows': [len(InputDataSet)]})",
            [batch],
            rows_per_read=3,
        )
        self.assertDone(r, 3)
        self.assertEqual(
            r.table().to_pylist(),
            [{"chunk": 1, "rows": 3}, {"chunk": 2, "rows": 3}, {"chunk": 3, "rows": 1}],
        )

    def test_loopback_query_execute_and_error(self):
        rows = pa.record_batch([pa.array([7, None], pa.int64())], names=["v"])

        def answer(q, params):
            if q["sql"] == "rows":
                self.assertEqual(params.to_pylist(), [{"$1": 5, "$2": "x"}])
                return (control({"type": "query_begin"}) + arrow(rows)
                        + control({"type": "query_end", "rows": 2}))
            if q["sql"] == "count":
                self.assertEqual(q["mode"], "execute")
                return control({"type": "query_begin"}) + control({"type": "query_end", "rows": 5})
            return control({"type": "query_error", "sqlstate": "42501", "message": "no",
                            "detail": None, "hint": None})

        script = (
            "d = airlock.query('rows', [5, 'x'])\n"
            "n = airlock.execute('count')\n"
            "try:\n    airlock.query('secret')\nexcept airlock.QueryError as e:\n    s = e.sqlstate\n"
            "OutputDataSet = pd.DataFrame({'dtype': [str(d.v.dtype)], 'n': [n], 's': [s]})"
        )
        r = run_interactive(script, control({"type": "input_end"}), answer)
        self.assertDone(r, 1)
        self.assertEqual(r.table().to_pylist(), [{"dtype": "Int64", "n": 5, "s": "42501"}])

    def test_input_arriving_before_an_answer_is_kept(self):
        first = pa.record_batch([pa.array([1, 2], pa.int64())], names=["x"])
        more = pa.record_batch([pa.array([3, 4], pa.int64())], names=["x"])
        sent_more = []

        def answer(q, params):
            out = b""
            if not sent_more:
                # The rest of the input goes out before the answer, as the backend
                # does when it was in the middle of sending it.
                out += arrow(more) + control({"type": "input_end"})
                sent_more.append(True)
            return out + control({"type": "query_begin"}) + control({"type": "query_end", "rows": 0})

        r = run_interactive(
            "airlock.execute('x')\nOutputDataSet = pd.DataFrame({'s': [int(InputDataSet.x.sum())]})",
            arrow(first),
            answer,
            has_input=True,
            rows_per_read=2,
        )
        self.assertDone(r, 2)
        self.assertEqual(r.table().to_pylist(), [{"s": 3}, {"s": 7}])


if __name__ == "__main__":
    unittest.main()

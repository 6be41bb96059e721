"""Airlock's warm path for Python: a pre-initialised interpreter (a "zygote").

airlockd's spawner starts this file as root, outside any sandbox, with

    fd 3    a SOCK_SEQPACKET socket to the spawner
    fd 4    libairlock_sandbox.so (a sealed copy in memory, so no host path of the
            daemon's shows up in a sandbox's /proc/self/maps)

It imports pandas, numpy and pyarrow once, never runs user code itself, and then, for
each call the spawner hands it (a spawn request and the call's data socket), clones one
new process with the sandbox library's `airlock_spawn_in_place`: the clone gets fresh
namespaces, the worker uid, the session folder, the call's cgroup, Landlock, rlimits
and seccomp (the cold path's steps, in the same order, in Rust) and only then returns
into Python, where it runs `airlock_runtime.main()` on the data socket (fd 3) exactly
once and exits. No process ever serves two calls; the zygote itself never touches a
call's data.

Messages are the spawner protocol's frames (u32 LE length, kind byte 1, JSON):
spawner -> zygote `spawn` (+ the data socket); zygote -> spawner `ready`, `spawned`
(+ a pidfd of the sandbox init, for kills), `spawn_failed`, `exited`. The zygote is the
sandbox inits' parent, so it reaps them and reports how each ended.
"""

import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import airlock_runtime  # noqa: E402  (needs the path above; -I leaves it out)

SPAWNER_FD = 3
LIBRARY_FD = 4
KIND_CONTROL = 1
MAX_MESSAGE = 1 << 20
ERROR_CAP = 4096
PR_SET_PDEATHSIG = 1
# airlock_spawn_in_place's results (crates/airlock-sandbox/src/ffi.rs).
IN_SANDBOX, STARTED, FAILED = 0, 1, -1


class ZygoteError(Exception):
    pass


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    # Nothing of ours outlives the spawner: it dies, we die, and our sandboxes (whose
    # parent-death signal points at us) die with us.
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise ZygoteError(f"prctl(PR_SET_PDEATHSIG): errno {ctypes.get_errno()}")
    spawn_in_place = load_library()
    libs = airlock_runtime.import_libraries()
    warm_up(libs)
    # The shim's own warm-up too (single-threaded): what it initialises on first use
    # (Arrow's cast table, pandas' constructors) is then shared by every clone.
    airlock_runtime.warm_up(libs)
    # Everything imported so far stays for the zygote's life: the collector never
    # traverses it again, so clones do not copy its pages just to collect.
    gc.freeze()
    check_single_threaded()
    sock = socket.socket(fileno=SPAWNER_FD)
    send(sock, {"type": "ready", "pid": os.getpid()})
    serve(sock, spawn_in_place, libs)


def load_library():
    # PyDLL, not CDLL: the interpreter lock stays held across the call, so the clone
    # copies an interpreter in a consistent state.
    lib = ctypes.PyDLL(f"/proc/self/fd/{LIBRARY_FD}")
    os.close(LIBRARY_FD)
    fn = lib.airlock_spawn_in_place
    fn.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    fn.restype = ctypes.c_int
    return fn


def warm_up(libs):
    """Library code paths every call takes, run once here on data of our own (never a
    call's): pandas and pyarrow import more of themselves on first use. Without
    threads: Arrow's thread pool, once started, would stay."""
    pa, pd = libs.pa, libs.pd
    frame = pd.DataFrame({"i": [1, 2], "f": [0.5, None], "s": ["a", None]})
    table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    pa.ipc.open_stream(sink.getvalue()).read_all().to_pandas(use_threads=False)


def check_single_threaded():
    """The clone copies only the calling thread; another thread could hold a lock the
    copy would then wait for forever. The environment the spawner gives us keeps the
    libraries single-threaded (OPENBLAS_NUM_THREADS=1, no jemalloc background thread)."""
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:
        names = []
        for t in tasks:
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                names.append(t)
        raise ZygoteError(
            f"the interpreter has {len(tasks)} threads ({', '.join(names)}); warm starts "
            "need exactly one"
        )


def serve(sock, spawn_in_place, libs):
    live = {}  # pidfd -> call_id
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == sock.fileno():
                msg, fds = recv(sock)
                if msg is None:
                    # The spawner is gone: so is every sandbox of ours.
                    for pidfd in live:
                        try:
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        except OSError:
                            pass
                    return
                if msg.get("type") != "spawn" or len(fds) != 1:
                    for f in fds:
                        os.close(f)
                    raise ZygoteError(f"unexpected message from the spawner: {msg.get('type')!r}")
                started = spawn(sock, spawn_in_place, libs, msg, fds[0])
                if started is not None:
                    live[started] = msg["call_id"]
                    poller.register(started, select.POLLIN)
            else:
                call_id = live.pop(fd)
                poller.unregister(fd)
                info = os.waitid(os.P_PIDFD, fd, os.WEXITED)
                os.close(fd)
                if info.si_code == os.CLD_EXITED:
                    status = {"kind": "code", "code": info.si_status}
                else:
                    status = {"kind": "signal", "signal": info.si_status}
                send(sock, {"type": "exited", "call_id": call_id, "status": status})


def spawn(sock, spawn_in_place, libs, msg, data_fd):
    """Clones the call's sandbox. In the clone this never returns (the call runs and the
    process exits); in the zygote it returns the new pidfd, or None if it failed."""
    call_id = msg["call_id"]
    request = json.dumps(msg).encode()
    pid = ctypes.c_int(-1)
    pidfd = ctypes.c_int(-1)
    error = ctypes.create_string_buffer(ERROR_CAP)
    check_single_threaded()
    # What os.fork does around fork(): the import lock, at-fork hooks (random reseeds
    # itself in the child), the interpreter's thread state.
    ctypes.pythonapi.PyOS_BeforeFork()
    result = spawn_in_place(
        request, len(request), data_fd, ctypes.byref(pid), ctypes.byref(pidfd), error, ERROR_CAP
    )
    if result == IN_SANDBOX:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        run_call(sock, libs, msg)  # never returns
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if result == STARTED:
        send(sock, {"type": "spawned", "call_id": call_id, "pid": pid.value}, [pidfd.value])
        return pidfd.value
    send(sock, {"type": "spawn_failed", "call_id": call_id, "error": error.value.decode(errors="replace")})
    return None


def run_call(sock, libs, msg):
    """In the clone, inside the finished sandbox: the call, once, then exit."""
    # fd 3 is the data socket now; the socket object of the zygote's fd 3 must never
    # close it. Every other fd of the zygote is closed already.
    sock.detach()
    status = airlock_runtime.EXIT_INPUT
    try:
        # Exactly the request's environment, as the cold path's execve gives it.
        os.environ.clear()
        os.environ.update(dict(msg["env"]))
        sys.argv = [airlock_runtime.__file__]
        # numpy's global generator was seeded once, in the zygote: reseed from the
        # kernel so no two calls share random numbers (random reseeds at fork).
        libs.np.random.seed()
        status = airlock_runtime.main()
    finally:
        os._exit(status)


def send(sock, msg, fds=()):
    payload = json.dumps(msg).encode()
    frame = (len(payload) + 1).to_bytes(4, "little") + bytes([KIND_CONTROL]) + payload
    if fds:
        socket.send_fds(sock, [frame], list(fds))
    else:
        sock.send(frame)


def recv(sock):
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        return None, fds
    length = int.from_bytes(data[:4], "little")
    if len(data) != 4 + length or data[4] != KIND_CONTROL:
        raise ZygoteError("malformed frame from the spawner")
    return json.loads(data[5:]), fds


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the spawner sees EOF and falls back to cold starts
        print(f"airlock_warm: {e!r}", file=sys.stderr)
        os._exit(1)
    os._exit(0)

"""A fork server for payment-app workers: one locked-down interpreter, a fresh child per payment.

Starting an interpreter for every payment cost about 30 ms of CPU, more than
everything else the chip does for it (``trustpay bench``: "chip+children").
This process is started the same way as ``nodes/app_runner.py`` (``python -I -S``,
empty environment, empty working directory, by ``exec``: it holds nothing
secret), takes the same locks (resource limits; as root a chroot into the
empty directory and the ``nobody`` user), imports what an app may use, and then
never runs app code itself. For each request it forks a child; the child
closes the channel to the chip, sets its CPU limit, installs the audit hook
and runs the app exactly as ``app_runner.run`` does, and writes its one-line
answer into a pipe of its own. So each payment's app still starts from the
same clean state and nothing of it survives into the next: the child is
killed and reaped once it answered (or at the wall-clock limit).

Channel (stdin from the chip, stdout to it): a request is a 4-byte big-endian
length and that many bytes (app_runner's JSON request); an answer is one
status byte (``A`` answered, ``T`` timed out) and a 4-byte length, then the
child's output. Anything else ends this process; the chip starts another.
"""

import contextlib
import json
import os
import resource
import select
import signal
import struct
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodes import app_runner as runner
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves this directory off the path
    import app_runner as runner  # standard library only, like this file

    del sys.path[0]

HEADER = struct.Struct(">I")
MAX_REQUESTS = 1_000_000  # bounds the serving loop; the chip starts a new server after it
MAX_OUTPUT = 64 * 1024


def limit_resources() -> None:
    """app_runner's limits but CPU time, which each child sets for itself (this process lives long)."""
    for which, value in (
        (resource.RLIMIT_AS, runner.ADDRESS_SPACE),
        (resource.RLIMIT_NOFILE, runner.OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def child(raw: bytes, answer_fd: int) -> None:
    """In the forked child: run the app on ``raw`` and write its answer; never returns."""
    code = 0
    try:
        os.close(0)  # the chip's channel is not the app's: it can neither read nor forge frames on it
        os.close(1)
        resource.setrlimit(resource.RLIMIT_CPU, (runner.CPU_S, runner.CPU_S))
        sys.stdout = sys.stderr  # what the app prints is not the answer
        try:
            text = json.dumps(runner.run(json.loads(raw)))
        except BaseException as exc:  # a malformed request or an unencodable answer
            text = json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]})
        data = (text + "\n").encode()
        while data:
            data = data[os.write(answer_fd, data) :]
    except BaseException:
        code = 1
    os._exit(code)


def collect(pid: int, answer_fd: int, wall_s: float) -> tuple[bytes, bytes]:
    """The child's answer (up to one line, at most MAX_OUTPUT + 1 bytes) or a timeout; kill, reap."""
    deadline = time.monotonic() + wall_s
    data = b""
    status = b"A"
    while len(data) <= MAX_OUTPUT and b"\n" not in data:  # bounded: every turn reads or ends
        left = deadline - time.monotonic()
        if left <= 0:
            status = b"T"
            break
        ready, _, _ = select.select([answer_fd], [], [], left)
        if not ready:
            status = b"T"
            break
        chunk = os.read(answer_fd, MAX_OUTPUT + 1)
        if not chunk:
            break
        data += chunk
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(answer_fd)
    return status, data[: MAX_OUTPUT + 1]


def serve(wall_s: float) -> None:
    channel_in = sys.stdin.buffer
    channel_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    for _ in range(MAX_REQUESTS):
        head = channel_in.read(HEADER.size)
        if len(head) != HEADER.size:
            return  # the chip closed the channel
        (size,) = HEADER.unpack(head)
        if size > runner.MAX_REQUEST:
            return
        raw = channel_in.read(size)
        if len(raw) != size:
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            child(raw, write_fd)
        os.close(write_fd)
        del raw
        status, data = collect(pid, read_fd, wall_s)
        channel_out.write(status + HEADER.pack(len(data)) + data)
        channel_out.flush()


def main() -> None:
    wall_s = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    limit_resources()
    for name in sorted(runner.ALLOWED_IMPORTS):  # while files can still be opened
        __import__(name)
    runner.drop_privileges()
    serve(wall_s)


if __name__ == "__main__":
    main()

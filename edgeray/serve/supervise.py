"""``python -m edgeray.serve.supervise --watch PID -- CMD ...``: run an engine server for the process PID and
take the server's whole process tree down when PID goes away.

Why a separate watcher: vLLM's server starts engine-core processes of its own, and when the server dies
without shutting them down they live on as orphans holding ~1.4 GB each. A replica cannot clean up after
itself when it is killed, and Ray's raylet SIGKILLs the direct children of a dead worker (their own children
survive, reparented to init), so the watcher must not be one of them: it detaches (double fork), prints
``<watcher pid> <server pid>`` on its standard output for the replica, starts CMD in a new process group and
then checks every ``POLL_S`` whether PID is still alive. When PID is gone, on SIGTERM/SIGINT, or when CMD
exits, it terminates that process group: SIGTERM, up to ``GRACE_S`` seconds, then SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

GRACE_S = 15.0
POLL_S = 0.5


def stop_group(pgid: int, alive: object = None, grace_s: float = GRACE_S) -> None:
    """SIGTERM the process group ``pgid``, wait until its leader is gone (``alive()``) or ``grace_s``
    passed, then SIGKILL whatever is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while callable(alive) and alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    return True


def _watch(watched: int, argv: list[str]) -> int:
    child = subprocess.Popen(argv, start_new_session=True)
    sys.stdout.write(f"{os.getpid()} {child.pid}\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the replica reads one line, then closes its end

    def stop(signum: int, _frame: object) -> None:
        stop_group(child.pid, lambda: child.poll() is None)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None and pid_alive(watched):
        time.sleep(POLL_S)
    stop_group(child.pid, lambda: child.poll() is None)
    return child.returncode or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=int, required=True, help="stop CMD when this process is gone")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    if os.fork() > 0:  # the intermediate process exits at once: the watcher is nobody's child but init's
        os._exit(0)
    os.setsid()
    return _watch(args.watch, cmd)


if __name__ == "__main__":
    sys.exit(main())

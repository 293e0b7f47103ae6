"""The processes a launcher starts (SuperLink, SuperNodes, `flwr run`): free loopback ports, logs, and
stopping exactly what was started, by process id, on success, error or Ctrl-C alike.

Flower's processes spawn their own (SuperExec, then a ServerApp, ClientApp or simulation process, and
Ray's under a simulation) in new sessions, so stopping the parent alone can orphan them: the tree
below each started process is snapshotted just before stopping, and whatever of it outlives the grace
period is stopped by id too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: ignore proxy settings


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux); empty elsewhere, where only started pids are stopped."""
    tree: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, stack = _children_map(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead but not reaped: its parent (maybe already gone) owns it, nothing left to stop
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class Started:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class ProcessGroup:
    """Processes started here; `stop()` ends them and their descendants by pid. Use as a context manager."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: list[Started] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, pipe: bool = False) -> Started:
        """Start `argv` with output to logs/<name>.log (or a pipe, for the caller to read and log)."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            process = subprocess.Popen(
                argv,
                env=env or self.env,
                stdout=subprocess.PIPE if pipe else fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        started = Started(name, argv, process, log)
        self.started.append(started)
        return started

    def stop(self, grace_s: float = 2.0, kill_after_s: float = 10.0) -> list[int]:
        """SIGTERM every started process (newest first); after `grace_s`, SIGTERM whatever of their trees
        is still alive (SuperExecs otherwise linger until they notice their parent is gone); after
        `kill_after_s`, SIGKILL what is left. Returns every pid it stopped."""
        tree = {s.pid: descendants(s.pid) for s in self.started if s.process.poll() is None}
        for s in reversed(self.started):
            if s.process.poll() is None:
                _signal(s.pid, signal.SIGTERM)
        targets = [s.pid for s in self.started] + [pid for pids in tree.values() for pid in pids]
        start = time.monotonic()
        orphans_signalled = False
        while any(_alive(p) for p in targets):
            for s in self.started:
                s.process.poll()  # reap our direct children as they exit
            waited = time.monotonic() - start
            if waited >= kill_after_s:
                for pid in targets:
                    if _alive(pid):
                        _signal(pid, signal.SIGKILL)
                break
            if waited >= grace_s and not orphans_signalled:
                for pid in targets:
                    if _alive(pid):
                        _signal(pid, signal.SIGTERM)
                orphans_signalled = True
            time.sleep(0.1)
        for s in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.process.wait(timeout=5)
        return targets

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, timeout_s: float, process: Started) -> None:
    """Until `url` answers 2xx; fails early, with its log, if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            code = process.process.returncode
            raise RuntimeError(f"{process.name} exited with code {code}; its log ({process.log}):\n{process.tail()}")
        try:
            with _NO_PROXY.open(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{process.name} did not answer {url} within {timeout_s:.0f}s; its log:\n{process.tail()}")

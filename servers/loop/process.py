"""Running the repo's commands: argument lists only, own process group, time and output budgets.

Output goes straight to a log file rather than a pipe, so a chatty command can neither block on a
full pipe nor fill memory; the output budget is enforced by watching the file grow. On a budget
breach the whole process group is killed, so test runners that fork workers do not leave orphans.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.05
# Process groups started here and still running. Process-wide on purpose: whatever owns the
# commands, none may outlive the process that budgets them (see `kill_running`).
_running: set[int] = set()
_running_lock = threading.Lock()


def kill_running() -> None:
    """Kill every command group still running; called when the server shuts down and at exit."""
    with _running_lock:
        groups = list(_running)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


atexit.register(kill_running)


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    exit_code: int | None  # None when the command was killed
    timed_out: bool
    output_exceeded: bool
    duration_s: float
    log_path: Path
    budget_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_exceeded

    def tail(self, chars: int = 2000) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - chars))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def describe(self, label: str | None = None) -> str:
        shown = label or " ".join(self.argv)
        if self.timed_out:
            return f"`{shown}` exceeded its {self.budget_s:g} s budget and was killed"
        if self.output_exceeded:
            return f"`{shown}` exceeded its output budget and was killed"
        return f"`{shown}` exited with {self.exit_code}"


class CommandNotFound(RuntimeError):
    pass


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# What a repository's own commands (its tests, hooks, benchmark) see of the server's environment:
# enough to find programs and behave, never the server's secrets. `loop.pass_env` adds names.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SHELL", "VIRTUAL_ENV",
            "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
_extra_env: tuple[str, ...] = ()


def pass_env(names: Sequence[str]) -> None:
    """Also hand these variables to repository commands (`loop.pass_env`, e.g. an agent CLI's API key)."""
    global _extra_env
    _extra_env = tuple(names)


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a command the repository controls: the allow-list plus `extra`."""
    keep = set(BASE_ENV) | set(_extra_env)
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}
    return {**env, **(extra or {})}


def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    timeout_s: float,
    max_output_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run `argv` in `cwd` without a shell; kill its process group at the time or output budget."""
    argv = [str(a) for a in argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The repository's code runs here: it gets the scrubbed environment, not the server's secrets.
    full_env = scrubbed_env({"PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    started = time.monotonic()
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, start_new_session=True,
            )
        except FileNotFoundError:
            raise CommandNotFound(f"command not found: {argv[0]!r} — install it or set the command in hydrabrain.toml") from None
        with _running_lock:
            _running.add(proc.pid)
        timed_out = exceeded = False
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - started > timeout_s:
                timed_out = True
            elif max_output_bytes is not None and log_path.stat().st_size > max_output_bytes:
                exceeded = True
            if timed_out or exceeded:
                _kill_group(proc)
                break
        # The leader may exit while children it forked keep running; they must not outlive the step.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with _running_lock:
            _running.discard(proc.pid)
    duration = time.monotonic() - started
    exit_code = None if (timed_out or exceeded) else proc.returncode
    return CommandResult(argv, exit_code, timed_out, exceeded, duration, log_path, timeout_s)

"""Run untrusted Python (model-written code plus its tests) in a limited subprocess.

Usage::

    from gcache.tasks.sandbox import run_program, run_many

    result = run_program("assert 1 + 1 == 2", timeout=5.0)
    result.status            # "passed" | "failed" | "timeout" | "memory" | "error"
    results = run_many(programs, max_workers=2)   # same order as `programs`

What one run does (the idea of nanochat's ``execution.py``, written for gcache):

- a fresh ``python`` child per program (``sys.executable``, flags ``-B -s``), in its own
  session so a timeout kills the whole process group (SIGKILL);
- a fresh temporary directory: the child's working directory, ``HOME`` and ``TMPDIR``;
  removed afterwards. stdout/stderr go to files beside it (bounded by RLIMIT_FSIZE,
  so a print loop cannot fill the parent's memory);
- a scrubbed environment: minimal ``PATH``, ``PYTHONDONTWRITEBYTECODE=1``,
  ``PYTHONHASHSEED=0``, single-threaded BLAS, nothing inherited (no API keys, no
  ``PYTHONPATH``);
- resource limits set inside the child before the program runs (so they can never
  touch the parent): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC = 0
  (for a non-root user no new process *or thread* can start; root ignores it),
  RLIMIT_CORE = 0;
- destructive functions replaced by stubs that raise ``PermissionError("sandbox: ...")``:
  process creation (``os.system``, ``os.fork``/``forkpty``, ``os.exec*``/``spawn*``/
  ``posix_spawn``, ``os.popen``, ``subprocess.Popen`` and so ``subprocess.run``,
  ``_posixsubprocess.fork_exec``), signals (``os.kill``/``killpg``), ``shutil.rmtree``/
  ``move``/``chown``, ``os.chdir``/``chroot``/``setsid``, ``os.link``/``symlink``,
  ownership and permission changes, and the builtins ``exit``/``quit``/``help``;
  ``import ctypes`` / ``pty`` / ``resource`` raise ImportError; ``os.putenv``/``unsetenv``
  do nothing (``os.environ`` edits stay inside the interpreter);
- writes confined to the temporary directory: ``open``/``io.open``/``os.open`` in a
  writing mode, ``os.remove``/``unlink``/``rmdir``/``rename``/``replace``/``mkdir``/
  ``truncate`` on a path outside it raise ``PermissionError``.

Statuses: ``passed`` (the program ran to the end, or called ``sys.exit(0)``), ``failed``
(an ``AssertionError`` or a non-zero ``sys.exit``), ``timeout`` (wall clock or CPU
limit), ``memory`` (``MemoryError``), ``error`` (any other exception, a refused
operation, a crash or a kill by a signal). A program may put JSON-able facts into the
dict ``SANDBOX_DETAILS`` it finds in its globals; they come back as ``result.details``
(the code tasks store per-test counts there).

What this does NOT protect against. It is a reliability guard against careless or
buggy model code, not a security boundary against a determined attacker:

- anything done through ``ctypes``/``cffi`` imported some other way, C extensions or
  ``io.FileIO``/``_io`` directly (they bypass the Python-level stubs);
- reading any file the user can read (secrets in ``~``, ``/etc``, the repository);
- network access (sockets are not blocked);
- restoring the stubs (``importlib.reload(os)``), or fork bombs when running as root
  (root ignores RLIMIT_NPROC);
- CPU or memory contention with other processes; a disk filled by many files, each
  under RLIMIT_FSIZE.

Run it inside a container or VM without secrets when the code may be adversarial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SandboxResult", "run_program", "run_many", "STATUSES"]

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "error")
_TAIL = 2000  # characters kept of stdout / stderr
_MESSAGE = 1000  # characters kept of the exception message


@dataclass
class SandboxResult:
    """Outcome of one program run."""

    status: str  # one of STATUSES
    message: str = ""  # exception type and text (truncated), with the failing line of the program
    stdout: str = ""  # tail of the child's stdout
    stderr: str = ""  # tail of the child's stderr
    returncode: int | None = None  # negative = killed by that signal
    wall_seconds: float = 0.0
    details: dict = field(default_factory=dict)  # what the program stored in SANDBOX_DETAILS

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's entry point: limits, guards, then the program. argv[1] is a JSON config.
# It uses only the stdlib and keeps references to the real functions it needs before
# replacing them.
_BOOTSTRAP = r"""
import builtins, io, json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
report = open(cfg["report"], "w")  # opened before the guards go up
program = open(cfg["program"]).read()
work = os.path.realpath(cfg["work"])

def _limit(kind, soft, hard=None):
    try:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass
_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
_limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
_limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
_limit(resource.RLIMIT_NPROC, 0)
_limit(resource.RLIMIT_CORE, 0)

def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused

def _inside(path):
    if isinstance(path, int):
        return True  # an already open file descriptor
    real = os.path.realpath(os.fspath(path))
    return real == work or real.startswith(work + os.sep)

def _confine(name, func, nargs=1):
    def confined(*args, **kwargs):
        for path in args[:nargs]:
            if not _inside(path):
                raise PermissionError(f"sandbox: {name} outside the sandbox directory is refused: {path!r}")
        return func(*args, **kwargs)
    confined.__name__ = func.__name__
    return confined

_open = builtins.open
def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {file!r}")
    return _open(file, mode, *args, **kwargs)

_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {path!r}")
    return _os_open(path, flags, *args, **kwargs)

import shutil, subprocess, _posixsubprocess
builtins.open = io.open = guarded_open
os.open = guarded_os_open
for name, nargs in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1),
                    ("makedirs", 1), ("rename", 2), ("renames", 2), ("replace", 2), ("truncate", 1),
                    ("utime", 1), ("mkfifo", 1), ("mknod", 1)]:
    if hasattr(os, name):
        setattr(os, name, _confine("os." + name, getattr(os, name), nargs))
for name in ["system", "popen", "fork", "forkpty", "vfork", "kill", "killpg",
             "chdir", "fchdir", "chroot", "setsid", "setpgid", "setuid", "setgid", "seteuid", "setegid",
             "setreuid", "setregid", "setresuid", "setresgid", "nice", "plock", "link", "symlink",
             "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
             "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp"]:
    if hasattr(os, name):
        setattr(os, name, _refuse("os." + name))
# os.environ edits stay inside this interpreter (numpy's import sets a variable, so no error)
os.putenv = os.unsetenv = lambda *args: None
for name in ["rmtree", "move", "chown"]:
    setattr(shutil, name, _refuse("shutil." + name))
subprocess.Popen = _refuse("subprocess.Popen")
_posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")
builtins.exit = _refuse("exit")
builtins.quit = _refuse("quit")
builtins.help = _refuse("help")
for name in ["ctypes", "_ctypes", "pty", "resource", "psutil", "tkinter"]:
    sys.modules[name] = None  # `import ctypes` now raises ImportError

details = {}
outcome = {"kind": "passed"}
try:
    code = compile(program, cfg["program"], "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins, "SANDBOX_DETAILS": details})
except SystemExit as exc:
    if exc.code not in (None, 0):
        outcome = {"kind": "exit", "type": "SystemExit", "text": repr(exc.code)}
except BaseException as exc:
    try:
        traceback.print_exc()
    except Exception:
        pass
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == cfg["program"]]
    outcome = {"kind": "exception", "type": type(exc).__name__, "text": str(exc)[:2000],
               "line": frames[-1].lineno if frames else None,
               "source": (frames[-1].line or "")[:300] if frames else ""}
try:
    outcome["details"] = json.loads(json.dumps(details, default=repr))
    report.write(json.dumps(outcome))
finally:
    report.close()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except Exception:  # e.g. the output file hit RLIMIT_FSIZE; the report is already written
        pass
"""


def _scrubbed_env(work: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * _TAIL))
        return f.read().decode("utf-8", "replace")[-_TAIL:]


def _classify(outcome: dict | None, returncode: int, timed_out: bool) -> tuple[str, str]:
    """(status, message) from the child's report and how the process ended."""
    if timed_out:
        return "timeout", "wall-clock time limit exceeded"
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if returncode == -signal.SIGXFSZ:
        return "error", "file size limit exceeded (too much output?)"
    if outcome is None:
        if returncode < 0:
            return "error", f"killed by signal {signal.Signals(-returncode).name}"
        return "error", f"the program ended without a report (exit code {returncode}; os._exit?)"
    if outcome["kind"] == "passed":
        return "passed", ""
    if outcome["kind"] == "exit":
        return "failed", f"SystemExit: {outcome['text']}"
    kind, text = outcome["type"], outcome["text"]
    message = f"{kind}: {text}" if text else kind
    if outcome.get("line"):
        message += f" (program line {outcome['line']}: {outcome['source']})"
    status = {"AssertionError": "failed", "MemoryError": "memory"}.get(kind, "error")
    return status, message[:_MESSAGE]


def run_program(
    program: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
) -> SandboxResult:
    """Run one Python program in a fresh limited subprocess and report how it ended.

    ``timeout`` is wall-clock seconds; ``cpu_seconds`` defaults to ``ceil(timeout) + 1``;
    ``memory_mb`` caps the address space (RLIMIT_AS); ``max_file_mb`` caps every file
    the child writes, its stdout and stderr included.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(
            f"memory_mb must be >= 64 (the interpreter alone needs ~30 MB), got {memory_mb!r}"
        )
    root = Path(tempfile.mkdtemp(prefix="gcache-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        cfg = {
            "program": str(root / "program.py"),
            "report": str(root / "report.json"),
            "work": str(work),
            "memory_bytes": int(memory_mb) * 2**20,
            "cpu_seconds": int(cpu_seconds or math.ceil(timeout) + 1),
            "fsize_bytes": int(max_file_mb) * 2**20,
        }
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-B", "-s", "-c", _BOOTSTRAP, json.dumps(cfg)],
                cwd=work,
                env=_scrubbed_env(str(work)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: killpg reaches every descendant
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # also reaps strays after a normal exit
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        wall = time.monotonic() - start
        try:
            outcome = json.loads((root / "report.json").read_text(encoding="utf-8") or "null")
        except (OSError, json.JSONDecodeError):
            outcome = None
        status, message = _classify(outcome, proc.returncode, timed_out)
        log.debug("sandbox run: %s after %.2f s %s", status, wall, message[:200])
        return SandboxResult(
            status=status,
            message=message,
            stdout=_tail(root / "stdout"),
            stderr=_tail(root / "stderr"),
            returncode=proc.returncode,
            wall_seconds=wall,
            details=(outcome or {}).get("details", {}),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_many(
    programs: list[str],
    *,
    max_workers: int | None = None,
    limits: list[dict] | None = None,
    **kwargs,
) -> list[SandboxResult]:
    """Run programs in parallel (a bounded pool of threads, one subprocess each), in order.

    ``max_workers`` defaults to the CPU count: more workers than cores only makes
    programs hit their time limits. Keyword arguments go to :func:`run_program`;
    ``limits`` optionally gives per-program overrides of them (e.g. a longer timeout
    for one slow test), one dict per program.
    """
    workers = (os.cpu_count() or 1) if max_workers is None else max_workers
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    if limits is not None and len(limits) != len(programs):
        raise ValueError(
            f"got {len(limits)} limits for {len(programs)} programs; they must pair up"
        )
    if not programs:
        return []
    jobs = [(p, {**kwargs, **(limits[k] if limits else {})}) for k, p in enumerate(programs)]
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(lambda job: run_program(job[0], **job[1]), jobs))

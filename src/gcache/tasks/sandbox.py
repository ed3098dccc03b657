"""Run untrusted Python (model-written code plus its tests) in an isolated, limited subprocess.

Usage::

    from gcache.tasks.sandbox import run_program, run_many

    result = run_program("assert 1 + 1 == 2", timeout=5.0)
    result.status            # "passed" | "failed" | "timeout" | "memory" | "error"
    result.isolation         # "bwrap" | "unshare" | "none": which layer 1 the run had
    results = run_many(programs, max_workers=2)   # same order as `programs`

Each program runs in a fresh ``python`` child (``-B -s``, scrubbed environment, a fresh
temporary work directory as cwd, ``HOME`` and ``TMPDIR``, removed afterwards) in its own
session, killed with its whole process group after ``timeout``. Three layers:

1. **Namespaces** (``GCACHE_SANDBOX_ISOLATION`` or ``isolation=``: ``auto`` (default) uses
   bubblewrap if it works, else ``unshare(2)`` called through ctypes by a small wrapper;
   ``require`` raises :class:`IsolationUnavailable` without either; ``off``; or
   ``bwrap``/``unshare`` to insist on one). The child gets its own user, mount, network,
   PID, IPC and UTS namespaces, runs as uid 65534 inside with no capabilities, and sees a
   new root holding only read-only binds of ``/usr``, ``/bin``, ``/lib*``, ``/sbin``, a
   few ``/etc`` files (loader cache, passwd, hosts, certificates; not ``shadow``) and the
   Python installation in use (``sys.prefix``/``base_prefix``), ``/dev/{null,zero,full,
   random,urandom}``, its own ``/proc``, and its work directory, the only writable place.
   Protects: the network (loopback included: the namespace has none of the host's
   interfaces or listeners), files outside that view (the home directory, the
   repository, other temporary files, ``/root``) for reading and writing, every write
   outside the work directory whatever API makes it (``io.FileIO``, ``posix.open``, C
   code), and the user's other processes (not visible, cannot be signalled). Does not
   protect: what the view shows is readable (system files, the Python installation,
   ``/etc/passwd``); when the caller is root, uid 65534 inside is still root outside,
   so root-owned files *in the view* are readable as their owner and RLIMIT_NPROC does
   not apply (a fork loop through ``posix.fork`` is bounded only by the timeout); CPU,
   memory and disk contention; kernel bugs. Where neither backend works (no bubblewrap and user
   namespaces disabled, or a seccomp profile forbidding them), ``auto`` logs one warning
   naming what is then unprotected and runs with layers 2 and 3 only.
2. **Limits and Python-level guards**, set inside the child before the program runs:
   RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (also bounds stdout/stderr, written to
   files), RLIMIT_NPROC = 0, RLIMIT_CORE = 0; stubs raising ``PermissionError("sandbox:
   ...")`` for process creation (``os.system``/``fork``/``exec*``/``spawn*``/``popen``,
   ``subprocess.Popen``, ``_posixsubprocess.fork_exec``), signals (``os.kill``),
   ``shutil.rmtree``/``move``, ``os.chdir``/``chroot``/``setsid``, links, ownership and
   permission changes, tracing (``sys.settrace``/``setprofile``) and the builtins
   ``exit``/``quit``/``help``; ``import ctypes``/``pty``/``resource`` raise ImportError;
   ``open``/``os.open``/``os.remove`` and friends refuse paths outside the work directory.
   Protects against careless code (a stray ``os.system``, a fork loop, a runaway
   allocation or print loop). Does not protect against code that wants out: C
   extensions, ``posix``/``_io`` used directly, ``importlib.reload(os)`` bypass the stubs,
   and root ignores RLIMIT_NPROC; without layer 1 nothing stops reads, network access
   or writes through ``io.FileIO``.
3. **The verdict out of band.** The parent passes the child a configuration in an
   unlinked file on stdin (read and emptied before the program starts): the program
   text, a random per-run token, and the number of a second unlinked file's descriptor.
   After the program has ended the bootstrap writes ``token + JSON`` there and exits
   with ``os._exit``; the parent reads only that. Stdout, the exit status, files and
   ``SANDBOX_DETAILS`` never decide the status, so printing a marker, ``os._exit(0)``
   or writing a forged report to any descriptor scores nothing. Counts a verdict
   depends on go through ``SANDBOX_TALLY(name, amount=1, note=None)``, which counts
   only when called from a line of the program's own compiled code, running in its
   own globals, that the caller listed in ``tally_lines={name: [line, ...]}``; any
   other call raises ``PermissionError`` and marks the run ``tampered``. For names in
   ``keep_notes`` every note is kept (``result.records``): how a program hands data
   out. Does not protect against a program that searches its own interpreter (frames,
   closures, ``gc``, ``/proc/self/mem``) for the token, or that changes what the trusted
   lines compute: code and checks in one program share one interpreter (rebound
   helpers, patched builtins, always-equal objects), so ``code_eval`` runs the tests'
   comparisons in a second program that holds no untrusted code.

Statuses: ``passed`` (the program ran to the end, or called ``sys.exit(0)``), ``failed``
(an ``AssertionError`` or a non-zero ``sys.exit``), ``timeout`` (wall clock or CPU limit),
``memory`` (``MemoryError``), ``error`` (any other exception, a refused operation, a
crash, a kill by a signal, or no authentic report). ``SANDBOX_DETAILS``, a dict in the
program's globals, comes back as ``result.details``: the program's own word, forgeable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SandboxResult",
    "run_program",
    "run_many",
    "STATUSES",
    "ISOLATION_ENV",
    "IsolationUnavailable",
    "isolation_problem",
]

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "error")
ISOLATION_ENV = "GCACHE_SANDBOX_ISOLATION"
_MODES = ("auto", "require", "off", "bwrap", "unshare")
_BACKENDS = ("bwrap", "unshare")
_TAIL = 2000  # characters kept of stdout / stderr
_MESSAGE = 1000  # characters kept of the exception message
_INSIDE_ID = 65534  # uid and gid of the program inside its user namespace ("nobody")


class IsolationUnavailable(RuntimeError):
    """Namespace isolation was required but does not work on this machine."""


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
    tally: dict = field(default_factory=dict)  # name -> count of accepted SANDBOX_TALLY calls
    notes: dict = field(default_factory=dict)  # name -> first note given with that tally
    records: dict = field(default_factory=dict)  # name -> every note of a kept tally, in order
    tampered: str = ""  # the first refused SANDBOX_TALLY call, if any
    isolation: str = "none"  # "bwrap" | "unshare" | "none"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's entry point: limits, guards, then the program; then the report. argv[1] is
# public JSON (work dir, limits); the secret part (program, token, report descriptor,
# tally lines) is read from stdin, an unlinked file that is emptied and closed at once.
# Everything lives in function scope so that `import __main__` shows nothing.
_BOOTSTRAP = r"""
def _sandbox():
    import builtins, io, json, linecache, os, resource, sys, traceback
    public = json.loads(sys.argv[1])
    del sys.argv[1:]
    stdin = open(0, "rb", closefd=False)
    secret = json.loads(stdin.read())
    os.ftruncate(0, 0)  # the file is shared with the processes that started this one
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token, report_fd, filename = secret["token"], secret["report_fd"], secret["filename"]
    program = secret["program"]
    sites = {name: frozenset(lines) for name, lines in secret["tally_lines"].items()}
    keep, room = frozenset(secret["keep_notes"]), [secret["notes_room"]]
    del secret
    work = os.path.realpath(public["work"])
    linecache.cache[filename] = (len(program), None, program.splitlines(True), filename)

    def limit(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass
    limit(resource.RLIMIT_AS, public["memory_bytes"])
    limit(resource.RLIMIT_CPU, public["cpu_seconds"], public["cpu_seconds"] + 1)
    limit(resource.RLIMIT_FSIZE, public["fsize_bytes"])
    limit(resource.RLIMIT_NPROC, 0)
    limit(resource.RLIMIT_CORE, 0)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        refused.__name__ = name.rsplit(".", 1)[-1]
        return refused

    def inside(path):
        if isinstance(path, int):
            return True  # an already open file descriptor
        real = os.path.realpath(os.fspath(path))
        return real == work or real.startswith(work + os.sep)

    def confine(name, func, nargs=1):
        def confined(*args, **kwargs):
            for path in args[:nargs]:
                if not inside(path):
                    raise PermissionError(f"sandbox: {name} outside the sandbox directory is refused: {path!r}")
            return func(*args, **kwargs)
        confined.__name__ = func.__name__
        return confined

    real_open = builtins.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & writing and not inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    # SANDBOX_TALLY counts only calls made from a listed line of the program's own code
    # objects (not recompiled copies), running in the program's globals.
    getframe, str_type, int_type = sys._getframe, str, int
    codes, counts, notes, tampered = {}, {}, {}, []
    records = {name: [] for name in keep}
    namespace = {"__name__": "__main__", "__builtins__": builtins, "SANDBOX_DETAILS": {}}

    def tally(name, amount=1, note=None):
        caller = getframe(1)
        if (codes.get(id(caller.f_code)) is not caller.f_code or caller.f_globals is not namespace
                or type(name) is not str_type or caller.f_lineno not in sites.get(name, ())
                or type(amount) is not int_type or amount < 0):
            if not tampered:
                tampered.append(f"SANDBOX_TALLY called from {caller.f_code.co_filename!r} line "
                                f"{caller.f_lineno}, which is not a tally line for it")
            raise PermissionError("sandbox: SANDBOX_TALLY is only counted from the lines given to the sandbox")
        if name in keep:
            if type(note) is not str_type or not note.isascii():
                raise TypeError(f"sandbox: a note of {name!r} must be an ASCII str")
            if len(note) > room[0]:
                raise MemoryError("sandbox: the kept notes are over their limit")
            room[0] -= len(note)
            records[name].append(note)
        elif type(note) is str_type and name not in notes:
            notes[name] = note[:1000]
        counts[name] = counts.get(name, 0) + amount
    namespace["SANDBOX_TALLY"] = tally

    import shutil, subprocess, threading, _posixsubprocess
    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name, nargs in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1),
                        ("makedirs", 1), ("rename", 2), ("renames", 2), ("replace", 2), ("truncate", 1),
                        ("utime", 1), ("mkfifo", 1), ("mknod", 1)]:
        if hasattr(os, name):
            setattr(os, name, confine("os." + name, getattr(os, name), nargs))
    for name in ["system", "popen", "fork", "forkpty", "vfork", "kill", "killpg",
                 "chdir", "fchdir", "chroot", "setsid", "setpgid", "setuid", "setgid", "seteuid", "setegid",
                 "setreuid", "setregid", "setresuid", "setresgid", "nice", "plock", "link", "symlink",
                 "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp"]:
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    # os.environ edits stay inside this interpreter (numpy's import sets a variable, so no error)
    os.putenv = os.unsetenv = lambda *args: None
    for name in ["rmtree", "move", "chown"]:
        setattr(shutil, name, refuse("shutil." + name))
    subprocess.Popen = refuse("subprocess.Popen")
    _posixsubprocess.fork_exec = refuse("_posixsubprocess.fork_exec")
    # a trace function could move the test's current line (frame.f_lineno) onto a tally line
    sys.settrace, sys.setprofile = refuse("sys.settrace"), refuse("sys.setprofile")
    threading.settrace, threading.setprofile = refuse("threading.settrace"), refuse("threading.setprofile")
    builtins.exit = refuse("exit")
    builtins.quit = refuse("quit")
    builtins.help = refuse("help")
    for name in ["ctypes", "_ctypes", "pty", "resource", "psutil", "tkinter"]:
        sys.modules[name] = None  # `import ctypes` now raises ImportError

    outcome = {"kind": "passed"}
    try:
        code = compile(program, filename, "exec")
        pending = [code]
        while pending:
            current = pending.pop()
            codes[id(current)] = current
            pending.extend(c for c in current.co_consts if isinstance(c, type(code)))
        exec(code, namespace)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            outcome = {"kind": "exit", "type": "SystemExit", "text": repr(exc.code)}
    except BaseException as exc:
        try:
            traceback.print_exc()
        except Exception:
            pass
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        outcome = {"kind": "exception", "type": type(exc).__name__, "text": str(exc)[:2000],
                   "line": frames[-1].lineno if frames else None,
                   "source": (frames[-1].line or "")[:300] if frames else ""}
    try:
        details = json.dumps(namespace.get("SANDBOX_DETAILS"), default=repr)
        outcome["details"] = json.loads(details) if len(details) < 2**20 else {"too_large": len(details)}
    except Exception:
        outcome["details"] = {"unreadable": True}
    outcome.update(tally=counts, notes=notes, records=records, tampered=tampered[0] if tampered else "")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # e.g. the output file hit RLIMIT_FSIZE
            pass
    message = (token + json.dumps(outcome) + "\n").encode()
    while message:
        message = message[os.write(report_fd, message):]
    os._exit(0)  # no atexit handlers or leftover threads of the program run after the report
_sandbox()
"""

# Layer 1 without bubblewrap: `python -I -S -c _UNSHARE VIEW_JSON COMMAND...` builds the same
# view as the bubblewrap command below with unshare(2)/mount(2)/pivot_root(2) and runs
# COMMAND in it as PID 2 (PID 1 only waits: the kernel shields PID 1 from signals such as
# SIGXCPU). It exits 128 + N when the command was killed by signal N, like bubblewrap.
_UNSHARE = r"""
import ctypes, json, os, platform, sys
view, command = json.loads(sys.argv[1]), sys.argv[2:]
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
KEEP = [(os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
        (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)]
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
libc = ctypes.CDLL(None, use_errno=True)

def check(what, result):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(f"mount {target}", libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)))

def place(path, root):
    target = root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return None
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    return target

def bind(path, root, readonly):
    target = place(path, root)
    if target is None:
        return
    mount(path, target, None, MS_BIND | MS_REC)
    if readonly:  # a read-only remount must keep the flags the source mount has
        flags = os.statvfs(target).f_flag
        keep = sum(ms for st, ms in KEEP if flags & st)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)

def exit_code(status):
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

uid, gid, root = os.geteuid(), os.getegid(), view["root"]
check("unshare", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
                              | CLONE_NEWIPC | CLONE_NEWUTS))
for name, text in [("setgroups", "deny"), ("uid_map", f"{view['id']} {uid} 1"),
                   ("gid_map", f"{view['id']} {gid} 1")]:
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
mount(None, "/", None, MS_REC | MS_PRIVATE)
mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
for path in view["ro"]:
    bind(path, root, True)
for path in view["rw"]:
    bind(path, root, False)
for name in ("null", "zero", "full", "random", "urandom"):
    bind("/dev/" + name, root, False)
os.makedirs(root + "/proc")
os.makedirs(root + "/.old")
init = os.fork()
if init:
    os._exit(exit_code(os.waitpid(init, 0)[1]))
try:  # PID 1 of the new namespace
    libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: go when the process above goes
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    check("pivot_root", libc.syscall(PIVOT_ROOT[platform.machine()], b".", b".old"))
    check("umount", libc.umount2(b"/.old", 2))  # MNT_DETACH: the old root is gone for good
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(view["cwd"])
    program = os.fork()
    if program == 0:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        os.execv(command[0], command)  # uid 65534 inside: the exec drops every capability
    while True:
        pid, status = os.waitpid(-1, 0)  # also reaps orphans of the program
        if pid == program:
            os._exit(exit_code(status))
except BaseException as exc:
    print(f"sandbox isolation: {type(exc).__name__}: {exc}", file=sys.stderr)
    os._exit(127)
"""

_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = (
    "alternatives", "ca-certificates", "group", "host.conf", "hosts", "ld.so.cache", "ld.so.conf",
    "ld.so.conf.d", "localtime", "mime.types", "nsswitch.conf", "os-release", "passwd", "ssl",
    "timezone",
)  # fmt: skip


def _readonly_paths() -> list[str]:
    """System directories, a few /etc files and the Python installation, outermost only."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    python |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    python |= {os.path.realpath(p) for p in python}
    paths = [*_SYSTEM_PATHS, *(f"/etc/{name}" for name in _ETC_FILES), *python]
    kept: list[str] = []
    for path in sorted({os.path.normpath(p) for p in paths if os.path.lexists(p)}, key=len):
        if path != "/" and not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _view(work: Path, newroot: Path) -> dict:
    return {
        "ro": _readonly_paths(),
        "rw": [str(work)],
        "cwd": str(work),
        "root": str(newroot),
        "id": _INSIDE_ID,
    }


def _wrap(backend: str | None, view: dict, command: list[str]) -> list[str]:
    """`command` run inside the view by `backend` (None: as it is)."""
    if backend is None:
        return command
    if backend == "unshare":
        return [sys.executable, "-I", "-S", "-c", _UNSHARE, json.dumps(view), *command]
    argv = ["bwrap", "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net"]
    argv += ["--unshare-uts", "--unshare-cgroup-try", "--die-with-parent"]
    argv += ["--uid", str(view["id"]), "--gid", str(view["id"])]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]  # bwrap run by root would otherwise keep them
    for path in view["ro"]:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for path in view["rw"]:
        argv += ["--bind", path, path]
    return argv + ["--chdir", view["cwd"], "--remount-ro", "/", "--", *command]


_probes: dict[str, str] = {}  # backend -> "" if it works, else why not
_probe_lock = threading.Lock()
_warned = False


def isolation_problem(backend: str) -> str:
    """Why `backend` ("bwrap" or "unshare") cannot isolate a program here; "" if it can.

    Checked once per process by running a tiny program through it.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown isolation backend {backend!r}; expected one of {_BACKENDS}")
    with _probe_lock:
        if backend not in _probes:
            _probes[backend] = _probe(backend)
        return _probes[backend]


def _probe(backend: str) -> str:
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap: bubblewrap is not installed"
    root = Path(tempfile.mkdtemp(prefix="gcache-sandbox-probe-"))
    try:
        (root / "work").mkdir()
        (root / "newroot").mkdir()
        check = "import os; assert os.getpid() < 10 and os.getcwd() == os.environ['HOME']"
        argv = _wrap(
            backend,
            _view(root / "work", root / "newroot"),
            [sys.executable, "-B", "-s", "-c", check],
        )
        proc = subprocess.run(
            argv,
            cwd=root / "work",
            env=_scrubbed_env(str(root / "work")),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{backend}: {exc}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return f"{backend}: exit code {proc.returncode}: {why[0][:300]}"
    return ""


def _backend(isolation: str | None) -> str | None:
    """The isolation backend a run uses (None: no namespaces), per `isolation` or the env."""
    global _warned
    mode = isolation or os.environ.get(ISOLATION_ENV) or "auto"
    if mode not in _MODES:
        raise ValueError(f"sandbox isolation must be one of {_MODES}, got {mode!r}")
    if mode == "off":
        return None
    candidates = (mode,) if mode in _BACKENDS else _BACKENDS
    problems = [isolation_problem(backend) for backend in candidates]
    for backend, problem in zip(candidates, problems, strict=True):
        if not problem:
            return backend
    why = "; ".join(problems)
    if mode != "auto":
        raise IsolationUnavailable(
            f"sandbox isolation {mode!r} is unavailable here ({why}); install bubblewrap or "
            f"allow unprivileged user namespaces, or set {ISOLATION_ENV}=auto to run without it"
        )
    with _probe_lock:
        if not _warned:
            _warned = True
            log.warning(
                "sandbox: no namespace isolation (%s). Programs run with rlimits and "
                "Python-level guards only, so they CAN read every file this user can read "
                "(home directory, repository), reach the network including 127.0.0.1, see "
                "this user's other processes and write outside their work directory through "
                "io.FileIO or posix.open. Set %s=require to refuse to run without isolation.",
                why,
                ISOLATION_ENV,
            )
    return None


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


def _read_report(report, token: str) -> dict | None:
    """The bootstrap's report: the JSON after the run's token; None if there is none."""
    report.seek(0)
    data = report.read()
    start = data.find(token.encode())
    if start < 0:
        return None
    line = data[start + len(token) :].split(b"\n", 1)[0]
    try:
        outcome = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return outcome if isinstance(outcome, dict) else None


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
    tally_lines: dict[str, list[int]] | None = None,
    keep_notes: tuple[str, ...] = (),
    isolation: str | None = None,
) -> SandboxResult:
    """Run one Python program in a fresh isolated, limited subprocess and report how it ended.

    ``timeout`` is wall-clock seconds; ``cpu_seconds`` defaults to ``ceil(timeout) + 1``;
    ``memory_mb`` caps the address space (RLIMIT_AS); ``max_file_mb`` caps every file
    the child writes, its stdout and stderr included. ``tally_lines`` maps a tally name
    to the program lines (1-based) whose ``SANDBOX_TALLY(name, ...)`` calls count; for the
    names in ``keep_notes`` every note (an ASCII str) is kept, in order, in ``result.records``
    (a quarter of ``max_file_mb`` in characters in all, as the report carrying them is a file
    the child writes; a call past that raises MemoryError and counts nothing).
    ``isolation`` overrides ``$GCACHE_SANDBOX_ISOLATION`` (see the module docstring).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(
            f"memory_mb must be >= 64 (the interpreter alone needs ~30 MB), got {memory_mb!r}"
        )
    backend = _backend(isolation)
    root = Path(tempfile.mkdtemp(prefix="gcache-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        (root / "newroot").mkdir()
        public = {
            "work": str(work),
            "memory_bytes": int(memory_mb) * 2**20,
            "cpu_seconds": int(cpu_seconds or math.ceil(timeout) + 1),
            "fsize_bytes": int(max_file_mb) * 2**20,
        }
        token = secrets.token_hex(16)
        command = [sys.executable, "-B", "-s", "-c", _BOOTSTRAP, json.dumps(public)]
        start = time.monotonic()
        with (
            tempfile.TemporaryFile() as config,
            tempfile.TemporaryFile() as report,
            open(root / "stdout", "wb") as out,
            open(root / "stderr", "wb") as err,
        ):
            secret = {
                "program": program,
                "filename": "<program>",
                "token": token,
                "report_fd": report.fileno(),
                "tally_lines": {name: list(lines) for name, lines in (tally_lines or {}).items()},
                "keep_notes": list(keep_notes),
                "notes_room": int(max_file_mb) * 2**18,
            }
            config.write(json.dumps(secret).encode())
            config.seek(0)
            proc = subprocess.Popen(
                _wrap(backend, _view(work, root / "newroot"), command),
                cwd=work,
                env=_scrubbed_env(str(work)),
                stdin=config,
                stdout=out,
                stderr=err,
                pass_fds=(report.fileno(),),
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
            outcome = _read_report(report, token)
        wall = time.monotonic() - start
        returncode = proc.returncode
        if backend is not None and returncode > 128:  # the wrappers report signal N as 128 + N
            returncode = 128 - returncode
        status, message = _classify(outcome, returncode, timed_out)
        log.debug("sandbox run: %s after %.2f s %s", status, wall, message[:200])
        outcome = outcome or {}
        return SandboxResult(
            status=status,
            message=message,
            stdout=_tail(root / "stdout"),
            stderr=_tail(root / "stderr"),
            returncode=returncode,
            wall_seconds=wall,
            details=outcome["details"] if isinstance(outcome.get("details"), dict) else {},
            tally=outcome.get("tally", {}),
            notes=outcome.get("notes", {}),
            records=outcome.get("records", {}),
            tampered=outcome.get("tampered", ""),
            isolation=backend or "none",
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
    for one slow test, or the program's ``tally_lines``), one dict per program.
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

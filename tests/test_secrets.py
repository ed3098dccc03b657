"""API keys stay out of configs, logs, W&B files and the console."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from servers import FaultServer

from gcache.secrets import (
    env_secrets,
    install_secret_filter,
    load_dotenv,
    redacted_config,
    secret_overrides,
)

PLANTED = "sk-test-PLANTED-9f4c2e7a1b"
TINY = ["model=tiny-random", "task=gsm8k", "limit_train=2", "limit_val=1", "limit_test=1", "batch_size=2",
        "policy.graphs_per_question=2", "rollout.latent_steps=1", "rollout.max_new_tokens=2", "run_test=false"]


def test_redacted_config_hides_keys_tokens_and_passwords_but_not_token_counts_or_flags():
    cfg = {"mode": {"api": {"api_key": "sk-1", "require_key": True, "max_tokens": 512}},
           "max_new_tokens": 48, "hf_token": "hf-1", "db": {"password": "pw"}, "empty": {"api_key": None}}
    assert redacted_config(cfg) == {"mode": {"api": {"api_key": "***", "require_key": True, "max_tokens": 512}},
                                    "max_new_tokens": 48, "hf_token": "***", "db": {"password": "***"},
                                    "empty": {"api_key": None}}


def test_secret_overrides_finds_keys_on_the_command_line():
    argv = ["+mode.api.api_key=sk-1", "rollout.max_new_tokens=4", "++logger.token=t", "hydra.run.dir=x", "-m", "mode.api.require_key=false"]
    assert secret_overrides(argv) == ["mode.api.api_key", "logger.token"]


def test_env_secrets_are_the_values_of_key_like_variables():
    environ = {"OPENAI_API_KEY": "sk-abcdefgh", "HF_TOKEN": "hf_abcdefgh", "TOKENIZERS_PARALLELISM": "false",
               "SHORT_TOKEN": "1", "PATH": "/usr/bin"}
    assert sorted(env_secrets(environ)) == ["hf_abcdefgh", "sk-abcdefgh"]


def test_install_secret_filter_covers_root_handlers_and_loggers_with_their_own(monkeypatch):
    root_stream, own_stream = io.StringIO(), io.StringIO()
    root_handler, own_handler = logging.StreamHandler(root_stream), logging.StreamHandler(own_stream)
    own = logging.getLogger("gcache-test.own-handler")
    monkeypatch.setattr(own, "propagate", False)
    logging.getLogger().addHandler(root_handler)
    own.addHandler(own_handler)
    try:
        secret_filter = install_secret_filter([PLANTED])
        logging.getLogger("gcache-test.elsewhere").warning("key=%s", PLANTED)
        own.warning("key=%s", PLANTED)
    finally:
        logging.getLogger().removeHandler(root_handler)
        own.removeHandler(own_handler)
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                handler.removeFilter(secret_filter)
    assert root_stream.getvalue() == "key=***\n" and own_stream.getvalue() == "key=***\n"


def test_load_dotenv_sets_missing_variables_only(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("# comment\nexport GCACHE_TEST_A='from-file'\nGCACHE_TEST_B=\"from-file\"\nnonsense\n")
    monkeypatch.setenv("GCACHE_TEST_B", "from-env")
    monkeypatch.delenv("GCACHE_TEST_A", raising=False)
    assert load_dotenv(tmp_path / ".env") == ["GCACHE_TEST_A"]
    assert os.environ["GCACHE_TEST_A"] == "from-file" and os.environ["GCACHE_TEST_B"] == "from-env"
    monkeypatch.delenv("GCACHE_TEST_A")


def test_a_key_on_the_command_line_is_refused_before_hydra_writes_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gcache.train", *TINY, f"+mode.api.api_key={PLANTED}", f"hydra.run.dir={tmp_path / 'run'}"],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: mode.api.api_key: API keys are read from OPENAI_API_KEY" in result.stderr
    assert PLANTED not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


# Runs gcache.train as `python -m` would, after making the run leak the key the way a careless
# library might: a log line from a third-party logger, one from Lightning's own logger (which
# has its own handler) and a warning.
LEAKY_TRAIN = """
import logging, os, runpy, warnings
import gcache.module as m
def leaky_train_start(self):
    key = os.environ["OPENAI_API_KEY"]
    logging.getLogger("some.library").warning("connecting with api_key=%s", key)
    logging.getLogger("lightning.pytorch").warning("lightning saw %s", key)
    warnings.warn(f"deprecated: pass {key} another way")
m.GCacheModule.on_train_start = leaky_train_start
runpy.run_module("gcache.train", run_name="__main__", alter_sys=True)
"""


def test_a_planted_key_from_dotenv_never_reaches_the_run_directory_or_the_console(tmp_path):
    workdir = tmp_path / "work"  # the command runs here and reads .env from here
    workdir.mkdir()
    (workdir / ".env").write_text(f"OPENAI_API_KEY={PLANTED}\n")
    (workdir / "leaky_train.py").write_text(LEAKY_TRAIN)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",)}
    with FaultServer(model="fake-model", api_key=PLANTED) as server:
        env.update(OPENAI_BASE_URL=server.base_url, OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline")
        result = subprocess.run(
            [sys.executable, "leaky_train.py", *TINY, "mode=hybrid", "mode.api.model=fake-model", "logger=wandb",
             f"hydra.run.dir={run_dir}"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
        )
        authorised = [r for r in server.chat_requests() if r.headers.get("authorization") == f"Bearer {PLANTED}"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert authorised, "the key from .env was not used"  # so the test is not vacuous

    assert PLANTED not in result.stdout + result.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.match(".hydra/config.yaml") for p in files) and any("wandb" in p.parts for p in files)
    leaked = [str(p.relative_to(run_dir)) for p in files if PLANTED.encode() in p.read_bytes()]
    assert leaked == []
    train_log = (run_dir / "train.log").read_text()
    assert "connecting with api_key=***" in train_log and "deprecated: pass *** another way" in train_log
    assert "lightning saw ***" in result.stderr


"""Crash safety, resume, signals, bad input and non-finite steps of the training application."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache.build import CONF_DIR, ConfigError, build_module, build_task
from gcache.datamodule import ShardSampler, TaskDataModule
from gcache.llm.api import ApiError
from gcache.train import run

# Six one-question steps, a checkpoint after each. Policy dropout draws from the global torch
# RNG, so a resume that did not restore it would train differently.
RESUMABLE = [
    "model=tiny-random", "logger=csv", "task=gsm8k", "limit_train=6", "batch_size=1", "policy.graphs_per_question=2",
    "rollout.latent_steps=1", "rollout.max_new_tokens=2", "limit_val=1", "limit_test=1", "run_test=false", "ckpt_every_n_steps=1",
    "policy.net.dropout=0.2", "seed=7",
]
TINY = ["model=tiny-random", "logger=csv", "task=gsm8k", "limit_train=2", "limit_val=1", "limit_test=1",
        "batch_size=2", "policy.graphs_per_question=2", "rollout.latent_steps=1", "rollout.max_new_tokens=2", "run_test=false"]

# Runs gcache.train as `python -m` would, with every training step 0.5 s slower (and a marker
# file touched when a step starts), so a test can signal it mid-run. Results are unchanged.
SLOW_TRAIN = """
import os, runpy, time
from pathlib import Path
import gcache.module as m
step = m.GCacheModule.training_step
def slow_step(self, batch, batch_idx):
    Path(os.environ["STEP_MARKER"]).write_text(str(self.global_step))
    time.sleep(0.5)
    return step(self, batch, batch_idx)
m.GCacheModule.training_step = slow_step
runpy.run_module("gcache.train", run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcache.train", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _start_slow(tmp_path: Path, out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    marker = tmp_path / f"{out.name}.step"
    env = {**_env(), "STEP_MARKER": str(marker)}
    with open(tmp_path / f"{out.name}.stdout", "w") as stdout, open(tmp_path / f"{out.name}.stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), *args, f"hydra.run.dir={out}"], env=env,
                                stdout=stdout, stderr=stderr)
    return proc, marker


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- crash safety and resume -----------------------------------------------------------------
def test_a_killed_run_resumed_ends_with_the_same_steps_parameters_and_optimiser_state(tmp_path):
    reference = _cli(*RESUMABLE, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc, _ = _start_slow(tmp_path, run_dir, *RESUMABLE)
    try:
        _wait_for(run_dir / "checkpoints" / "step2.ckpt", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "step6.ckpt").exists()  # really killed mid-run
    # 1 when the kill fell between writing step2.ckpt and last.ckpt.
    interrupted_at = _load(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= interrupted_at < 6

    resumed = _cli(*RESUMABLE, "resume=true", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr and f"after {interrupted_at} batches" in resumed.stderr

    want, got = _load(tmp_path / "reference" / "checkpoints" / "last.ckpt"), _load(run_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == want["global_step"] == 6
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name
    want_opt, got_opt = want["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert got_opt.keys() == want_opt.keys()
    for index, state in want_opt.items():
        for key, value in state.items():
            assert torch.equal(got_opt[index][key], value), (index, key)


KILL_MID_WRITE = """
import os, signal, sys, torch
from gcache.checkpoints import AtomicCheckpointIO
path = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.arange(100_000)}, path)
def torn_save(obj, f):  # half the bytes reach the disk, then the process dies
    import io as _io
    buffer = _io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
real_save, torch.save = torch.save, torn_save
io.save_checkpoint({"step": 2, "w": torch.arange(200_000)}, path)
"""


def test_a_kill_in_the_middle_of_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _load(path)["step"] == 1
    assert (tmp_path / "checkpoints" / "last.ckpt.partial").exists()  # the torn write, never renamed
    # The next save replaces both.
    from gcache.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert _load(path)["step"] == 3 and not (tmp_path / "checkpoints" / "last.ckpt.partial").exists()


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "interrupted"
    args = [*RESUMABLE, "ckpt_every_n_steps=100"]  # no periodic checkpoint before the interrupt
    proc, marker = _start_slow(tmp_path, run_dir, *args)
    try:
        _wait_for(marker, proc)  # inside the first step
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "interrupted.stderr").read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "stopped by SIGINT at step 1" in stderr and f"resume=true hydra.run.dir={run_dir}" in stderr
    checkpoint = _load(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 1 and checkpoint["TaskDataModule"] == {"epoch": 0, "batches_done": 1}


def test_shard_sampler_order_is_fixed_by_seed_and_epoch_shards_partition_it_and_skip_once_resumes():
    data = list(range(10))
    epoch1 = _at(ShardSampler(data, seed=3), 1)
    assert sorted(epoch1) == data
    assert _at(ShardSampler(data, seed=3), 1) == epoch1  # a function of (seed, epoch) only
    assert _at(ShardSampler(data, seed=3), 2) != epoch1
    shards = [_at(ShardSampler(data, num_replicas=2, rank=rank, seed=3), 1) for rank in (0, 1)]
    assert shards[0] + shards[1] != data and sorted(shards[0] + shards[1]) == data
    sampler = ShardSampler(data, seed=3)
    sampler.skip_once(1, 4)
    assert _at(sampler, 1) == epoch1[4:]
    assert _at(sampler, 1) == epoch1  # once only
    sampler.skip_once(0, 4)  # a checkpoint from an earlier epoch skips nothing in this one
    assert _at(sampler, 1) == epoch1


def _at(sampler: ShardSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


# ---- bad input -------------------------------------------------------------------------------
def _compose(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def no_model_load(monkeypatch):
    """Every bad-input error must come before the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("gcache.build.LocalLM.load", refuse)


def _jsonl_dir(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path / "data"


GOOD_LINE = '{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}'


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.latent_steps=-1"], "rollout.latent_steps must be an integer >= 0, got -1"),
    (["rollout.latent_steps=abc"], "rollout.latent_steps must be an integer >= 0, got 'abc'"),
    (["agents.num_agents=0"], "agents.num_agents must be an integer >= 1 or null, got 0"),
    (["policy.graphs_per_question=0"], "policy.graphs_per_question must be an integer >= 1, got 0"),
    (["limit_train=0"], "limit_train must be an integer >= 1 or null, got 0"),
    (["rollout.retention=none"], "rollout.retention='none' is not one of ['full', 'role_latent', 'latent_only']"),
    (["model.name=/no/such/model"], "model.name='/no/such/model': that model directory does not exist"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt' does not exist"),
    (["trainer.accelerator=gpu"], "torch sees no CUDA GPU; use trainer=cpu"),
    (["+mode.api.api_key=sk-nope"], "mode.api.api_key: API keys are read from OPENAI_API_KEY"),
    (["task.data_dir=/no/such/dir", "task.source=local"],
     "task 'gsm8k': /no/such/dir/gsm8k/test.jsonl does not exist; pass data_dir=... or set GCACHE_DATA_DIR"),
    (["task.question_ids=[99999]"], "task 'gsm8k': question id 99999 not found"),
    (["task.val_size=0"], "task 'gsm8k': split 'val' is empty"),
])
def test_bad_config_values_are_reported_before_the_model_loads(tmp_path, no_model_load, overrides, message):
    if torch.cuda.is_available() and "trainer.accelerator=gpu" in overrides:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as error:
        run(_compose([*TINY, *overrides], tmp_path))
    assert message in str(error.value)


def test_a_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path, no_model_load):
    data = _jsonl_dir(tmp_path, [GOOD_LINE, GOOD_LINE, '{"question": "broken', GOOD_LINE])
    with pytest.raises(ConfigError, match=r"gsm8k/test\.jsonl: line 3 is not valid JSON"):
        run(_compose([*TINY, f"task.data_dir={data}"], tmp_path))


def test_an_empty_data_file_is_reported_as_an_empty_split(tmp_path, no_model_load):
    data = _jsonl_dir(tmp_path, [])
    with pytest.raises(ConfigError, match="split 'test' is empty"):
        run(_compose([*TINY, f"task.data_dir={data}"], tmp_path))


def test_an_api_mode_without_an_endpoint_fails_before_the_model_loads(tmp_path, no_model_load, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ApiError, match="set mode.api.base_url or OPENAI_BASE_URL"):
        run(_compose([*TINY, "mode=hybrid", "mode.api.model=any", "logger=wandb"], tmp_path))
    assert not (tmp_path / "wandb").exists()  # no W&B run is started for a run that never began


@pytest.mark.parametrize(("args", "exit_code", "message"), [
    (["rollout.latent_steps=-1"], 2, "error: rollout.latent_steps must be an integer >= 0, got -1"),
    (["task.data_dir=/no/such/dir", "task.source=local"], 2, "error: task 'gsm8k': /no/such/dir/gsm8k/test.jsonl does not exist"),
    (["mode=hybrid"], 2, "error: no endpoint: set mode.api.base_url or OPENAI_BASE_URL"),
    (["latent_steps=3", "judger_edges=all"], 2,
     "error: latent_steps is now rollout.latent_steps, judger_edges is now policy.judger_edges"),
])
def test_the_cli_prints_one_error_line_and_exits_non_zero_without_a_traceback(tmp_path, args, exit_code, message):
    env = {k: v for k, v in _env().items() if k != "OPENAI_BASE_URL"}
    result = subprocess.run([sys.executable, "-m", "gcache.train", *TINY, *args, f"hydra.run.dir={tmp_path}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_group_option_lists_the_available_ones_on_the_cli(tmp_path):
    result = _cli("topology=ring", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Could not find 'topology/ring'" in result.stderr
    assert "Available options in 'topology'" in result.stderr and "chain" in result.stderr


# ---- non-finite rewards and losses -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = _compose(TINY, tmp_path_factory.mktemp("tiny"))
    task = build_task(cfg)
    return cfg, task, build_module(cfg, task=task)


def _fit_one_step(module, task) -> L.Trainer:
    datamodule = TaskDataModule(task, batch_size=2, limit_train=2, limit_val=1, limit_test=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_a_nan_reward_skips_the_step_and_names_the_question(tiny, monkeypatch, caplog):
    cfg, task, module = tiny
    first, second = task.splits()["train"][:2]
    monkeypatch.setattr(task, "reward", lambda completions, examples: [
        math.nan if ex.id == first.id else 0.0 for ex in examples])
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="gcache.module"):
        trainer = _fit_one_step(module, task)
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed in a skipped step"
    assert not trainer.optimizers[0].state  # Adam did not step (zero gradients would still count)
    warning = "\n".join(r.getMessage() for r in caplog.records if "non-finite reward" in r.getMessage())
    assert first.id in warning and second.id not in warning and "step skipped" in warning


def test_a_non_finite_loss_skips_the_step_and_names_the_questions(tiny, monkeypatch, caplog):
    cfg, task, module = tiny
    monkeypatch.setattr(module, "fuser_loss", lambda *args: torch.tensor(math.inf))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="gcache.module"):
        trainer = _fit_one_step(module, task)
    for name, param in module.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed in a skipped step"
    assert not trainer.optimizers[0].state  # Adam did not step (zero gradients would still count)
    warning = "\n".join(r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage())
    assert all(ex.id in warning for ex in task.splits()["train"][:2]) and "step skipped" in warning


def test_resuming_or_evaluating_with_another_config_names_the_keys_that_differ(tmp_path):
    from gcache.evaluate import CONF_DIR as EVAL_CONF_DIR
    from gcache.evaluate import evaluate

    run(_compose([*TINY, "topology=full"], tmp_path))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"topology: checkpoint 'full', now 'star'"):
        run(_compose([*TINY, "topology=star", f"ckpt_path={ckpt}"], tmp_path / "again"))
    overrides = ["model=tiny-random", "task=gsm8k", "topology=full", "agents.roster=uniform", "limit_test=1",
                 f"ckpt_path={ckpt}", "methods=[gcache]"]
    with initialize_config_dir(config_dir=EVAL_CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    with pytest.raises(ConfigError, match=r"roster: checkpoint 'math', now 'uniform'"):
        evaluate(cfg, overrides=overrides)  # the command line chose another roster than the run's

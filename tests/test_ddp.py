"""DDP on CPU (gloo, 2 processes) trains like one process on the same global batches.

Two steps: in the first, one question on rank 1 gets a NaN reward, so both ranks must skip
the update (a rank that stepped alone would desynchronise, one that returned no loss would
make Lightning raise); the second is a normal step whose update is compared.

Why the comparison can be exact: each question's graphs are sampled from a stream seeded by
(seed, question id, step), so a question samples the same graphs on whichever rank it lands;
decoding is greedy; and every loss term is a mean over the rank's questions, so DDP's average
of two equal shards' gradients is the gradient of the global batch. The reward below varies
with the decoded text (the tiny random model never answers right), so the REINFORCE term
contributes too.

What is compared: the gradient (Adam's first moment after one step is (1 - beta1) * grad),
and the updated parameters wherever the gradient is above float noise. Adam's first step
moves a parameter by lr * g / (|g| + eps), about lr * sign(g): it would hide a gradient off by
a constant factor, and where the true gradient is zero (a quarter of the elements here, e.g.
the last MLP bias) it turns summation-order noise of 1e-7 into a step of +-lr in either run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gcache.datamodule import ShardSampler
from gcache.tasks.arith import Arith

TESTS = Path(__file__).resolve().parent
TWO_STEPS = [
    "model=tiny-random", "logger=csv", "task=arith", "task._target_=test_ddp.TextLengthArith", "topology=full",
    "batch_size=2", "validate_at_start=false", "val_every_n_steps=null", "limit_train=4", "limit_val=1",
    "limit_test=1", "run_test=false", "policy.graphs_per_question=3", "rollout.latent_steps=1", "rollout.max_new_tokens=6", "seed=5",
]


class TextLengthArith(Arith):
    """Arith whose reward is the parity of the reply's length (it varies between graphs), and
    NaN for the question named by $NAN_QUESTION."""

    def reward(self, completions, examples):
        nan_id = os.environ["NAN_QUESTION"]
        return [math.nan if ex.id == nan_id else float(len(c) % 2) for c, ex in zip(completions, examples, strict=True)]


def _train(out: Path, nan_question: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "NAN_QUESTION": nan_question,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port on 127.0.0.1
    env["MASTER_ADDR"] = "127.0.0.1"
    cmd = [sys.executable, "-m", "gcache.train", *TWO_STEPS, *overrides, f"hydra.run.dir={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _gradients(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Each parameter's gradient in Adam's first step, from its first moment."""
    (optimizer,) = checkpoint["optimizer_states"]
    names = list(checkpoint["state_dict"])  # policy.* then fuser.*: the order of the param groups
    grads = {}
    for group in optimizer["param_groups"]:
        beta1 = group["betas"][0]
        for index in group["params"]:
            grads[names[index]] = optimizer["state"][index]["exp_avg"] / (1 - beta1)
            assert grads[names[index]].shape == checkpoint["state_dict"][names[index]].shape, names[index]
    return grads


def test_two_ddp_processes_skip_and_take_the_same_steps_as_one_process_on_the_global_batches(tmp_path):
    train = Arith(seed=0).splits()["train"][:4]  # the data split is task.seed's (0), whatever `seed`
    rank1 = ShardSampler(train, num_replicas=2, rank=1, seed=5)
    rank1.set_epoch(0)
    nan_question = train[next(iter(rank1))].id  # rank 1's question in the first step

    _train(tmp_path / "single", nan_question, "batch_size=2")
    _train(tmp_path / "ddp", nan_question, "trainer=ddp", "trainer.devices=2", "batch_size=1")

    single = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert single["global_step"] == ddp["global_step"] == 2
    for checkpoint in (single, ddp):  # the first step was skipped: Adam stepped once
        assert {int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {1}
    rank0_log = (tmp_path / "ddp" / "train.log").read_text()
    rank1_log = (tmp_path / "ddp" / "train_ddp_process_1.log").read_text()  # rank 1 really ran
    assert f"non-finite reward for question(s) ['{nan_question}'] at step 0" in rank1_log
    assert "step 0 skipped: another rank had a non-finite reward or loss" in rank0_log
    grads_single, grads_ddp = _gradients(single), _gradients(ddp)
    assert grads_single.keys() == grads_ddp.keys() == single["state_dict"].keys() == ddp["state_dict"].keys()
    compared = total = 0
    for name, grad in grads_single.items():
        torch.testing.assert_close(grads_ddp[name], grad, atol=1e-6, rtol=1e-4, msg=name)
        above_noise = grad.abs() > 1e-5
        torch.testing.assert_close(ddp["state_dict"][name][above_noise], single["state_dict"][name][above_noise],
                                   atol=1e-5, rtol=0, msg=name)
        compared, total = compared + int(above_noise.sum()), total + grad.numel()
    assert compared > total / 2

    # The comparison is meaningful only if REINFORCE had a signal in this step.
    rows = list(csv.DictReader((tmp_path / "single" / "csv" / "version_0" / "metrics.csv").open()))
    advantage = [float(r["train/advantage_abs_mean"]) for r in rows if r.get("train/advantage_abs_mean")]
    assert advantage and advantage[0] > 0


# gcache.train as `python -m` runs it, with 0.3 s more per training step on rank 0 (Lightning
# starts rank 1 with plain `python -m gcache.train`; the gradient all-reduce paces it).
SLOW_TRAIN = """
import runpy, time
import gcache.module as m
step = m.GCacheModule.training_step
def slow_step(self, batch, batch_idx):
    time.sleep(0.3)
    return step(self, batch, batch_idx)
m.GCacheModule.training_step = slow_step
runpy.run_module("gcache.train", run_name="__main__", alter_sys=True)
"""


def test_sigterm_to_every_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """As Slurm does on preemption. Lightning 2.6's own SIGTERM handler broadcasts from inside
    the handler, wherever each rank is, and this hangs."""
    script, out = tmp_path / "slow_train.py", tmp_path / "run"
    script.write_text(SLOW_TRAIN)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "NAN_QUESTION": "none", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    args = [*TWO_STEPS, "limit_train=40", "batch_size=1", "ckpt_every_n_steps=2", "trainer=ddp", f"hydra.run.dir={out}"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)  # its own group: rank 1 included
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step2.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)  # a hang fails here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= step < 20
    assert stderr.count(f"stopped by SIGTERM at step {step}") == 2  # both ranks, the same step
    deadline = time.monotonic() + 30
    with pytest.raises(ProcessLookupError):  # rank 1 exits too
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


def test_ddp_with_a_test_split_compares_on_every_ranks_test_questions(tmp_path):
    # Each rank tests its shard and runs the comparison's methods on it; the comparison needs all of them (rank 0 alone raised KeyError), and a
    # rank's epoch has half the batches (val_every_n_steps above it raised Lightning's ValueError).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MASTER_ADDR": "127.0.0.1"}
    env.pop("MASTER_PORT", None)
    out = tmp_path / "run"
    # on the GPU's static token loops, less the capture (tests/test_gpu_path.py): one pool per rank
    cmd = [sys.executable, "-m", "gcache.train", "trainer=ddp", "experiment=smoke", "limit_train=8",
           "val_every_n_steps=2", "limit_test=4", "rollout.cuda_graphs=static", f"hydra.run.dir={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    comparison = summary["comparison"]
    assert comparison["questions"] == 4
    assert set(comparison["methods"]) == {"gcache", "single", "fixed-full", "oracle"}
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and len({p["id"] for p in predictions}) == 4
    # each rank ran the baselines on its own test batches: gathered, every method has every question once
    records = [json.loads(line) for line in (out / "comparison.jsonl").read_text().splitlines()]
    for method in comparison["methods"]:
        assert [r["id"] for r in records if r["method"] == method] == [p["id"] for p in predictions], method
    assert "trained policy vs baselines" in result.stderr

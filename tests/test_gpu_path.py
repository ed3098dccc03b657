"""The GPU's code path, run end to end on CPU.

On a CUDA model (`rollout.cuda_graphs=auto`) decoding and latent steps run in the static workspaces of
a `LoopPool`, captured as CUDA graphs. `rollout.cuda_graphs=static` runs exactly that code on any
device, less the `torch.cuda.graph` capture and `replay` calls. These tests run it through whole
commands as users do: a training run (validate -> fit -> test -> comparison) and the evaluation of
its checkpoint, against the eager loops token for token; a Qwen3 run on the real Qwen3 tokenizer and
chat template in bfloat16. The two-seed study (tests/test_study.py) and the DDP run with a test split
(tests/test_ddp.py) run on the static loops too. Lightning validates and tests under
`torch.inference_mode()`: a workspace allocated there and written by the next training step crashed
every default GPU run at its first step, and nothing on CPU ran that path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gcache.report import read_results

REPO = Path(__file__).resolve().parents[1]


def _gcache(command: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", f"gcache.{command}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> Path:
    """`gcache.train experiment=smoke` on eager and on static loops."""
    out = tmp_path_factory.mktemp("smoke")
    for loops in ("off", "static"):
        result = _gcache("train", "experiment=smoke", f"rollout.cuda_graphs={loops}", f"hydra.run.dir={out / loops}")
        assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_a_training_run_on_the_static_loops_runs_to_the_end_and_answers_as_the_eager_run(smoke_runs):
    eager, static = smoke_runs / "off", smoke_runs / "static"
    summary = json.loads((static / "summary.json").read_text())
    # validate (step 0) -> two training steps -> validate -> test -> comparison
    assert summary["steps"] == 2 and summary["test_accuracy"] is not None
    assert [h["step"] for h in _lines(static / "history.jsonl")] == [0, 2]
    assert set(summary["comparison"]["methods"]) == {"gcache", "single", "fixed-full", "oracle"}
    # Token for token: the validations' completions, the test predictions and every baseline's answers.
    for name in ("test_predictions.jsonl", "comparison.jsonl", "completions/step000000.jsonl", "completions/step000002.jsonl"):
        ours, theirs = _lines(static / name), _lines(eager / name)
        assert [r["answer"] for r in ours] == [r["answer"] for r in theirs], name
    comparison = _lines(static / "comparison.jsonl")
    assert any(r["judger_senders"] for r in comparison)  # agents ran: their latent steps on the static loops too
    assert len({r["answer"] for r in comparison}) > 1


def test_its_checkpoint_evaluates_on_the_static_loops_to_the_runs_own_test_predictions(smoke_runs, tmp_path):
    run = smoke_runs / "static"
    checkpoint = json.loads((run / "summary.json").read_text())["checkpoint"]
    methods = "[gcache,single,fixed-full,oracle,mismatched,zeroed,shuffled,latent_mas,text_mas,realign-random]"
    result = _gcache("evaluate", "model=tiny-random", f"ckpt_path={checkpoint}", f"methods={methods}", "limit=2",
                     "rollout.latent_steps=2", "rollout.max_new_tokens=4", "rollout.agent_max_new_tokens=4",
                     "rollout.cuda_graphs=static", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_results(tmp_path / "results.jsonl")
    assert {r["method"] for r in records} == set(methods.strip("[]").split(","))
    trained = _lines(run / "test_predictions.jsonl")
    mine = {r["id"]: r["answer"] for r in records if r["method"] == "gcache"}
    assert [mine[t["id"]] for t in trained] == [t["answer"] for t in trained]
    baselines = {(r["id"], r["method"]): r["answer"] for r in records}
    for row in _lines(run / "comparison.jsonl"):
        assert baselines[row["id"], row["method"]] == row["answer"]


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tiny_qwen3, tmp_path_factory) -> Path:
    """The tiny random Qwen3 with the real Qwen3 tokenizer (conftest) as a model directory."""
    out = tmp_path_factory.mktemp("qwen3")
    model, tokenizer = tiny_qwen3
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_the_qwen3_experiment_runs_to_the_end_on_the_static_loops_in_bfloat16(tiny_qwen3_dir, tmp_path):
    # experiment=gsm8k_qwen3 as a GPU user runs it (its latent steps, retention, roster and thinking
    # off), less its size: a few questions, steps and tokens, on CPU.
    result = _gcache("train", "experiment=gsm8k_qwen3", "trainer=cpu", f"model.name={tiny_qwen3_dir}",
                     "model.dtype=bfloat16", "rollout.cuda_graphs=static", "logger=csv", "limit_train=2",
                     "limit_val=1", "limit_test=2", "batch_size=2", "policy.graphs_per_question=2",
                     "rollout.max_new_tokens=6", "compare=[single,fixed-full]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["test_accuracy"] is not None
    assert set(summary["comparison"]["methods"]) == {"gcache", "single", "fixed-full"}
    assert len(_lines(tmp_path / "comparison.jsonl")) == 2 * 2

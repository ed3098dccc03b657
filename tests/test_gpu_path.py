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
    # One pool for the run: validation, training, test and comparison chunks reuse its workspaces (keyed
    # by rows and slots buckets), none allocated twice; no capture on CPU. Eager runs keep none.
    loops = summary["token_loops"]["static"]
    assert loops["allocated"] == loops["workspaces"] == len(loops["shapes"]) and loops["loops"] > loops["workspaces"]
    assert loops["captures"] == loops["eager_fallbacks"] == 0 and 0 < loops["MiB"] < 64
    assert json.loads((eager / "summary.json").read_text())["token_loops"] == {}
    comparison = _lines(static / "comparison.jsonl")
    assert any(r["judger_senders"] for r in comparison)  # agents ran: their latent steps on the static loops too
    assert len({r["answer"] for r in comparison}) > 1


def test_its_checkpoint_evaluates_on_the_static_loops_to_the_runs_own_test_predictions(smoke_runs, tmp_path):
    run = smoke_runs / "static"
    checkpoint = json.loads((run / "summary.json").read_text())["checkpoint"]
    methods = "[gcache,single,fixed-full,oracle,mismatched,zeroed,shuffled,latent_mas,text_mas,realign-random]"
    result = _gcache("evaluate", "model=tiny-random", f"ckpt_path={checkpoint}", f"methods={methods}", "limit_test=2",
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
                     "rollout.max_new_tokens=6", "methods=[single,fixed-full]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["test_accuracy"] is not None
    assert set(summary["comparison"]["methods"]) == {"gcache", "single", "fixed-full"}
    assert len(_lines(tmp_path / "comparison.jsonl")) == 3 * 2  # gcache's test predictions, then each baseline's


# ---- host-device traffic of one rollout row on the GPU's path -------------------------------------

# Every place in gcache's own code that reads a tensor on the host or copies one to a device, while a
# row runs on the static loops, and why. On CPU nothing tells a host tensor from a device tensor, so
# each site says which it is on a GPU; a new site fails the test until it is listed here.
TRAFFIC = {  # a copy between host and GPU
    ("nonzero", "kv.py:decode"): "every check_every (8) tokens: have all rows ended? (the loop's only read)",
    ("__int__", "kv.py:decode"): "once after the loop: the longest row, to cut trailing padding",
    ("cpu", "rollout.py:_decode"): "the answers' token ids and counts, one copy per decoded batch",
    ("to", "rollout.py:_prefill_prompts"): "prompt ids and mask, one copy per prefilled batch (each agent level, the judger)",
    ("cpu", "rollout.py:run"): "the graphs to the host planner (in training they are on the policy's device)",
}
NO_TRAFFIC = {  # a host tensor, or a tensor already on the device
    ("as_tensor", "kv.py:decode"): "the EOS ids: LocalLM.eos_tensor, made on the device once",
    ("to", "kv.py:forward"): "the new positions' mask, on the cache's device already",
    ("cpu", "llm/local.py:decode_ids"): "host tensors (rollout._decode copied them)",
    ("tolist", "llm/local.py:decode_ids"): "host tensors",
    ("tolist", "rollout.py:_decode"): "host counts",
    ("tolist", "rollout.py:_prefill_prompts"): "the tokenizer's host ids and mask: prompt lengths and prefixes",
    ("__int__", "rollout.py:_prefill_prompts"): "the host mask: tokens prefilled",
    ("tolist", "rollout.py:_direct_senders"): "a host graph",
    ("cpu", "policy/sampling.py:topological_waves"): "a host graph",
    ("tolist", "policy/sampling.py:topological_waves"): "a host graph",
    ("cpu", "rollout.py:plan_rollouts"): "a host graph",
    ("__bool__", "rollout.py:plan_rollouts"): "a host graph",
    ("__setitem__", "rollout.py:plan_rollouts"): "a host graph",
    ("tolist", "rollout.py:plan_rollouts"): "a host graph",
}
SOURCE = f"{os.sep}src{os.sep}gcache{os.sep}"


class _Traffic:
    """Counts, per (operation, gcache file:function that called it), tensor -> host reads, uploads
    (`torch.tensor/as_tensor(device=...)`, `Tensor.to(device)`) and indexing with a list, while active."""

    READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "cpu")

    def __init__(self, monkeypatch):
        import collections
        import traceback

        self.counts: collections.Counter = collections.Counter()
        self.active = False

        def counting(owner, name, applies):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                if self.active and applies(*args, **kwargs):
                    caller = traceback.extract_stack(limit=2)[0]
                    if SOURCE in caller.filename:
                        where = caller.filename.split(SOURCE)[1].replace(os.sep, "/")
                        self.counts[name, f"{where}:{caller.name}"] += 1
                return original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

        import torch

        for name in self.READS:
            counting(torch.Tensor, name, lambda *a, **k: True)
        to_device = (str, torch.device, torch.Tensor)
        counting(torch.Tensor, "to", lambda _, *a, **k: "device" in k or bool(a) and isinstance(a[0], to_device))
        for name in ("tensor", "as_tensor"):
            counting(torch, name, lambda *a, **k: "device" in k)

        def list_index(_, index, *rest):
            return any(isinstance(i, list) for i in (index if isinstance(index, tuple) else (index,)))

        counting(torch.Tensor, "__getitem__", list_index)
        counting(torch.Tensor, "__setitem__", list_index)

    def run(self, engine, questions, adjacency):
        self.counts.clear()
        self.active = True
        try:
            engine.run(questions, adjacency, list(range(len(questions))), answer_format="Answer.")
        finally:
            self.active = False
        return dict(self.counts)


def test_host_device_traffic_of_a_row_is_a_fixed_list_of_sites_and_at_most_ten(monkeypatch):
    import torch

    from gcache.agents import build_roster
    from gcache.llm.local import LocalLM
    from gcache.rollout import RolloutConfig, RolloutEngine

    llm, roster = LocalLM.tiny_random(seed=0), build_roster("math")
    n = roster.num_agents
    graph = torch.zeros(1, n + 1, n + 1, dtype=torch.bool)
    graph[0, 0, 1] = graph[0, 1, n] = graph[0, 2, n] = True  # two agent levels, two senders to the judger
    traffic = _Traffic(monkeypatch)
    counts = {}
    for steps, tokens, rows in ((2, 8, 1), (8, 32, 1), (8, 32, 4)):
        engine = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs="static", latent_steps=steps,
                                                          max_new_tokens=tokens))
        questions = [f"What is {q} + 3?" for q in range(rows)]
        engine.run(questions, graph.expand(rows, -1, -1), list(range(rows)), answer_format="Answer.")  # warm
        counts[steps, tokens, rows] = traffic.run(engine, questions, graph.expand(rows, -1, -1))
    for key, sites in counts.items():
        unlisted = set(sites) - set(TRAFFIC) - set(NO_TRAFFIC)
        assert not unlisted, f"{key}: sites not listed in TRAFFIC or NO_TRAFFIC: {unlisted}"
    moved = {key: {site: c for site, c in sites.items() if site in TRAFFIC} for key, sites in counts.items()}
    eos_check = ("nonzero", "kv.py:decode")
    # Neither latent steps nor tokens add traffic, except the EOS check once per 8 tokens; a batch of 4
    # rows moves what one row moves.
    assert moved[8, 32, 1].pop(eos_check) == 3 and eos_check not in moved[2, 8, 1]  # at 8, 16, 24 of 32
    assert moved[8, 32, 4].pop(eos_check) == 3
    assert moved[2, 8, 1] == moved[8, 32, 1] == moved[8, 32, 4]
    assert moved[2, 8, 1][("to", "rollout.py:_prefill_prompts")] == 3  # agent level 0, level 1, the judger
    assert sum(moved[8, 32, 1].values()) + 3 <= 10  # the benchmark's row: 8 latent steps, 32 tokens

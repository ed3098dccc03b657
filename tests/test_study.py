"""gcache.study end to end on a tiny random model: a Hydra sweep over seeds, per-seed training and
evaluation, aggregation into study.json / study.md / pictures, and a resumable rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = {"gcache", "single", "fixed-full", "oracle", "mismatched", "zeroed"}
ABLATION = {"gcache-policy-only", "gcache-fuser-only", "gcache-fuser-other-question", "fixed-debate"}
TINY = ["model=tiny-random", "logger=csv", "task=lookup", "limit_train=4", "limit_val=2", "limit_test=3",
        "batch_size=2", "eval_batch_size=3", "policy.graphs_per_question=2", "rollout.latent_steps=1", "rollout.max_new_tokens=3",
        "val_every_n_steps=1", "methods=[gcache,single,fixed-full,oracle,mismatched,zeroed]",
        # the GPU's static token loops without the capture (tests/test_gpu_path.py): a study runs them too
        "rollout.cuda_graphs=static"]


def _study(out: Path, *extra: str, base: tuple[str, ...] = (*TINY, "seed=0,1")) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "gcache.study", *base, f"hydra.sweep.dir={out}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_study_trains_evaluates_and_aggregates_every_seed_and_resumes(tmp_path):
    result = _study(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for seed in (0, 1):
        seed_dir = tmp_path / f"seed{seed}"
        assert (seed_dir / "summary.json").is_file() and (seed_dir / "checkpoints" / "last.ckpt").is_file()
        records = [json.loads(x) for x in (seed_dir / "eval" / "results.jsonl").read_text().splitlines()]
        assert {r["method"] for r in records} == {*METHODS, *ABLATION}  # the ablation: a fuser was trained
        assert len(records) == 10 * 3
        history = [json.loads(x) for x in (seed_dir / "history.jsonl").read_text().splitlines()]
        # Step 0 (the untrained policy), then after each of the two steps.
        assert [h["step"] for h in history] == [0, 1, 2] and all("val/p_oracle" in h for h in history)
        # The study's gcache is the seed's own trained policy: its test predictions, question by question.
        trained = [json.loads(x) for x in (seed_dir / "test_predictions.jsonl").read_text().splitlines()]
        mine = {r["id"]: r["answer"] for r in records if r["method"] == "gcache"}
        assert [mine[t["id"]] for t in trained] == [t["answer"] for t in trained]
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["seeds"] == [0, 1] and study["reference"] == "gcache"
    assert set(study["methods"]) == {*METHODS, *ABLATION}
    # what each trained part adds: each pair a paired comparison on the same questions
    parts = {(row["with"], row["without"]): row for row in study["ablation"]}
    assert list(parts) == [("gcache", "gcache-policy-only"), ("gcache-fuser-only", "fixed-debate"),
                           ("gcache", "gcache-fuser-only"), ("gcache-policy-only", "fixed-debate"),
                           ("gcache-fuser-only", "gcache-fuser-other-question")]
    for (a, b), row in parts.items():
        assert row["pooled"]["pairs"] == 6  # 2 seeds x 3 questions
        accuracy = {m: sum(float(r["reward"]) for s in (0, 1) for r in map(json.loads, (
            tmp_path / f"seed{s}" / "eval" / "results.jsonl").read_text().splitlines()) if r["method"] == m) / 6
            for m in (a, b)}
        assert row["pooled"]["reference_accuracy"] == pytest.approx(accuracy[a])
        assert row["pooled"]["method_accuracy"] == pytest.approx(accuracy[b])
    oracle = study["methods"]["oracle"]
    assert len(oracle["per_seed"]) == 2
    assert "single" in study["comparisons"] and "pooled" in study["comparisons"]["single"]
    # Routing against the oracle graph: the oracle reads exactly the keeper each question needs,
    # fixed-full every keeper, single none; the learning of the graph per seed.
    routing = study["routing"]
    assert routing["oracle"]["exact"] == 1.0 and routing["oracle"]["distractors_per_question"] == 0.0
    assert routing["fixed-full"]["reads_needed"] == 1.0 and routing["fixed-full"]["distractors_per_question"] == 3.0
    assert routing["single"]["reads_needed"] == 0.0
    assert study["agents"] == ["Door Keeper", "Locker Keeper", "Train Keeper", "Room Keeper"]
    during = study["routing_during_training"]  # the validations of steps 0, 1, 2 of both seeds, 2 questions each
    assert list(during) == ["0", "1", "2"] and all(r["questions"] == 4 for r in during.values())
    for seed in ("0", "1"):
        assert 0.0 <= study["training"][seed]["last_p_oracle"] <= 1.0
        for key in ("first_step_p_oracle_above_0.9", "first_step_p_distractor_below_0.1"):
            assert key in study["training"][seed]
    text = (tmp_path / "study.md").read_text()
    assert "| oracle |" in text and "nan" not in text
    assert "## Routing" in text and "What gcache confused" in text and "Keeper" in text
    assert "## What each trained part adds" in text and "| the fuser alone, on every agent -> judger |" in text
    for picture in ("curves.png", "edges.png", "comparison.png"):
        assert (tmp_path / picture).is_file(), picture

    # A rerun trains nothing and evaluates nothing again, and aggregates the same numbers.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed*/summary.json")}
    results = {p: p.read_text() for p in tmp_path.glob("seed*/eval/results.jsonl")}
    again = _study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed*/summary.json")} == before
    assert {p: p.read_text() for p in tmp_path.glob("seed*/eval/results.jsonl")} == results
    assert json.loads((tmp_path / "study.json").read_text())["methods"] == study["methods"]


def test_study_refuses_a_reference_it_does_not_evaluate(tmp_path):
    result = _study(tmp_path, "study.reference=text_mas")
    assert result.returncode == 2
    assert "study.reference='text_mas' is not among methods" in result.stderr


def test_a_study_with_an_api_mode_evaluates_the_api_model_alone_and_keeps_each_seeds_api_totals(
        llama_server, tmp_path):
    base = (*[o for o in TINY if not o.startswith(("task=", "methods="))], "task=arith", "seed=0",
            "methods=[gcache,single]")
    result = _study(tmp_path, "mode=hybrid", f"mode.api.base_url={llama_server.base_url}",
                    f"mode.api.model={llama_server.model}", "mode.api.require_key=false", "mode.api.max_tokens=6",
                    "study.ablation=false", base=base)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HTTP Request" not in result.stderr
    summary = json.loads((tmp_path / "seed0" / "summary.json").read_text())
    # The seed's training run leaves the mode's baselines to the study's evaluation.
    assert summary["comparison"] is None and set(summary["api"]) == {"train", "val", "test", "total"}
    assert summary["api"]["train"]["requests"] == 8 and summary["api"]["total"]["cost_usd"] is None
    report = json.loads((tmp_path / "seed0" / "eval" / "report.json").read_text())["methods"]
    assert set(report) == {"gcache", "single", "api_single"}  # study.ablation=false: no ablation methods
    assert all(stats["api_completion_tokens_per_question"] > 0 for stats in report.values())
    study = json.loads((tmp_path / "study.json").read_text())
    assert "api_single" in study["methods"] and "api_single" in study["comparisons"]


def test_a_study_evaluates_the_checkpoint_its_training_run_tested(tmp_path):
    result = _study(tmp_path, "select_checkpoint=best", "methods=[gcache,single]", base=(*TINY, "seed=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    seed_dir = tmp_path / "seed0"
    summary = json.loads((seed_dir / "summary.json").read_text())
    assert Path(summary["checkpoint"]).name == "best-step1.ckpt"  # every validation scores 0: the first
    config = [json.loads(x)["config"] for x in (seed_dir / "eval" / "results.jsonl").read_text().splitlines()]
    assert {c["checkpoint"] for c in config if c["fuser"] == "trained"} == {summary["checkpoint"]}
    trained = [json.loads(x) for x in (seed_dir / "test_predictions.jsonl").read_text().splitlines()]
    mine = {json.loads(x)["id"]: json.loads(x)["answer"] for x in (seed_dir / "eval" / "results.jsonl").read_text()
            .splitlines() if json.loads(x)["method"] == "gcache"}
    assert [mine[t["id"]] for t in trained] == [t["answer"] for t in trained]

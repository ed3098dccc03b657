"""The training application: config composition, a real Lightning run, checkpoints, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache.build import CONF_DIR, build_datamodule, build_module, build_task
from gcache.tasks.arith import Arith
from gcache.train import run

TASKS = ["arith", "gsm8k", "gpqa", "medqa", "humaneval", "mbppplus"]
TOPOLOGIES = ["full", "chain", "star", "layered", "mesh", "random", "debate", "direct"]
MODES = ["local", "hybrid", "api_hint"]
TINY = [
    "model=tiny-random",
    "logger=csv",
    "limit_train=4",
    "limit_val=2",
    "limit_test=2",
    "batch_size=2",
    "policy.graphs_per_question=2",
    "rollout.latent_steps=2",
    "rollout.max_new_tokens=4",
]


def _compose(overrides: list[str], output_dir: Path | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir) if output_dir else "unused"
    return cfg


def test_config_composes_for_every_task_topology_and_mode():
    for task in TASKS:
        for topology in TOPOLOGIES:
            for mode in MODES:
                cfg = _compose([f"task={task}", f"topology={topology}", f"mode={mode}"])
                assert cfg.task.name == task and cfg.topology.name == topology and cfg.mode.name == mode


def test_unknown_group_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="topology"):
        _compose(["topology=ring"])


def test_train_runs_end_to_end_and_writes_summary_checkpoint_and_pictures(tmp_path):
    cfg = _compose([*TINY, "task=gsm8k"], tmp_path)
    summary = run(cfg)
    assert summary["steps"] == 2 and summary["test_accuracy"] is not None
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["steps"] == 2 and written["questions_seen"] == 4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "topology").glob("*.png"))
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for metric in ("train/reward", "train/policy_loss", "train/fuser_loss", "train/edge_prob",
                   "train/edges_per_graph", "train/decoded_tokens", "train/prompt_tokens", "train/cache_bytes",
                   "train/seconds_per_question", "train/gate/Math Solver", "train/gate/Inspector", "val/accuracy"):
        assert metric in header, metric


class AllButFirstArith(Arith):
    """Arith scored 1 on every question but the first of the validation and test splits (FIRSTS)."""

    def reward(self, completions, examples):
        return [0.0 if ex.id in FIRSTS else 1.0 for ex in examples]


FIRSTS: list[str] = []


def test_summary_accuracies_are_exact_fractions_of_their_counts(tmp_path):
    cfg = _compose([*TINY, "task=arith", "task._target_=test_train.AllButFirstArith", "limit_val=3",
                    "limit_test=3", "methods=[]"], tmp_path)
    splits = build_datamodule(cfg, build_task(cfg))
    FIRSTS[:] = [splits.split("val")[0].id, splits.split("test")[0].id]
    try:
        summary = run(cfg)
    finally:
        FIRSTS.clear()
    # 2 of 3: exactly 2/3 (a float32 mean of batch means gave 0.6666666865348816)
    assert summary["test_accuracy"] == 2 / 3 and summary["val_accuracy"] == 2 / 3
    assert summary["test"]["test/counts"] == {"accuracy": 2 / 3, "correct": 2, "scored": 3, "questions": 3}
    assert summary["val"]["val/counts"] == {"accuracy": 2 / 3, "correct": 2, "scored": 3, "questions": 3}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["test_accuracy"] == 2 / 3 and written["test"]["test/counts"]["correct"] == 2


def test_topology_pictures_name_the_validation_question_they_show():
    from gcache.callbacks import TopologyPictures
    from gcache.tasks.base import Example

    example = Example(id="lookup/7", question="What is the code of the white door? " * 4, answer="613")
    title = TopologyPictures("unused", example).title(12)
    assert title.startswith("step 12: validation question lookup/7\nWhat is the code of the white door? What")
    assert title.endswith("…") and len(title.splitlines()[1]) == 90


def test_fast_dev_run(tmp_path):
    cfg = _compose([*TINY, "task=gsm8k", "+trainer.fast_dev_run=true"], tmp_path)
    summary = run(cfg)
    assert summary["steps"] == 1


@pytest.fixture(scope="module")
def tiny_module():
    cfg = _compose([*TINY, "task=gsm8k"])
    task = build_task(cfg)
    return cfg, task, build_module(cfg, task=task)


# A training step with non-zero advantages trains every parameter: tests/test_module.py.


def test_checkpoint_holds_no_lm_weights_and_reloads_into_an_identical_policy(tmp_path, tiny_module):
    cfg, task, module = tiny_module
    path = tmp_path / "policy.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    lm_bytes = sum(p.numel() * p.element_size() for p in module.llm.model.parameters())
    assert path.stat().st_size < lm_bytes / 10
    assert all(k.startswith(("policy.", "fuser.")) for k in module.state_dict())
    fresh = build_module(cfg, task=task, llm=module.llm)
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    for (n1, p1), (n2, p2) in zip(module.named_parameters(), fresh.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    question = task.splits()["val"][0].question
    torch.testing.assert_close(module.edge_logits([question]), fresh.edge_logits([question]))


def test_same_seed_gives_the_same_graphs_answers_and_metrics(tmp_path):
    summaries = []
    for k in range(2):
        cfg = _compose([*TINY, "task=gsm8k", "seed=3"], tmp_path / f"run{k}")
        summary = run(cfg)
        timeless = {
            key: {m: v for m, v in summary[key].items() if "seconds" not in m} for key in ("val", "test")
        }
        summaries.append({**timeless, "steps": summary["steps"]})
    assert summaries[0] == summaries[1]
    logs = [
        (tmp_path / f"run{k}" / "csv" / "version_0" / "metrics.csv").read_text().splitlines() for k in range(2)
    ]
    # Wall-clock columns differ; every reward/loss/edge column must be identical.
    header = logs[0][0].split(",")
    keep = [i for i, h in enumerate(header) if "seconds" not in h]
    rows = [[[line.split(",")[i] for i in keep] for line in log] for log in logs]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_multirun_makes_two_output_dirs_and_two_wandb_runs(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "GCACHE_DATA_DIR": os.environ["GCACHE_DATA_DIR"]}
    cmd = [
        sys.executable, "-m", "gcache.train", "-m", "topology=chain,full", *TINY, "task=gsm8k", "logger=wandb",
        "limit_train=2", f"hydra.sweep.dir={tmp_path}", "run_test=false",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "summary.json").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list((job / "wandb").iterdir())


EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.task.name and cfg.model.name


def test_smoke_experiment_trains(tmp_path):
    summary = run(_compose(["experiment=smoke", "task=gsm8k"], tmp_path))
    assert summary["steps"] == 2 and (tmp_path / "summary.json").is_file()


def test_best_checkpoint_keeps_the_highest_validation_and_the_earliest_of_ties(tmp_path):
    """`select_checkpoint=best`: a real Trainer whose validations score 0.25, 0.75, 0.5, 0.75 in
    turn keeps the weights of the second (the later 0.75 is not strictly better)."""
    import lightning as L

    from gcache.build import best_checkpoint

    scores = iter([0.25, 0.75, 0.5, 0.75])

    class Scripted(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.weight - 1.0).pow(2).sum()  # moves the weight every step

        def validation_step(self, batch, batch_idx):
            self.log("val/accuracy", next(scores), batch_size=1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)
    callback = best_checkpoint(tmp_path)
    trainer = L.Trainer(max_steps=4, val_check_interval=1, limit_val_batches=1, callbacks=[callback],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=True, num_sanity_val_steps=0)
    trainer.fit(Scripted(), train_dataloaders=data, val_dataloaders=data)
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["best-step2.ckpt"]
    assert Path(callback.best_model_path).name == "best-step2.ckpt" and float(callback.best_model_score) == 0.75
    weights = torch.load(callback.best_model_path, weights_only=True)["state_dict"]["weight"]
    assert weights.item() == pytest.approx(1 - 0.8**2)  # two SGD steps from 0 towards 1, not four


def test_select_checkpoint_best_tests_the_best_validations_weights(tmp_path):
    cfg = _compose([*TINY, "task=lookup", "limit_test=2", "val_every_n_steps=1", "select_checkpoint=best"], tmp_path)
    summary = run(cfg)
    # The tiny random model scores 0 on every validation: the first validation of training is kept.
    assert Path(summary["checkpoint"]).name == "best-step1.ckpt" and Path(summary["checkpoint"]).is_file()
    assert summary["steps"] == 2 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    tested = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(tested[k], last[k]) for k in tested)  # a second step moved the policy


def test_select_checkpoint_refuses_an_unknown_value():
    from gcache.build import validate
    from gcache.cli import ConfigError

    with pytest.raises(ConfigError, match=r"select_checkpoint='final' is not one of \['last', 'best'\]"):
        validate(_compose([*TINY, "select_checkpoint=final"]))


def test_one_step_count_in_the_logs_history_completions_pictures_and_checkpoints(tmp_path):
    # The steps completed: 0 = before training, validations after steps 2 and 4 at 2 and 4, the metrics
    # of training step k at k (Lightning's loggers would say k - 1, and 1 and 3 for those validations).
    import csv

    run(_compose(["experiment=smoke", "limit_train=8", "val_every_n_steps=2"], tmp_path))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    val = [int(r["step"]) for r in rows if r.get("val/accuracy")]
    train = [int(r["step"]) for r in rows if r.get("train/reward")]
    history = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert val == history == [0, 2, 4] and train == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "completions").iterdir()) == [f"step{s:06d}.jsonl" for s in (0, 2, 4)]
    assert sorted(p.name for p in (tmp_path / "topology").glob("*.png")) == [f"step{s:06d}.png" for s in (0, 2, 4)]
    assert (tmp_path / "checkpoints" / "step4.ckpt").is_file()
    assert [int(r["step"]) for r in rows if r.get("test/accuracy")] == [4]

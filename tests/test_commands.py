"""What every command (train, evaluate, study) checks before any work, what tells the jobs of a sweep
apart, and where it writes: logs on stderr, results on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gcache(command: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", f"gcache.{command}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command,args,message", [
    ("train", ["methods=[singel]"], "error: methods: unknown method 'singel'; did you mean 'single'?"),
    ("train", ["compare=[singel]"], "error: methods: unknown method 'singel'"),  # its old name, renamed
    ("study", ["methods=[gcache,singel]"], "error: methods: unknown method 'singel'; did you mean 'single'?"),
    ("evaluate", ["methods=[fixed-fulll]"], "error: methods: unknown method 'fixed-fulll'; did you mean 'fixed-full'?"),
    ("train", ["+batch_sise=3"], "error: +batch_sise: gcache reads no key 'batch_sise', so adding it would change "
                                 "nothing; did you mean batch_size=... (without +)?"),
    ("evaluate", ["+rollout.latent_step=3"], "error: rollout.latent_step is not a rollout setting; did you mean "
                                             "rollout.latent_steps?"),
    ("train", ["seed=foo"], "error: seed must be an integer >= 0, got 'foo'"),
    # without +: Hydra's own message would suggest adding the key with +
    ("train", ["rollout.latent_step=3"], "error: rollout.latent_step: no such key; did you mean rollout.latent_steps?"),
    ("study", ["limit_tset=3"], "error: limit_tset: no such key; did you mean limit_test?"),
    ("evaluate", ["eval_batch_sise=3"], "error: eval_batch_sise: no such key; did you mean eval_batch_size?"),
    ("evaluate", ["eval_batch_size=0"], "error: eval_batch_size must be an integer >= 1 or null, got 0"),
    ("train", ["share_methods=yes"], "error: share_methods must be true or false, got 'yes'"),
])
def test_a_typo_is_an_error_line_before_any_work(tmp_path, command, args, message):
    where = f"hydra.sweep.dir={tmp_path}" if command == "study" else f"hydra.run.dir={tmp_path}"
    result = _gcache(command, "experiment=smoke", *args, where)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("results.jsonl"))  # nothing ran


def test_keys_of_objects_gcache_builds_may_still_be_added():
    # `+trainer.*` goes to Lightning's Trainer, `+model.chat_template_kwargs.*` to the chat template
    from hydra import compose, initialize_config_dir

    from gcache.build import CONF_DIR, check_additions

    overrides = ["+trainer.fast_dev_run=true", "+model.chat_template_kwargs.enable_thinking=false",
                 "+logger.tags=[a]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    check_additions(cfg, overrides)


def test_a_seed_sweep_tests_the_same_questions_and_its_summaries_tell_the_jobs_apart(tmp_path):
    result = _gcache("train", "-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    ids, summaries = [], []
    for job in ("0", "1"):
        ids.append([json.loads(line)["id"] for line in (tmp_path / job / "test_predictions.jsonl").read_text().splitlines()])
        summaries.append(json.loads((tmp_path / job / "summary.json").read_text()))
    assert ids[0] == ids[1] and len(ids[0]) == 2  # seeds vary the policy, not the test questions
    for job, summary in enumerate(summaries):
        assert (summary["seed"], summary["data_split_seed"], summary["job_num"]) == (job, 0, job)
        assert summary["overrides"] == ["experiment=smoke", f"seed={job}"]
    # results on stdout, logs on stderr
    assert result.stdout.count("trained policy vs baselines") == 2 and "| oracle |" in result.stdout
    assert "| oracle |" not in result.stderr and "summary:" in result.stderr


def test_evaluate_writes_its_report_on_stdout_under_a_title_and_logs_on_stderr(tmp_path):
    result = _gcache("evaluate", "model=tiny-random", "methods=[single]", "limit_test=1", "rollout.max_new_tokens=2",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("# lookup: 1 questions, model tiny-random-0\n") and "| single |" in result.stdout
    assert "[gcache" in result.stderr and "[gcache" not in result.stdout


def test_nothing_a_finished_run_wrote_is_lost_by_a_rerun(tmp_path):
    run = tmp_path / "run"
    assert _gcache("train", "experiment=smoke", f"hydra.run.dir={run}").returncode == 0
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts}
    # resume=true on a finished run: says so, changes nothing
    again = _gcache("train", "experiment=smoke", "resume=true", f"hydra.run.dir={run}")
    assert again.returncode == 0 and f"the run in {run} finished (summary.json): nothing to do" in again.stderr
    # a new run into it: refused before anything is written
    new = _gcache("train", "experiment=smoke", "rollout.latent_steps=1", f"hydra.run.dir={run}")
    assert new.returncode == 2 and f"error: {run} holds a run already: continue it with resume=true" in new.stderr
    assert {p: p.read_bytes() for p in kept} == kept and not set(run.rglob("*.partial"))
    # ... and in a sweep directory whose jobs hold runs
    sweep = _gcache("train", "-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert sweep.returncode == 2 and f"error: {run} holds a run already" in sweep.stderr
    # overwrite=true replaces it
    replaced = _gcache("train", "experiment=smoke", "overwrite=true", f"hydra.run.dir={run}")
    assert replaced.returncode == 0, replaced.stderr[-3000:]


@pytest.mark.parametrize("overrides,device", [
    ([], "cpu"),  # trainer=cpu (the default) keeps the LM on the CPU even where a GPU exists
    (["trainer=gpu"], "cuda"),
    (["trainer=gpu", "trainer.devices=[1]"], "cuda:1"),  # one way to pick a GPU: the trainer's devices
    (["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2"], "cuda"),  # each rank its own
    (["model.device=cuda:2"], "cuda:2"),  # an explicit model.device wins
])
def test_the_lm_follows_the_trainer_unless_model_device_names_one(monkeypatch, overrides, device):
    from hydra import compose, initialize_config_dir

    from gcache.build import CONF_DIR, model_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # as on a GPU machine
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        evaluate_cfg = compose(config_name="evaluate")
    assert model_device(cfg) == device
    assert model_device(evaluate_cfg) == "auto"  # no trainer: a GPU when torch sees one (LocalLM)


def test_old_names_keep_working_with_a_message_naming_the_new_one(tmp_path):
    from gcache.cli import renamed_overrides

    assert renamed_overrides(["compare=[single]", "+mode.compare=[]", "seed=1"], "train") == [
        "methods=[single]", "+mode.methods=[]", "seed=1"]
    assert renamed_overrides(["study.methods=[gcache]", "study.limit=5"], "study") == ["methods=[gcache]", "limit_test=5"]
    assert renamed_overrides(["batch_size=3"], "train") == ["batch_size=3"]  # training's batch keeps its name
    result = _gcache("evaluate", "model=tiny-random", "methods=[single]", "limit=1", "batch_size=2",
                     "rollout.max_new_tokens=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: limit= is now limit_test= in gcache.evaluate" in result.stderr
    assert "warning: batch_size= is now eval_batch_size= in gcache.evaluate" in result.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_a_roster_size_that_the_task_fixes_names_the_tasks_key():
    from hydra import compose, initialize_config_dir

    from gcache.build import CONF_DIR, build_roster, build_task

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["agents.num_agents=10"])
    with pytest.raises(ValueError, match="the task sets the number of agents: task.num_agents=10"):
        build_roster(cfg, build_task(cfg))


def test_evaluate_help_lists_the_groups_evaluate_reads_and_no_other():
    import yaml

    from gcache.build import CONF_DIR

    defaults = yaml.safe_load((Path(CONF_DIR) / "evaluate.yaml").read_text())["defaults"]
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    result = _gcache("evaluate", "--help", timeout=120)
    listed = result.stdout.split("== Configuration groups")[1].splitlines()[1].split(", ")
    assert result.returncode == 0 and listed == groups and "trainer" not in listed

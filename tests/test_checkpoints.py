"""Checkpoints are loaded with weights_only=True everywhere: a checkpoint is a pickle, and one shared by
a colleague or a hub must not run code while gcache loads it (evaluate, resume, a study, the best
checkpoint, Lightning's own resume)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcache.checkpoints import load_checkpoint
from gcache.cli import ConfigError

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"policy.bias": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_a_checkpoint_carrying_code_is_refused_before_any_of_it_runs(tmp_path):
    path, marker = _evil(tmp_path)
    with pytest.raises(ConfigError, match=rf"checkpoint {path} holds more than tensors and plain data.*would run "
                                          r"code it carries \(Trying to load unsupported GLOBAL posix.system"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what gcache no longer does: the code runs
    assert marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_evaluate_and_resume_refuse_it_with_an_error_line(tmp_path, command):
    path, marker = _evil(tmp_path)
    args = ["model=tiny-random", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", "logger=none"]
    args += ["methods=[gcache]", "limit_test=1"] if command == "evaluate" else ["experiment=smoke"]
    result = subprocess.run([sys.executable, "-m", f"gcache.{command}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: checkpoint {path} holds more than tensors and plain data" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not marker.exists()


def test_lightnings_own_resume_loads_with_weights_only(tmp_path, monkeypatch):
    # Past gcache's own check (switched off here), Lightning's load in trainer.fit refuses it too.
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from gcache import train
    from gcache.build import CONF_DIR

    path, marker = _evil(tmp_path)
    monkeypatch.setattr(train, "check_checkpoint", lambda *args: {})
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=smoke", "logger=none", f"ckpt_path={path}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(Exception, match="Weights only load failed"):
        train.run(cfg)
    assert not marker.exists()


def test_gcaches_own_checkpoints_load_with_weights_only(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from gcache import train
    from gcache.build import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=smoke", "logger=none", "select_checkpoint=best",
                                                      "val_every_n_steps=1"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    summary = train.run(cfg)
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(saved) >= 2 and any(p.name.startswith("best-") for p in saved)
    for checkpoint in saved:
        state = load_checkpoint(checkpoint)
        assert set(state) >= {"state_dict", "rng_states", "gcache_config", "optimizer_states"}
    assert summary["checkpoint"].startswith(str(tmp_path / "checkpoints" / "best-"))

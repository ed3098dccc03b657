"""Checkpoints: written whole or not at all, refused when they belong to another config, and
carrying the random state a resumed run needs.

- `AtomicCheckpointIO` (a Lightning checkpoint plugin) writes `<name>.partial`, fsyncs it and
  renames it over the target, so a crash at any moment leaves the previous `last.ckpt` whole.
- `load_checkpoint` loads with `weights_only=True` (a checkpoint is a pickle: loading one must never
  run code it carries); `check_checkpoint` refuses, naming the keys that differ, a checkpoint
  trained with another task, model, roster, topology or policy shape (`GCacheModule.run_identity`);
  `load_trained` also loads its parameters into the module (evaluation).
- `resume_path` finds what `resume=true` / `ckpt_path=` continue from.
- `rng_states` / `set_rng_states`: the global torch, CUDA, numpy and Python generator states
  that `GCacheModule` saves into and restores from every checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from gcache.cli import ConfigError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to `<path>.partial` in the same directory, fsyncs it and renames it
    over `path`, so a reader or a resume sees the old checkpoint or the new one, never part of one.

    Lightning's own `TorchCheckpointIO` (2.6) writes through an fsspec transaction that, for local
    paths, stages the bytes in `tempfile.mkstemp()` (the system temp directory) and commits with
    `shutil.move`: a rename when that directory is on the same filesystem as the run, but a copy
    straight into `path` when it is not (a node-local /tmp and a shared run directory), which a
    kill can interrupt; it does not fsync, and a kill leaves the staged file behind in /tmp.
    Remote URLs (s3://, gs://) keep Lightning's path: object stores replace objects whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict:
    """A checkpoint's contents, loaded with `weights_only=True`: a checkpoint is a pickle, and one
    shared by a colleague or a hub could otherwise run any code it holds while it loads. gcache's
    checkpoints hold only tensors and plain data (`rng_states`), which this accepts; anything else is
    refused (ConfigError naming the file and what it holds) before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message: a generic paragraph, then what was refused ("Trying to load unsupported GLOBAL ...")
        parts = [part.strip() for part in str(exc).split("\n\n") if part.strip()]
        what = next((part for part in parts if "GLOBAL" in part or "Unsupported" in part), parts[-1] if parts else "")
        raise ConfigError(f"checkpoint {path} holds more than tensors and plain data, so gcache does not load it: "
                          f"loading it would run code it carries ({what.rstrip('.')})") from exc


def check_checkpoint(path: str | Path, module) -> dict:
    """Load a checkpoint (`load_checkpoint`), refusing (ConfigError naming the differing keys) one
    trained with another task, model, roster, topology or policy shape than `module`'s."""
    # Memory-mapped: a resume reads only the config here (Lightning loads the checkpoint itself, also
    # with weights_only=True: gcache.train).
    state = load_checkpoint(path, mmap=True)
    saved = state.get("gcache_config")
    if saved is not None and saved != module.run_identity:
        current = module.run_identity
        differ = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                  for key in dict.fromkeys([*saved, *current]) if saved.get(key) != current.get(key)]
        raise ConfigError(f"checkpoint {path} was trained with another config ({'; '.join(differ)}); "
                          "use the run's own settings (its .hydra/config.yaml)")
    return state


def resume_path(ckpt_path: str | None, resume: bool, ckpt_dir: Path) -> str | None:
    """What training continues from: an explicit `ckpt_path` (or `last`), else with `resume` the run's
    own `last.ckpt` when it exists; None = start fresh."""
    if resume and ckpt_path is None:
        last = ckpt_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        log.info("resume=true: %s", f"continuing from {last}" if ckpt_path else "no checkpoint yet, starting fresh")
    return ckpt_path


def load_trained(path: str | Path, module) -> str:
    """Load a trained checkpoint's parameters into `module` (after `check_checkpoint`); returns its
    absolute path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    state = check_checkpoint(path, module)
    module.load_state_dict(state.get("state_dict", state))
    return str(path.resolve())


def rng_states() -> dict[str, Any]:
    """The global torch, CUDA, numpy and Python generator states, as types `torch.load` accepts
    with `weights_only=True` (numpy's key array becomes a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))

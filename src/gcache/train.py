"""Train the communication policy and the cache fuser.

    python -m gcache.train                                  # embedded model + arith task, CPU
    python -m gcache.train task=gpqa mode=hybrid            # an API model writes the final answer
    python -m gcache.train -m topology=chain,full latent_steps=0,10   # a sweep, one run per job

Each run writes into its output directory: the composed config (`.hydra/`), checkpoints
(`checkpoints/last.ckpt` and every `ckpt_every_n_steps` steps), topology pictures,
logs (W&B offline by default, or CSV), and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gcache.agents import DEFAULT_ROSTER, build_roster
from gcache.callbacks import TopologyPictures
from gcache.datamodule import TaskDataModule
from gcache.embeddings import TextEmbedder
from gcache.llm.local import LocalLM
from gcache.module import GCacheModule, LossConfig
from gcache.policy.cache_fuser import CacheFuser
from gcache.rollout import RETENTIONS, RolloutConfig

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A bad value in the composed config, reported before anything heavy loads."""


def validate(cfg: DictConfig) -> None:
    """Early, clear errors for values Hydra's group choices cannot catch."""
    checks = [
        (cfg.latent_steps >= 0, f"latent_steps must be >= 0, got {cfg.latent_steps}"),
        (cfg.graphs_per_question >= 1, f"graphs_per_question must be >= 1, got {cfg.graphs_per_question}"),
        (cfg.num_rounds >= 1, f"num_rounds must be >= 1, got {cfg.num_rounds}"),
        (cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.retention in RETENTIONS, f"retention={cfg.retention!r} is not one of {list(RETENTIONS)}"),
        (cfg.agents.num_agents is None or cfg.agents.num_agents >= 1,
         f"agents.num_agents must be >= 1, got {cfg.agents.num_agents}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.num_rounds != 1:
        raise ConfigError(f"num_rounds={cfg.num_rounds}: only 1 round is implemented so far")
    name = str(cfg.model.name)
    if name not in ("embedded", "tiny-random") and (name.startswith((".", "/", "~"))) and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name={name!r}: that model directory does not exist")


def build_task(cfg: DictConfig):
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    return instantiate(kwargs)


def build_module(cfg: DictConfig, *, task=None, llm: LocalLM | None = None) -> GCacheModule:
    task = task or build_task(cfg)
    roster = build_roster(cfg.agents.roster or DEFAULT_ROSTER[task.domain], cfg.agents.num_agents)
    llm = llm or LocalLM.load(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.seed)
    embedder = TextEmbedder(cfg.policy.embedder) if cfg.policy.embedder else TextEmbedder()
    rollout = RolloutConfig(
        latent_steps=cfg.latent_steps, retention=cfg.retention, realign=cfg.realign,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
    )
    from gcache.modes import build_mode

    return GCacheModule(
        task=task,
        roster=roster,
        policy=instantiate(cfg.policy.net),
        fuser=CacheFuser(llm.num_layers),
        llm=llm,
        embedder=embedder,
        rollout=rollout,
        topology=cfg.topology.name,
        topology_seed=cfg.topology.seed,
        graphs_per_question=cfg.graphs_per_question,
        policy_lr=cfg.policy.policy_lr,
        fuser_lr=cfg.policy.fuser_lr,
        loss=LossConfig(
            edge_cost=cfg.policy.edge_cost, entropy_coef=cfg.policy.entropy_coef,
            fuser_weight=cfg.policy.fuser_weight, fuser_rows_per_question=cfg.policy.fuser_rows_per_question,
        ),
        generator_mode=build_mode(cfg.mode),
        seed=cfg.seed,
    )


def _choices() -> dict[str, Any]:
    try:
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except ValueError:  # composed outside @hydra.main (tests)
        return {}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, then evaluate on the test split; returns (and writes) the summary."""
    validate(cfg)
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(cfg)
    datamodule = TaskDataModule(
        task, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        limit_train=cfg.limit_train, limit_val=cfg.limit_val, limit_test=cfg.limit_test, seed=cfg.seed,
    )
    for split in ("train", "val", "test"):
        datamodule.split(split)  # empty splits fail here, before the model loads
    module = build_module(cfg, task=task)

    ckpt_dir = out / "checkpoints"
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step}", save_last=True, save_top_k=-1,
            every_n_train_steps=cfg.ckpt_every_n_steps, save_on_train_epoch_end=True, auto_insert_metric_name=False,
        ),
        TopologyPictures(out / "topology", question=datamodule.split("val")[0].question),
    ]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger and hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = cfg.ckpt_path
    if cfg.resume and ckpt_path is None:
        last = ckpt_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        log.info("resume=true: %s", f"continuing from {last}" if ckpt_path else "no checkpoint yet, starting fresh")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        test = {}
        if cfg.run_test:
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            test = {k: float(v) for k, v in (results[0] if results else {}).items()}
        summary = {
            "val_accuracy": val.get("val/accuracy"),
            "test_accuracy": test.get("test/accuracy"),
            "steps": trainer.global_step,
            "questions_seen": trainer.global_step * cfg.batch_size,
            "test": test,
            "val": val,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "checkpoint": str(ckpt_dir / "last.ckpt"),
            "config": _choices(),
        }
        if trainer.is_global_zero:
            tmp = out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out / "summary.json")
            log.info("summary: %s", json.dumps({k: summary[k] for k in ("val_accuracy", "test_accuracy", "steps", "wall_seconds")}))
        return summary
    finally:
        if logger and type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    return summary.get("test_accuracy")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()

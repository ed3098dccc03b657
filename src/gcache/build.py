"""The composition root: a composed config in, checked and wired objects out.

`gcache.train`, `gcache.evaluate` and `gcache.study` are thin commands over these builders, so a
config key means the same thing in all three:

- `validate(cfg)`: every early check that needs no data, model or network (`ConfigError`);
- `build_rollout` (`cfg.rollout`, checked by `RolloutConfig` itself), `build_task`,
  `build_roster`, `build_module` (LM, embedder, policy, fuser, generation mode);
- `build_datamodule`, `build_logger`, `build_trainer` (callbacks, checkpointing, validation
  schedule) for training; `start_wandb_run` for every command that logs to W&B.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from gcache.agents import DEFAULT_ROSTER, Roster
from gcache.agents import build_roster as roster_from_names
from gcache.callbacks import Completions, History, ProgressLog, StopOnSignal, TopologyPictures
from gcache.checkpoints import AtomicCheckpointIO
from gcache.cli import CONF_DIR, ConfigError, leaves
from gcache.datamodule import TaskDataModule
from gcache.embeddings import TextEmbedder
from gcache.llm.local import LocalLM, embedded_missing
from gcache.module import FUSER_GRAPHS, GRAPHS, GCacheModule, LossConfig
from gcache.policy.cache_fuser import CHANNELS, FUSIONS, CacheFuser
from gcache.policy.topology import JUDGER_EDGES
from gcache.rollout import RolloutConfig
from gcache.secrets import KEY_SOURCES, is_secret_key

__all__ = ["CONF_DIR", "ConfigError", "build_datamodule", "build_logger", "build_module", "build_roster", "model_device",
           "build_rollout", "build_task", "build_trainer", "best_checkpoint", "is_wandb", "start_wandb_run", "use_this_ranks_gpu",
           "validate"]

# key: smallest allowed value; keys a config does not have (evaluate.yaml has no training keys) are skipped.
INTEGERS = {"policy.graphs_per_question": 1, "batch_size": 1, "ckpt_every_n_steps": 1, "seed": 0, "task.seed": 0}
OPTIONAL_INTEGERS = {"agents.num_agents": 1, "limit_train": 1, "limit_val": 1, "limit_test": 1, "eval_batch_size": 1}
# What a policy group without these keys ran (the settings of runs from before them; policy/default.yaml sets them).
LEGACY_POLICY = {"fusion": "values", "fuser_graph": "sampled"}
SELECT_CHECKPOINT = ("last", "best")  # the weights a training run tests (train.yaml select_checkpoint)
# The config groups a checkpoint records (`GCacheModule.run_settings`) and an evaluation of it adopts.
RUN_GROUPS = ("task", "agents", "topology", "policy", "rollout", "mode")


# ---- checks ------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Early, clear errors for values Hydra's group choices cannot catch (no data, model or network needed)."""
    for key, minimum in [*INTEGERS.items(), *OPTIONAL_INTEGERS.items()]:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>" or (value is None and key in OPTIONAL_INTEGERS):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null" if key in OPTIONAL_INTEGERS else "")
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    build_rollout(cfg)
    chat_template_kwargs(cfg)
    from gcache.evaluate import check_methods  # gcache.evaluate imports this module

    for key in ("methods", "mode.methods"):  # before any training: a typo found after it costs the run
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_methods(list(value), key)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_additions(cfg, list(HydraConfig.get().overrides.task))
    judger_edges = cfg.policy.judger_edges
    if judger_edges not in JUDGER_EDGES:
        raise ConfigError(f"policy.judger_edges={judger_edges!r} is not one of {list(JUDGER_EDGES)}")
    # absent keys (a run's settings from before them) mean what those runs ran: `LEGACY_POLICY`
    for key, allowed in (("channel", CHANNELS), ("graphs", GRAPHS), ("fusion", FUSIONS), ("fuser_graph", FUSER_GRAPHS)):
        value = cfg.policy.get(key, LEGACY_POLICY.get(key, allowed[0]))
        if value not in allowed:
            raise ConfigError(f"policy.{key}={value!r} is not one of {list(allowed)}")
    share = cfg.get("share_methods", True)
    if not isinstance(share, bool):
        raise ConfigError(f"share_methods must be true or false, got {share!r}")
    select = cfg.get("select_checkpoint", "last")
    if select not in SELECT_CHECKPOINT:
        raise ConfigError(f"select_checkpoint={select!r} is not one of {list(SELECT_CHECKPOINT)}")
    rank = cfg.policy.get("channel_rank", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"policy.channel_rank must be an integer >= 1, got {rank!r}")
    name = str(cfg.model.name)
    is_path = name.startswith((".", "/", "~"))  # else `embedded`, `tiny-random` or a hub id
    if is_path and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name={name!r}: that model directory does not exist")
    if name in ("embedded", "tiny-random") and (why := embedded_missing()):
        raise ConfigError(why)
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}, but torch sees no CUDA GPU; "
                          "use trainer=cpu (or trainer=ddp on CPU)")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "last") and not Path(str(ckpt_path)).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist "
                          "(resume=true continues the run in hydra.run.dir)")
    secrets = [key for key, value in leaves(OmegaConf.to_container(cfg, resolve=False))
               if value and is_secret_key(key)]
    if secrets:
        raise ConfigError(f"{', '.join(secrets)}: {KEY_SOURCES}")


# Nodes whose keys gcache does not read one by one: Hydra's own, and keyword arguments handed on whole.
FREE_FORM = ("hydra", "model.chat_template_kwargs")


def check_additions(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a key added with `+` (or `++`) that gcache does not read: it would change nothing, and a
    sweep over it would run identical jobs. A key under a node that builds an object (`_target_`:
    trainer, logger, task, policy.net) is passed to that object, which judges it."""
    import difflib

    known = [key for key, _ in leaves(OmegaConf.to_container(cfg, resolve=False)) if not key.startswith("hydra")]
    for override in overrides:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0]
        parents = [".".join(key.split(".")[:i]) for i in range(key.count(".") + 1)]  # "", "a", "a.b", ...
        if any(p and (p.startswith(FREE_FORM) or OmegaConf.select(cfg, f"{p}._target_", default=None))
               for p in parents):
            continue
        close = difflib.get_close_matches(key, [k for k in known if k != key], n=1)
        hint = f"; did you mean {close[0]}=... (without +)?" if close else ""
        raise ConfigError(f"+{key}: gcache reads no key {key!r}, so adding it would change nothing{hint}")


# ---- the parts ---------------------------------------------------------------------------------
def build_rollout(cfg: DictConfig) -> RolloutConfig:
    """`cfg.rollout` as a `RolloutConfig`; its checks become `error: rollout.<key> ...`."""
    try:
        return instantiate(cfg.rollout)
    except Exception as exc:  # Hydra wraps the dataclass's ValueError / TypeError
        cause = exc.__cause__ or exc
        unknown = [key for key in cfg.rollout if key != "_target_" and key not in RolloutConfig.__dataclass_fields__]
        if unknown:  # a misspelt key: name the closest one
            import difflib

            close = difflib.get_close_matches(unknown[0], list(RolloutConfig.__dataclass_fields__), n=1)
            hint = f"; did you mean rollout.{close[0]}?" if close else ""
            raise ConfigError(f"rollout.{unknown[0]} is not a rollout setting{hint}") from exc
        raise ConfigError(f"rollout.{cause}") from exc


def chat_template_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`model.chat_template_kwargs`: arguments of the chat template for every prompt (Qwen3 presets:
    enable_thinking=false)."""
    kwargs = OmegaConf.select(cfg, "model.chat_template_kwargs", default=None)
    if kwargs is None:
        return {}
    if isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.chat_template_kwargs must be a mapping (e.g. {{enable_thinking: false}}), "
                          f"got {kwargs!r}")
    return kwargs


def model_device(cfg: DictConfig) -> str:
    """Where the LM goes. `model.device` names a device (`cpu`, `cuda`, `cuda:1`); `auto` follows the
    trainer where there is one: `trainer=cpu` keeps the LM on the CPU, `trainer=gpu` puts it on the GPU
    Lightning uses (`trainer.devices=[1]`: GPU 1; under DDP each rank's own, `use_this_ranks_gpu`), and
    without a trainer (`gcache.evaluate`) `auto` is a GPU when torch sees one."""
    device = str(cfg.model.device)
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if device != "auto" or accelerator is None or accelerator == "auto":
        return device
    if accelerator == "cpu":
        return "cpu"
    devices = OmegaConf.select(cfg, "trainer.devices", default=None)
    if isinstance(devices, (list, ListConfig)) and len(devices) == 1 and world_size(cfg) == 1:
        return f"cuda:{int(devices[0])}"
    return "cuda"


def build_task(cfg: DictConfig):
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    return instantiate(kwargs)


def build_roster(cfg: DictConfig, task) -> Roster:
    """The agents. A task whose facts are held by agents (lookup) fixes the roster's size: one agent
    per holder."""
    holders = len(task.load_examples()[0].agent_facts)
    roster = roster_from_names(cfg.agents.roster or DEFAULT_ROSTER[task.domain],
                               cfg.agents.num_agents or holders or None)
    if holders and roster.num_agents != holders:
        raise ValueError(
            f"task {task.name!r} gives its facts to {holders} agents but agents.num_agents="
            f"{roster.num_agents}; the task sets the number of agents: task.num_agents={roster.num_agents} "
            f"(and agents.num_agents=null)"
        )
    return roster


def build_module(cfg: DictConfig, *, task=None, llm: LocalLM | None = None) -> GCacheModule:
    """Task, roster, generation mode (its endpoint checked before the LM loads), LM, embedder,
    policy and fuser, wired into a `GCacheModule`."""
    from gcache.modes import build_mode

    task = task or build_task(cfg)
    roster = build_roster(cfg, task)
    generator_mode = build_mode(cfg.mode)  # checks the endpoint: before the LM loads
    llm = llm or LocalLM.load(cfg.model.name, device=model_device(cfg), dtype=cfg.model.dtype, seed=cfg.seed,
                              chat_template_kwargs=chat_template_kwargs(cfg))
    embedder = TextEmbedder(cfg.policy.embedder) if cfg.policy.embedder else TextEmbedder()
    policy = cfg.policy
    module = GCacheModule(
        task=task,
        roster=roster,
        policy=instantiate(policy.net),
        fuser=CacheFuser(llm.num_layers, channel=policy.get("channel", "gates"), rank=policy.get("channel_rank", 8),
                         kv_dim=llm.kv_dim, hidden_dim=llm.model.config.hidden_size,
                         latent_steps=cfg.rollout.latent_steps, seed=cfg.seed,
                         fusion=policy.get("fusion", LEGACY_POLICY["fusion"])),
        llm=llm,
        embedder=embedder,
        rollout=build_rollout(cfg),
        topology=cfg.topology.name,
        topology_seed=cfg.topology.seed,
        graphs_per_question=policy.graphs_per_question,
        policy_lr=policy.policy_lr,
        fuser_lr=policy.fuser_lr,
        channel_lr=policy.get("channel_lr", 1e-3),
        loss=LossConfig(
            edge_cost=policy.edge_cost, entropy_coef=policy.entropy_coef,
            fuser_weight=policy.fuser_weight, fuser_rows_per_question=policy.fuser_rows_per_question,
            fuser_graph=policy.get("fuser_graph", LEGACY_POLICY["fuser_graph"]),
        ),
        judger_edges=policy.judger_edges,
        fuser_trains_policy=bool(policy.fuser_trains_policy),
        graphs=policy.get("graphs", "learned"),
        generator_mode=generator_mode,
        seed=cfg.seed,
    )
    module.run_settings = {group: OmegaConf.to_container(cfg[group], resolve=True) for group in RUN_GROUPS if group in cfg}
    return module


def build_datamodule(cfg: DictConfig, task) -> TaskDataModule:
    """The task's splits, read once here: missing files, malformed lines and empty splits fail now."""
    datamodule = TaskDataModule(
        task, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, eval_rows=cfg.rollout.max_batch,
        limit_train=cfg.limit_train, limit_val=cfg.limit_val, limit_test=cfg.limit_test, seed=cfg.seed,
    )
    for split in ("train", "val", "test"):
        datamodule.split(split)
    return datamodule


def build_logger(cfg: DictConfig):
    """`cfg.logger` (False for none). W&B: the run is started here (`start_wandb_run`) and handed to
    Lightning's `WandbLogger` as its experiment."""
    if not cfg.logger:
        return False
    if not is_wandb(cfg.logger):
        return instantiate(cfg.logger)
    return instantiate(cfg.logger, experiment=start_wandb_run(cfg.logger, define_step=True))


def is_wandb(logger_cfg) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


# WandbLogger arguments that are Lightning's own; the others are wandb.init's (group, tags, entity, ...).
_LIGHTNING_WANDB_ARGS = {"_target_", "name", "save_dir", "version", "offline", "dir", "id", "anonymous",
                         "project", "log_model", "experiment", "prefix", "checkpoint_name", "add_file_policy"}


def start_wandb_run(logger_cfg, *, directory: str | Path | None = None, define_step: bool = False, **init):
    """A W&B run as `gcache/conf/logger/wandb.yaml` describes it (project, name, group, offline, save_dir),
    on global rank 0 only (None elsewhere). `directory` overrides `save_dir`; `init` adds
    `wandb.init` arguments (job_type, config). `define_step`: metrics use Lightning's
    `trainer/global_step` as their x-axis, as `WandbLogger` does for the runs it starts.

    gcache starts the run itself because Lightning 2.6 hands `wandb.init` `anonymous=None`, which
    wandb 0.2x answers with "The anonymous setting has no effect and will be removed"."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return None
    import wandb

    def get(key: str):  # resolves only what is read (save_dir points into Hydra's run directory)
        value = OmegaConf.select(logger_cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    extra = {k: get(k) for k in logger_cfg if k not in _LIGHTNING_WANDB_ARGS}
    run = wandb.init(
        project=get("project"), name=get("name"), dir=str(directory or get("save_dir") or "."),
        id=get("version") or get("id"), resume="allow", mode="offline" if get("offline") else None,
        **{**extra, **init},
    )
    if define_step:
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return run


def build_trainer(cfg: DictConfig, datamodule: TaskDataModule, out: Path) -> tuple[L.Trainer, StopOnSignal]:
    """The Lightning Trainer of a training run, with its callbacks, logger and atomic checkpoints,
    and the callback that turns Ctrl-C / SIGTERM into a clean stop."""
    stop = StopOnSignal()
    callbacks = [
        stop,
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=out / "checkpoints", filename="step{step}", save_last=True, save_top_k=-1,
            every_n_train_steps=cfg.ckpt_every_n_steps, save_on_train_epoch_end=True,
            auto_insert_metric_name=False, save_on_exception=True,
        ),
        *([best_checkpoint(out / "checkpoints")] if cfg.get("select_checkpoint") == "best" else []),
        TopologyPictures(out / "topology", example=datamodule.split("val")[0]),
        Completions(out / "completions"),
        History(out),
    ]
    tty = sys.stderr.isatty()
    if not tty:  # nohup, Slurm: log lines instead of a progress bar
        callbacks.append(ProgressLog(every_n_steps=cfg.get("progress_every_n_steps", 5)))
    extra = {} if "enable_progress_bar" in cfg.trainer else {"enable_progress_bar": tty}
    if cfg.get("val_every_n_steps"):  # batch_size is per rank: a rank's epoch has fewer batches under DDP
        steps_per_epoch = math.ceil(len(datamodule.split("train")) / (cfg.batch_size * world_size(cfg)))
        extra["val_check_interval"] = min(cfg.val_every_n_steps, steps_per_epoch)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=build_logger(cfg),
                          plugins=[AtomicCheckpointIO()], **extra)
    return trainer, stop


def best_checkpoint(directory: Path) -> L.pytorch.callbacks.ModelCheckpoint:
    """Keeps `best-step<N>.ckpt`: the weights of the validation with the highest val/accuracy (a
    later one replaces it only when strictly better, so the earliest of equal scores stays)."""
    return L.pytorch.callbacks.ModelCheckpoint(
        dirpath=directory, filename="best-step{step}", monitor="val/accuracy", mode="max", save_top_k=1,
        auto_insert_metric_name=False, save_on_train_epoch_end=False, enable_version_counter=False,
    )


def world_size(cfg: DictConfig) -> int:
    """Processes a training run will start: devices x nodes (1 unless `trainer.devices` is a count or
    a list of devices)."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    count = len(devices) if isinstance(devices, (list, ListConfig)) else devices
    count = count if isinstance(count, int) and count > 0 else 1
    return count * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def use_this_ranks_gpu() -> None:
    """Each DDP process loads the LM onto its own GPU (Lightning selects the device only inside
    `fit`, after the model is built). LOCAL_RANK is set by torchrun and Lightning's launcher,
    SLURM_LOCALID by srun."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)

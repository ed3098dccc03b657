"""Train the communication policy and the cache fuser.

    python -m gcache.train                                  # embedded model + arith task, CPU
    python -m gcache.train task=gpqa mode=hybrid            # an API model writes the final answer
    python -m gcache.train -m topology=chain,full latent_steps=0,10   # a sweep, one run per job
    python -m gcache.train resume=true hydra.run.dir=outputs/arith/runs/<time>   # continue a run

Each run writes into its output directory: the composed config (`.hydra/`), checkpoints
(`checkpoints/last.ckpt` and every `ckpt_every_n_steps` steps), topology pictures,
logs (W&B offline by default, or CSV), and `summary.json`.

What happens when things go wrong:

- Checkpoints are written to `<name>.partial` beside the target, fsynced and renamed over
  it (`AtomicCheckpointIO`), so a crash at any moment leaves the previous `last.ckpt` whole.
- `resume=true` continues from `last.ckpt` with the same step count, optimiser state, global
  RNG states and position in the epoch's data order (see `module.py` and `datamodule.py`).
- Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, and the process
  exits with 130 / 143 and one log line saying how to resume. A second Ctrl-C stops at once.
- Bad input (config values, missing data files, malformed data, an API mode without an
  endpoint, a missing model) is reported as `error: <message>` with exit code 2, before
  the model loads; errors during training keep their traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gcache.agents import DEFAULT_ROSTER, build_roster
from gcache.callbacks import Completions, History, ProgressLog, StopOnSignal, TopologyPictures
from gcache.datamodule import TaskDataModule
from gcache.embeddings import TextEmbedder
from gcache.llm.api import ApiError
from gcache.llm.local import REALIGNMENTS, LocalLM, embedded_missing
from gcache.module import JUDGER_EDGES, GCacheModule, LossConfig
from gcache.policy.cache_fuser import CacheFuser
from gcache.rollout import JUDGER_CACHES, RETENTIONS, RolloutConfig
from gcache.secrets import (
    KEY_SOURCES,
    env_secrets,
    install_secret_filter,
    is_secret_key,
    load_dotenv,
    redacted_config,
    secret_overrides,
)

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A bad value in the composed config, reported before anything heavy loads."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# ---- validation ------------------------------------------------------------------------------
# key: smallest allowed value; keys missing from a config (evaluate.yaml has fewer) are skipped.
INTEGERS = {"latent_steps": 0, "graphs_per_question": 1, "max_new_tokens": 1,
            "batch_size": 1, "eval_batch_size": 1, "ckpt_every_n_steps": 1}
OPTIONAL_INTEGERS = {"agents.num_agents": 1, "limit_train": 1, "limit_val": 1, "limit_test": 1}


def validate(cfg: DictConfig) -> None:
    """Early, clear errors for values Hydra's group choices cannot catch (no data, model or network needed)."""
    for key, minimum in [*INTEGERS.items(), *OPTIONAL_INTEGERS.items()]:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>" or (value is None and key in OPTIONAL_INTEGERS):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null" if key in OPTIONAL_INTEGERS else "")
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    if cfg.retention not in RETENTIONS:
        raise ConfigError(f"retention={cfg.retention!r} is not one of {list(RETENTIONS)}")
    temperature = cfg.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"temperature must be a number >= 0, got {cfg.temperature!r}")
    if cfg.get("judger_cache", "fused") not in JUDGER_CACHES:
        raise ConfigError(f"judger_cache={cfg.judger_cache!r} is not one of {list(JUDGER_CACHES)}")
    if cfg.realign not in REALIGNMENTS:
        raise ConfigError(f"realign={cfg.realign!r} is not one of {list(REALIGNMENTS)}")
    judger_edges = cfg.get("judger_edges", "sampled")
    if judger_edges not in JUDGER_EDGES:
        raise ConfigError(f"judger_edges={judger_edges!r} is not one of {list(JUDGER_EDGES)}")
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
    leaves = _leaves(OmegaConf.to_container(cfg, resolve=False))
    secrets = [key for key, value in leaves if value and is_secret_key(key)]
    if secrets:
        raise ConfigError(f"{', '.join(secrets)}: {KEY_SOURCES}")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


@contextmanager
def setup_errors_as_config_errors() -> Iterator[None]:
    """Errors while reading the config, data, endpoint and model are the user's to fix: one line
    (`ConfigError`), no traceback. That includes a missing optional package (`datasets` for hub
    data). `ApiError`s already say what to check and keep their type."""
    try:
        yield
    except (ConfigError, ApiError):
        raise
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, InstantiationException) as exc:
        cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ else exc
        raise ConfigError(str(cause)) from exc


# ---- building --------------------------------------------------------------------------------
def build_task(cfg: DictConfig):
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    return instantiate(kwargs)


def build_module(cfg: DictConfig, *, task=None, llm: LocalLM | None = None) -> GCacheModule:
    from gcache.modes import build_mode

    task = task or build_task(cfg)
    # A task whose facts are held by agents (lookup) fixes the roster's size: one agent per holder.
    holders = len(task.load_examples()[0].agent_facts)
    roster = build_roster(cfg.agents.roster or DEFAULT_ROSTER[task.domain], cfg.agents.num_agents or holders or None)
    if holders and roster.num_agents != holders:
        raise ValueError(
            f"task {task.name!r} gives its facts to {holders} agents but agents.num_agents="
            f"{roster.num_agents}; set agents.num_agents={holders} (or null)"
        )
    generator_mode = build_mode(cfg.mode)  # checks the endpoint: before the LM loads
    llm = llm or LocalLM.load(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype, seed=cfg.seed)
    embedder = TextEmbedder(cfg.policy.embedder) if cfg.policy.embedder else TextEmbedder()
    rollout = RolloutConfig(
        latent_steps=cfg.latent_steps, retention=cfg.retention, realign=cfg.realign,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        judger_cache=cfg.get("judger_cache", "fused"),
    )
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
        judger_edges=cfg.get("judger_edges", "sampled"),
        fuser_trains_policy=bool(cfg.get("fuser_trains_policy", False)),
        generator_mode=generator_mode,
        seed=cfg.seed,
    )


def _use_this_ranks_gpu() -> None:
    """Each DDP process loads the LM onto its own GPU (Lightning selects the device only inside
    `fit`, after the model is built). LOCAL_RANK is set by torchrun and Lightning's launcher,
    SLURM_LOCALID by srun."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)


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


def _choices() -> dict[str, Any]:
    try:
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except ValueError:  # composed outside @hydra.main (tests)
        return {}


def _resume_command(out: Path) -> str:
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    except ValueError:
        overrides = []
    return " ".join(["python -m gcache.train", *overrides, "resume=true", f"hydra.run.dir={out}"])


def compare_on_test(cfg: DictConfig, module: GCacheModule, examples: list, out: Path) -> dict | None:
    """The trained policy (its test predictions) next to `cfg.compare` baselines on the same test
    questions, with paired exact McNemar tests; also written to `comparison.jsonl`."""
    from gcache.evaluate import Evaluator
    from gcache.stats import mcnemar_exact, wilson_interval

    methods = [m for m in (cfg.get("compare") or []) if m != "oracle" or all(ex.oracle_edges for ex in examples)]
    if not methods:
        return None
    evaluator = Evaluator(module, ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    trained = {r["id"]: r["reward"] for r in module.test_records}
    rewards = {"gcache": [trained[ex.id] for ex in examples]}
    records = []
    was_training = module.training
    module.eval()
    try:
        for method in methods:
            rows = []
            for start in range(0, len(examples), cfg.eval_batch_size):
                rows += evaluator.run(method, examples[start : start + cfg.eval_batch_size])
            records += rows
            rewards[method] = [r["reward"] for r in rows]
    finally:
        module.train(was_training)
    with open(out / "comparison.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    result = {"questions": len(examples), "methods": {}}
    for method, values in rewards.items():
        scored = [v for v in values if v is not None]
        entry = {"accuracy": sum(scored) / max(len(scored), 1), "ci95": list(wilson_interval(sum(scored), len(scored)))}
        if method != "gcache":
            pairs = [(a, b) for a, b in zip(rewards["gcache"], values, strict=True) if a is not None and b is not None]
            entry["mcnemar_p_vs_gcache"] = mcnemar_exact([a > 0.5 for a, _ in pairs], [b > 0.5 for _, b in pairs])[
                "p_value"]
        result["methods"][method] = entry
    return result


def comparison_table(comparison: dict) -> str:
    lines = ["| method | accuracy | 95% CI | McNemar p vs gcache |", "|---|---|---|---|"]
    for method, entry in comparison["methods"].items():
        p = entry.get("mcnemar_p_vs_gcache")
        lines.append(f"| {method} | {entry['accuracy']:.3f} | {entry['ci95'][0]:.2f}–{entry['ci95'][1]:.2f} | "
                     f"{'—' if p is None else f'{p:.3g}'} |")
    return "\n".join(lines)


def check_checkpoint(path: str | Path, module: GCacheModule) -> dict:
    """Load a checkpoint, refusing (ConfigError naming the differing keys) one trained with
    another task, model, roster, topology or policy shape than `module`'s."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("gcache_config")
    if saved is not None and saved != module.run_identity:
        current = module.run_identity
        differ = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                  for key in dict.fromkeys([*saved, *current]) if saved.get(key) != current.get(key)]
        raise ConfigError(f"checkpoint {path} was trained with another config ({'; '.join(differ)}); "
                          "use the run's own settings (its .hydra/config.yaml)")
    return state


def log_comparison(loggers: list, comparison: dict, step: int) -> None:
    """The final comparison as metrics `compare/<method>/accuracy` and `compare/<method>/mcnemar_p`
    (vs gcache) for every logger (a row of csv/metrics.csv), and for W&B also the table
    `compare/table` and the run summary's `comparison`."""
    metrics = {}
    for method, entry in comparison["methods"].items():
        metrics[f"compare/{method}/accuracy"] = entry["accuracy"]
        if entry.get("mcnemar_p_vs_gcache") is not None:
            metrics[f"compare/{method}/mcnemar_p"] = entry["mcnemar_p_vs_gcache"]
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            rows = [[method, e["accuracy"], e["ci95"][0], e["ci95"][1], e.get("mcnemar_p_vs_gcache")]
                    for method, e in comparison["methods"].items()]
            logger.log_table(key="compare/table", columns=["method", "accuracy", "ci95_low", "ci95_high",
                                                           "mcnemar_p_vs_gcache"], data=rows, step=step)
            logger.experiment.summary["comparison"] = comparison
        logger.save()


def build_logger(cfg: DictConfig):
    logger = instantiate(cfg.logger) if cfg.logger else False
    if isinstance(logger, WandbLogger):
        # Lightning 2.6 always hands wandb.init `anonymous=None`, which wandb 0.2x answers with "The
        # anonymous setting has no effect and will be removed"; leaving it out means the same.
        logger._wandb_init.pop("anonymous", None)
    return logger


def quiet_third_party_output() -> None:
    """Keep the console to our lines and real warnings, silencing known-benign output at its source.

    - Lightning's info lines (the "Tip: ... litlogger" banner, "GPU available", "`Trainer.fit`
      stopped"): its rank-zero logger shows warnings only. Its warnings use `warnings` and still show.
    - W&B's info lines (version banner, offline hints, end-of-run panel; we log where the run is) and
      its Weave suggestion whenever `openai` is imported: `WANDB_SHOW_INFO=false` and
      `WANDB_DISABLE_WEAVE=true` unless set. W&B's warnings still show.
    - transformers' "Loading weights" bars: off (hub download bars stay: a first download is long).
    - Lightning's own use of a torch API torch deprecated (`_pytree.py`: "`isinstance(treespec,
      LeafSpec)` is deprecated"): that one message from that module only.
    """
    import huggingface_hub
    import transformers

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SHOW_INFO", "false")
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
    transformers.utils.logging.disable_progress_bar()  # also turns the hub's bars off: back on
    huggingface_hub.utils.enable_progress_bars()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


# ---- the run ---------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, then evaluate on the test split; returns (and writes) the summary."""
    validate(cfg)
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with setup_errors_as_config_errors():
        task = build_task(cfg)
        datamodule = TaskDataModule(
            task, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            limit_train=cfg.limit_train, limit_val=cfg.limit_val, limit_test=cfg.limit_test, seed=cfg.seed,
        )
        for split in ("train", "val", "test"):
            datamodule.split(split)  # missing files, malformed lines and empty splits fail here
        out.mkdir(parents=True, exist_ok=True)
        stop = StopOnSignal()
        callbacks = [
            stop,
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, filename="step{step}", save_last=True, save_top_k=-1,
                every_n_train_steps=cfg.ckpt_every_n_steps, save_on_train_epoch_end=True,
                auto_insert_metric_name=False, save_on_exception=True,
            ),
            TopologyPictures(out / "topology", question=datamodule.split("val")[0].question),
            Completions(out / "completions"),
            History(out),
        ]
        tty = sys.stderr.isatty()
        if not tty:  # nohup, Slurm: log lines instead of a progress bar
            callbacks.append(ProgressLog(every_n_steps=cfg.get("progress_every_n_steps", 5)))
        logger = build_logger(cfg)
        extra = {} if "enable_progress_bar" in cfg.trainer else {"enable_progress_bar": tty}
        if cfg.get("val_every_n_steps"):
            steps_per_epoch = math.ceil(len(datamodule.split("train")) / cfg.batch_size)
            extra["val_check_interval"] = min(cfg.val_every_n_steps, steps_per_epoch)
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                         plugins=[AtomicCheckpointIO()], **extra)
        _use_this_ranks_gpu()
        module = build_module(cfg, task=task)  # the API endpoint is checked before the LM loads
    if logger:
        logger.log_hyperparams(redacted_config(cfg))

    ckpt_path = cfg.ckpt_path
    if cfg.resume and ckpt_path is None:
        last = ckpt_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        log.info("resume=true: %s", f"continuing from {last}" if ckpt_path else "no checkpoint yet, starting fresh")
    if ckpt_path not in (None, "last"):
        check_checkpoint(ckpt_path, module)
    try:
        try:
            if cfg.get("validate_at_start") and ckpt_path is None:  # step 0 of the learning curve
                trainer.validate(module, datamodule=datamodule, verbose=False)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            test, comparison = {}, None
            if cfg.run_test:
                module.test_records = []
                results = trainer.test(module, datamodule=datamodule, verbose=False)
                test = {k: float(v) for k, v in (results[0] if results else {}).items()}
                if trainer.is_global_zero:  # rank 0's shard under DDP
                    tmp = out / "test_predictions.jsonl.tmp"
                    tmp.write_text("".join(json.dumps(r) + "\n" for r in module.test_records))
                    tmp.replace(out / "test_predictions.jsonl")
                    comparison = compare_on_test(cfg, module, datamodule.split("test"), out)
                    if comparison:
                        log_comparison(trainer.loggers, comparison, trainer.global_step)
        except SIGTERMException:
            signum = stop.received or signal.SIGTERM  # another rank's signal, or Lightning's own handling
            last = ckpt_dir / "last.ckpt"
            saved = f"checkpoint {last}" if last.exists() else "no checkpoint yet"
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; {saved}; "
                f"continue with: {_resume_command(out)}", signum,
            ) from None
        summary = {
            "val_accuracy": val.get("val/accuracy"),
            "test_accuracy": test.get("test/accuracy"),
            "steps": trainer.global_step,
            "questions_seen": trainer.global_step * cfg.batch_size * trainer.world_size,
            "test": test,
            "val": val,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "checkpoint": str(ckpt_dir / "last.ckpt"),
            "comparison": comparison,
            "config": _choices(),
        }
        if trainer.is_global_zero:
            tmp = out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(out / "summary.json")
            shown = ("val_accuracy", "test_accuracy", "steps", "wall_seconds")
            log.info("summary: %s", json.dumps({k: summary[k] for k in shown}))
            if comparison:
                log.info("trained policy vs baselines on the same %d test questions:\n%s",
                         comparison["questions"], comparison_table(comparison))
        return summary
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None and wandb.run.offline and trainer.is_global_zero:
                log.info("W&B run saved offline; upload it with: wandb sync %s", wandb.run.sync_dir)
            wandb.finish()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    load_dotenv()  # from the directory the command runs in (Hydra does not chdir)
    install_secret_filter(env_secrets())
    logging.captureWarnings(True)  # warnings go through the (filtered) log handlers too
    quiet_third_party_output()
    try:
        summary = run(cfg)
    except (ConfigError, ApiError) as exc:  # the message says what to fix; a traceback would bury it
        log.error("error: %s", exc)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingInterrupted as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(128 + signal.SIGINT)
    return summary.get("test_accuracy")


if __name__ == "__main__":
    if keys := secret_overrides(sys.argv[1:]):
        # Refused before Hydra runs: it would write the value to .hydra/overrides.yaml and config.yaml.
        print(f"error: {', '.join(keys)}: {KEY_SOURCES}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    torch.set_float32_matmul_precision("high")
    main()

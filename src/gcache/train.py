"""Train the communication policy and the cache fuser.

    python -m gcache.train                                  # embedded model + lookup task, CPU
    python -m gcache.train task=gpqa mode=hybrid            # an API model writes the final answer
    python -m gcache.train -m topology=chain,full rollout.latent_steps=0,10   # a sweep, one run per job
    python -m gcache.train resume=true hydra.run.dir=outputs/lookup/runs/<time>   # continue a run

Each run writes into its output directory: the composed config (`.hydra/`), checkpoints
(`checkpoints/last.ckpt` and every `ckpt_every_n_steps` steps), topology pictures,
logs (W&B offline by default, or CSV), `test_predictions.jsonl`, `comparison.jsonl` (the
trained policy next to the `methods` baselines on the test questions) and `summary.json`.

Under `mode=hybrid` / `api_hint` the comparison also holds `mode.methods` (default
`[api_single]`: the API model alone on the same questions) with API tokens and USD per question
and per correct answer, and `summary.json` / the W&B summary hold the run's API totals (`api`:
requests, tokens, cost, retries, failed items for train, val, test, compare and in total).

What happens when things go wrong:

- Checkpoints are written to `<name>.partial` beside the target, fsynced and renamed over
  it (`gcache.checkpoints.AtomicCheckpointIO`), so a crash at any moment leaves the previous
  `last.ckpt` whole.
- `resume=true` continues from `last.ckpt` with the same step count, optimiser state, global
  RNG states and position in the epoch's data order (see `module.py` and `datamodule.py`).
- Ctrl-C or SIGTERM: the current step finishes, a checkpoint is saved, and the process
  exits with 130 / 143 and one log line saying how to resume. A second Ctrl-C stops at once.
- Bad input (config values, missing data files, malformed data, an API mode without an
  endpoint, a missing model) is reported as `error: <message>` with exit code 2, before
  the model loads; errors during training keep their traceback (`gcache.cli`).

The objects are built by `gcache.build` (the composition root shared with evaluate and study).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gcache.build import (
    build_datamodule,
    build_module,
    build_task,
    build_trainer,
    use_this_ranks_gpu,
    validate,
)
from gcache.checkpoints import check_checkpoint, resume_path
from gcache.cli import (
    CONF_DIR,
    ConfigError,
    Interrupted,
    check_command_line,
    check_run_directory,
    config_errors,
    is_nonzero_rank,
    renamed_overrides,
    run_directory_error,
    run_job,
)
from gcache.evaluate import (
    Evaluator,
    TestComparison,
    comparison_methods,
    comparison_table,
    write_comparison,
)
from gcache.report import API_COLUMNS, accuracy_counts
from gcache.secrets import redacted_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, then evaluate on the test split next to `cfg.methods`; returns (and writes) the summary."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    if cfg.resume and (out / "summary.json").is_file():  # a finished run: nothing is redone or rewritten
        log.info("the run in %s finished (summary.json): nothing to do", out)
        return json.loads((out / "summary.json").read_text())
    if not is_nonzero_rank() and (why := run_directory_error(out, resume=cfg.resume, ckpt_path=cfg.ckpt_path,
                                                              overwrite=cfg.get("overwrite", False))):
        raise ConfigError(why)
    with config_errors():
        validate(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        task = build_task(cfg)
        datamodule = build_datamodule(cfg, task)
        use_this_ranks_gpu()
        module = build_module(cfg, task=task)  # the API endpoint is checked before the LM loads
    ckpt_path = resume_path(cfg.ckpt_path, cfg.resume, out / "checkpoints")
    if ckpt_path not in (None, "last"):
        check_checkpoint(ckpt_path, module)
    out.mkdir(parents=True, exist_ok=True)
    with config_errors():  # last: its logger starts the W&B run, which the `finally` below ends
        trainer, stop = build_trainer(cfg, datamodule, out)
    try:
        if trainer.logger:
            trainer.logger.log_hyperparams(redacted_config(cfg))
        try:
            val, test, comparison, tested = _fit_and_test(cfg, trainer, module, datamodule, ckpt_path, out)
        except SIGTERMException:
            signum = stop.received or signal.SIGTERM  # another rank's signal, or Lightning's own handling
            last = out / "checkpoints" / "last.ckpt"
            saved = f"checkpoint {last}" if last.exists() else "no checkpoint yet"
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; {saved}; "
                              f"continue with: {_resume_command(out)}", signum) from None
        summary = {
            "val_accuracy": val.get("val/accuracy"),
            "test_accuracy": test.get("test/accuracy"),
            "steps": trainer.global_step,
            "questions_seen": trainer.global_step * cfg.batch_size * trainer.world_size,
            "test": test,
            "val": val,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "checkpoint": tested,  # the weights the test split ran (select_checkpoint)
            "comparison": comparison,
            "config": _choices(),
            "seed": cfg.seed,
            "data_split_seed": OmegaConf.select(cfg, "task.seed", default=None),  # the same for every seed
            **_command(),
            "token_loops": module.llm.loop_stats(),  # this process's static workspaces and CUDA graphs
            "prefix_cache": module.llm.prefix_cache().stats(),  # prompt prefixes prefilled once (gcache.prefix_cache)
        }
        api = api_totals(module)
        if api is not None:  # the model too: a sweep's jobs differ in it
            summary["api_model"], summary["api"] = module.generator_mode.client.model, api
        if trainer.is_global_zero:
            _write_json(out / "summary.json", summary)
            shown = ("val_accuracy", "test_accuracy", "steps", "wall_seconds")
            log.info("summary: %s", json.dumps({k: summary[k] for k in shown}))
            if comparison:  # results on stdout, logs on stderr
                log.info("trained policy vs baselines on the same %d test questions (on stdout)", comparison["questions"])
                print(f"trained policy vs baselines on the same {comparison['questions']} test questions:\n"
                      f"{comparison_table(comparison)}", flush=True)
            if api is not None:
                log_api_totals(trainer.loggers, api, module.generator_mode.client.model)
        return summary
    finally:
        module.llm.release()  # the token loops' workspaces and graphs end with the run
        if isinstance(trainer.logger, WandbLogger):
            import wandb

            if wandb.run is not None and wandb.run.offline and trainer.is_global_zero:
                log.info("W&B run saved offline; upload it with: wandb sync %s", wandb.run.sync_dir)
            wandb.finish()


def _fit_and_test(cfg, trainer, module, datamodule, ckpt_path, out: Path) -> tuple[dict, dict, dict | None, str]:
    """Validation metrics after training, test metrics, the comparison with `cfg.methods`, and the
    checkpoint whose weights the test ran (`select_checkpoint`: last.ckpt, or the best validation's)."""
    if cfg.get("validate_at_start") and ckpt_path is None:  # step 0 of the learning curve
        trainer.validate(module, datamodule=datamodule, verbose=False)
    # weights_only=True: resuming from a checkpoint never runs code it carries (gcache.checkpoints)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if val:  # the last validation's accuracy as the fraction of its counts, over every rank's questions
        val_records = gather_records(module.val_records, datamodule.split("val"))
        val["val/counts"] = accuracy_counts([r["reward"] for r in val_records])
        val["val/accuracy"] = val["val/counts"]["accuracy"]
    best = next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/accuracy"), None)
    best_path = best.best_model_path if best is not None else None  # select_checkpoint=best
    if best_path:
        log.info("testing the best validation's weights: %s (val/accuracy %.3f; the last validation %.3f)",
                 best_path, float(best.best_model_score), val.get("val/accuracy", float("nan")))
    elif best is not None:
        log.warning("select_checkpoint=best, but no validation ran during training: testing the last weights")
    tested = best_path or str(out / "checkpoints" / "last.ckpt")
    if not cfg.run_test:
        return val, {}, None, tested
    module.test_records = []
    test_split = datamodule.split("test")
    methods = comparison_methods(compare_methods(cfg), test_split)
    if methods:  # run on each test batch next to the policy, sharing its agents (`TestComparison`)
        module.test_comparison = TestComparison(module, methods, ckpt_path=tested,
                                                together=cfg.get("share_methods", True))
        log.info("test: gcache and the comparison's %s on %d questions, %d per batch", ", ".join(methods),
                 len(test_split), datamodule.eval_size("test"))
    try:
        # The best checkpoint's weights replace the module's (the comparison's controls then use them too).
        results = trainer.test(module, datamodule=datamodule, verbose=False, ckpt_path=best_path or None,
                               weights_only=True)
    finally:
        comparison_records = module.test_comparison.records if module.test_comparison is not None else {}
        module.test_comparison = None
    test = {k: float(v) for k, v in (results[0] if results else {}).items() if k != "step"}  # (the loggers' step)
    module.test_records = gather_records(module.test_records, test_split)
    test["test/counts"] = accuracy_counts([r["reward"] for r in module.test_records])
    test["test/accuracy"] = test["test/counts"]["accuracy"]  # exact, not a float32 mean of batch means
    rows_of = {method: gather_records(rows, test_split) for method, rows in comparison_records.items()}
    comparison = None
    if trainer.is_global_zero:  # every rank's test records, gathered above
        # With what ran (graph, fuser, checkpoint: `Evaluator.describe`), as every record of comparison.jsonl
        # and of an evaluation's results.jsonl (one schema: docs/outputs.md).
        config = Evaluator(module, ckpt_path=tested).describe("gcache")
        module.test_records = [{**r, "config": config} for r in module.test_records]
        log.info("test: %d predictions in %s", len(module.test_records), out / "test_predictions.jsonl")
        (out / "test_predictions.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in module.test_records))
        (out / "test_predictions.jsonl.tmp").replace(out / "test_predictions.jsonl")
        if rows_of:
            comparison = write_comparison(module.test_records, rows_of, out)
            log_comparison(trainer.loggers, comparison, trainer.global_step)
    return val, test, comparison, tested


def compare_methods(cfg: DictConfig) -> list[str]:
    """`methods`, then the mode's own baselines (`mode.methods`: `api_single` for the API modes); the
    trained policy (`gcache`) is always compared."""
    return [m for m in dict.fromkeys([*(cfg.get("methods") or []), *(cfg.mode.get("methods") or [])]) if m != "gcache"]


API_PARTS = ("train", "val", "test", "compare")


def api_totals(module) -> dict | None:
    """The run's API usage per part (`API_PARTS`, summed over DDP ranks) and in total; None (local)."""
    from gcache.llm.api import UsageTotals

    mode = module.generator_mode
    if mode is None:
        return None
    mine = [(dict(mode.ledger.parts), mode.client.usage.snapshot())]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        every: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine[0])
        mine = every
    parts = {name: sum((p[name] for p, _ in mine if name in p), UsageTotals())
             for name in API_PARTS if any(name in p for p, _ in mine)}
    return mode.totals(parts, sum((total for _, total in mine), UsageTotals()))


def log_api_totals(loggers: list, api: dict, model: str) -> None:
    """One console line of the run's API totals (a warning when calls were retried or failed) and
    the W&B run summary's `api/<part>/<field>`."""
    total = api["total"]
    cost = "cost unknown (no price for this model)" if total["cost_usd"] is None else f"{total['cost_usd']:.4g} USD"
    parts = ", ".join(f"{name} {api[name]['requests']}" for name in API_PARTS if name in api)
    trouble = total["retries"] or total["failed_items"]
    (log.warning if trouble else log.info)(
        "API model %r: %d requests (%s), %d prompt + %d completion tokens, %s; %d retries, %d failed items",
        model, total["requests"], parts, total["prompt_tokens"], total["completion_tokens"], cost,
        total["retries"], total["failed_items"])
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"api/{part}/{key}": value for part, fields in api.items()
                                              for key, value in fields.items()})


def gather_records(records: list[dict], examples: list) -> list[dict]:
    """Every rank's per-question records (under DDP each rank holds its shard), one per question (a
    sampler pads shards by repeating questions), in the order of `examples`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shards: list[list[dict] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shards, records)
        records = [r for shard in shards for r in shard or []]
    by_id: dict[str, dict] = {}
    for record in records:
        by_id.setdefault(record["id"], record)
    return [by_id[ex.id] for ex in examples if ex.id in by_id]


def log_comparison(loggers: list, comparison: dict, step: int) -> None:
    """The final comparison as metrics `compare/<method>/accuracy`, `compare/<method>/mcnemar_p`
    (vs gcache) and the API columns (`compare/<method>/api_cost_usd_per_correct`, ...) for every
    logger (a row of csv/metrics.csv), and for W&B also the table `compare/table` and the run
    summary's `comparison`."""
    metrics = {}
    for method, entry in comparison["methods"].items():
        metrics[f"compare/{method}/accuracy"] = entry["accuracy"]
        if entry.get("mcnemar_p_vs_gcache") is not None:
            metrics[f"compare/{method}/mcnemar_p"] = entry["mcnemar_p_vs_gcache"]
        metrics.update({f"compare/{method}/{c}": entry[c] for c in API_COLUMNS if entry.get(c) is not None})
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            api = [c for c in API_COLUMNS if any(c in e for e in comparison["methods"].values())]
            rows = [[method, e["accuracy"], e["ci95"][0], e["ci95"][1], e.get("mcnemar_p_vs_gcache"),
                     *(e.get(c) for c in api)] for method, e in comparison["methods"].items()]
            logger.log_table(key="compare/table", columns=["method", "accuracy", "ci95_low", "ci95_high",
                                                           "mcnemar_p_vs_gcache", *api], data=rows, step=step)
            logger.experiment.summary["comparison"] = comparison
        logger.save()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _choices() -> dict[str, Any]:
    try:
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except ValueError:  # composed outside @hydra.main (tests)
        return {}


def _command() -> dict[str, Any]:
    """What tells the jobs of a sweep apart: the command-line overrides and, in a sweep, the job's
    number (empty when composed outside @hydra.main)."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    job = {"overrides": list(hydra.overrides.task)}
    if hydra.mode.name == "MULTIRUN":
        job["job_num"] = hydra.job.num
    return job


def _resume_command(out: Path) -> str:
    try:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    except ValueError:
        overrides = []
    return " ".join(["python -m gcache.train", *overrides, "resume=true", f"hydra.run.dir={out}"])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(run, cfg).get("test_accuracy")


if __name__ == "__main__":
    sys.argv[1:] = renamed_overrides(sys.argv[1:], "train")
    check_command_line(sys.argv[1:], "train")  # before Hydra writes overrides to .hydra/
    check_run_directory(sys.argv[1:])  # ... and before it writes into a run directory that holds a run
    main()

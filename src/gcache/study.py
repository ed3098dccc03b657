"""Does it help? Train gcache for several seeds, evaluate it next to baselines and controls on the
same held-out questions, and aggregate with intervals and paired tests.

    python -m gcache.study                                 # lookup, seeds 0,1,2 (gcache/conf/study.yaml)
    python -m gcache.study task=arith seed=0,1,2,3,4       # another task, five seeds
    python -m gcache.study task=gsm8k limit_test=20 limit_train=16 topology=full

A Hydra multirun over `seed`: each job (one seed, in `<sweep dir>/seed<N>/`) trains like
`gcache.train` and then evaluates `methods` on the test split with the trained
checkpoint (`gcache.evaluate`, so `eval/results.jsonl` holds one record per question and
method). When the sweep ends, `Aggregate` reads every seed's records and `history.jsonl`
and writes `study.json`, `study.md` and pictures (`curves.png`, `edges.png`,
`comparison.png`) into the sweep directory, using `gcache.stats` (two-level bootstrap
intervals over seeds and questions, exact McNemar tests per seed, and over all seeds a
sign-flip permutation test and a cluster bootstrap with questions as the units). Every
seed's data split is the same (`task.seed`, as in gcache.train); seeds vary the policy's initialisation,
the sampled graphs and the data order.

Resumable: a seed with a `summary.json` is not trained again (an interrupted one resumes
from its last checkpoint), and evaluation skips finished (question, method) pairs; rerun
the same command (the sweep directory has no timestamp) to finish a study.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from gcache.build import is_wandb, start_wandb_run
from gcache.cli import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    config_errors,
    holds_run,
    renamed_overrides,
    run_job,
)

log = logging.getLogger(__name__)


def run_seed(cfg: DictConfig) -> dict[str, Any]:
    """Train (unless this seed's run finished) and evaluate one seed in `cfg.output_dir`."""
    from gcache.build import build_task, validate
    from gcache.evaluate import evaluate
    from gcache.train import run

    with config_errors():
        validate(cfg)  # the methods too, before this seed trains
    out = Path(cfg.output_dir)
    summary_path = out / "summary.json"
    # The mode's baselines (api_single under an API mode) are evaluated here, not by the training run.
    methods = list(dict.fromkeys([*cfg.methods, *(cfg.mode.get("methods") or []), *ablation_methods(cfg)]))
    if summary_path.exists():
        log.info("seed %s: trained already (%s)", cfg.seed, summary_path)
        summary = json.loads(summary_path.read_text())
    else:
        train_cfg = copy.deepcopy(cfg)
        with open_dict(train_cfg):
            train_cfg.resume = holds_run(out)  # an interrupted seed continues (from its last checkpoint, if any)
            train_cfg.methods, train_cfg.mode.methods = [], []  # the evaluation below runs them
        summary = run(train_cfg)
    if "oracle" in methods and not build_task(cfg).load_examples()[0].oracle_edges:
        log.info("task %s has no oracle graph: method 'oracle' left out", cfg.task.name)
        methods.remove("oracle")
    eval_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(eval_cfg):
        eval_cfg.methods = methods
        eval_cfg.split = "test"
        # The weights the seed's training run tested (select_checkpoint: last, or the best validation's).
        eval_cfg.ckpt_path = summary.get("checkpoint") or str(out / "checkpoints" / "last.ckpt")
        eval_cfg.output_dir = str(out / "eval")
    report = evaluate(eval_cfg)
    return {"summary": summary, "report": report}


def ablation_methods(cfg: DictConfig) -> list[str]:
    """With `study.ablation` (the default) and a run that trains a policy and a fuser: the methods that
    say what each adds (`gcache.stats.ablation_pairs`): the policy alone, the fuser alone, the fuser
    with another question's signal, and the fuser's graph without it (`fixed-<topology>`)."""
    from gcache.evaluate import METHODS

    policy = cfg.policy
    if not cfg.study.get("ablation", True) or policy.get("graphs", "learned") != "learned" or not policy.fuser_weight:
        return []
    fixed = f"fixed-{cfg.topology.name}"
    return ["gcache-policy-only", "gcache-fuser-only", "gcache-fuser-other-question",
            *([fixed] if fixed in METHODS else [])]


def aggregate_study(directory: str | Path, *, reference: str = "gcache", title: str = "",
                    agents: list[str] | None = None) -> dict:
    """Aggregate every `seed*/` of a study directory into study.json, study.md and pictures;
    `agents` names the agents (node order) in the routing table."""
    from gcache.report import read_results
    from gcache.stats import (
        aggregate,
        first_step,
        history_rows,
        routing_by_step,
        study_figures,
        study_markdown,
    )

    directory = Path(directory)
    records, histories = {}, {}
    for seed_dir in sorted(directory.glob("seed*")):
        results = seed_dir / "eval" / "results.jsonl"
        if not results.exists():
            continue
        seed = int(seed_dir.name.removeprefix("seed"))
        records[seed] = read_results(results)
        history = seed_dir / "history.jsonl"
        # under summary.json's names (val/p_oracle, ...), from history files of any version
        histories[seed] = history_rows([json.loads(x) for x in history.read_text().splitlines() if x]
                                       if history.exists() else [])
    if not records:
        raise FileNotFoundError(f"no seed*/eval/results.jsonl under {directory}")
    summary = aggregate(records, reference=reference)
    summary["training"] = {}
    for seed in records:
        path = directory / f"seed{seed}" / "summary.json"
        if path.exists():
            trained = json.loads(path.read_text())
            summary["training"][seed] = {k: trained.get(k) for k in ("steps", "wall_seconds", "val_accuracy",
                                                                      "test_accuracy")}
        else:
            summary["training"][seed] = {}
        edges = [h for h in histories[seed] if h.get("val/p_oracle") is not None]
        if edges:  # how fast the graph policy found the oracle graph (tasks that have one)
            summary["training"][seed].update({
                "first_step_p_oracle_above_0.9": first_step(edges, "val/p_oracle", above=0.9),
                "first_step_p_distractor_below_0.1": first_step(edges, "val/p_distractor", below=0.1),
                "last_p_oracle": edges[-1]["val/p_oracle"], "last_p_distractor": edges[-1].get("val/p_distractor"),
            })
    # What the judger read on the validation questions at each validation of every seed.
    completions = [json.loads(line) for seed in records
                   for path in sorted((directory / f"seed{seed}" / "completions").glob("step*.jsonl"))
                   for line in path.read_text().splitlines() if line]
    summary["routing_during_training"] = routing_by_step(completions)
    if agents:
        summary["agents"] = list(agents)
    (directory / "study.json.tmp").write_text(json.dumps(summary, indent=2))
    (directory / "study.json.tmp").replace(directory / "study.json")
    text = study_markdown(summary, title or f"study: {directory}")
    (directory / "study.md").write_text(text)
    study_figures(summary, histories, directory, title=title)
    log.info("study of %d seed(s): %s (on stdout)", len(records), directory / "study.md")
    print(text, flush=True)  # results on stdout, logs on stderr
    return summary


class Aggregate(Callback):
    """Hydra callback: aggregate the study when the seed sweep ends (and log it to W&B when the
    study's logger is W&B)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        directory = Path(config.hydra.sweep.dir)
        summary = aggregate_study(directory, reference=config.study.reference, agents=_agent_names(config),
                                  title=f"{config.task.name}: {config.model.name}, seeds "
                                        f"{', '.join(str(s) for s in sorted(_seeds(directory)))}")
        if is_wandb(config.get("logger")):
            import wandb

            from gcache.secrets import redacted_config

            run = start_wandb_run(config.logger, directory=directory, job_type="study",
                                  config=redacted_config(config))
            table = wandb.Table(columns=["method", "accuracy", "ci_low", "ci_high"])
            for name, stats in summary["methods"].items():
                low, high = stats["ci95"] if stats.get("ci95") else (None, None)
                table.add_data(name, stats.get("accuracy"), low, high)
            run.log({"study": table, **{f"study/{p.stem}": wandb.Image(str(p)) for p in directory.glob("*.png")}})
            run.finish()


def _agent_names(config: DictConfig) -> list[str]:
    """The study's agents in node order (for its routing table)."""
    from gcache.build import build_roster, build_task

    return [role.name for role in build_roster(config, build_task(config)).roles]


def _seeds(directory: Path) -> list[int]:
    return [int(p.name.removeprefix("seed")) for p in directory.glob("seed*") if p.name[4:].isdigit()]


def _study_command(cfg: DictConfig) -> dict[str, Any]:
    with config_errors():
        if cfg.study.reference not in cfg.methods:
            raise ConfigError(f"study.reference={cfg.study.reference!r} is not among methods "
                              f"{list(cfg.methods)}")
    return run_seed(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="study")
def main(cfg: DictConfig) -> None:
    run_job(_study_command, cfg)


if __name__ == "__main__":
    import sys

    sys.argv[1:] = renamed_overrides(sys.argv[1:], "study")
    check_command_line(sys.argv[1:], "study")
    main()

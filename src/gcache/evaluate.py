"""Evaluate methods side by side on the same questions, with the same model, roster and prompts.

    python -m gcache.evaluate task=gsm8k limit=20
    python -m gcache.evaluate task=arith methods=[latent_mas,gcache] ckpt_path=outputs/…/last.ckpt

Methods (all share the judger's prompt and the roster's agents):

- `single`: the judger answers alone (no agents).
- `text_mas`: agents exchange text along `baseline_topology` (default chain).
- `latent_mas`: the LatentMAS chain: caches passed along `baseline_topology`, full retention.
- `gcache`: the learned policy's deterministic graph and fuser (`ckpt_path`), or without
  a checkpoint the fixed `topology` (every allowed edge i -> j with i < j).
- `no_handoff` (control): gcache's graph, but the judger reads no cache.
- `mismatched` (control): gcache's graph, but the judger reads the fused cache built
  for a different question.
- `api_single`, `api_text_mas` (with `mode=hybrid` or `api_hint`, which name the endpoint):
  the API model alone, or every agent being the API model passing text along
  `baseline_topology`, with the text MAS's prompts.

If the latent channel carries information, gcache beats both controls.

Every (question, method) result is appended to `results.jsonl` as soon as its batch
finishes; a rerun with the same output directory skips finished pairs. At the end
`report.json`, `report.md` and `report.png` are written from `results.jsonl` alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, open_dict

from gcache.policy.graph_policy import topology_mask
from gcache.rollout import RolloutConfig, RolloutEngine, chain_adjacency

log = logging.getLogger(__name__)

METHODS = ("single", "text_mas", "latent_mas", "gcache", "no_handoff", "mismatched", "api_single", "api_text_mas")
API_METHODS = ("api_single", "api_text_mas")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


# ---- statistics ----------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and 1 and small n)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def read_results(path: Path) -> list[dict]:
    """Records of results.jsonl; a torn last line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: ignoring a torn last line (interrupted write)", path)
                continue
            raise ValueError(f"{path}:{number}: malformed JSON line") from None
    return records


def repair_results(path: Path) -> list[dict]:
    """Read results.jsonl and, if its last line was torn by a crash, rewrite it without that line
    (atomically) so appended records start on a line of their own."""
    records = read_results(path)
    if path.exists():
        text = path.read_text()
        if text and (not text.endswith("\n") or len(records) != len([x for x in text.splitlines() if x.strip()])):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(path)
    return records


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Per-method accuracy (95% CI) and costs, and ratios against text_mas."""
    methods: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == name]
        scored = [r["reward"] for r in rows if r["reward"] is not None]
        n = len(rows)
        acc = sum(scored) / len(scored) if scored else 0.0
        low, high = wilson_interval(sum(scored), len(scored))
        methods[name] = {
            "questions": n,
            "scored": len(scored),
            "accuracy": acc,
            "ci95": [low, high],
            "decoded_tokens_per_question": sum(r["decoded_tokens"] for r in rows) / n,
            "prompt_tokens_per_question": sum(r["prompt_tokens"] for r in rows) / n,
            "seconds_per_question": sum(r["seconds"] for r in rows) / n,
            "peak_cache_bytes": max(r["peak_cache_bytes"] for r in rows),
        }
    base = methods.get("text_mas")
    if base:
        for stats in methods.values():
            stats["speedup_vs_text_mas"] = base["seconds_per_question"] / max(stats["seconds_per_question"], 1e-9)
            stats["decoded_tokens_vs_text_mas"] = stats["decoded_tokens_per_question"] / max(
                base["decoded_tokens_per_question"], 1e-9
            )
    return {"methods": methods}


def report_markdown(report: dict, title: str = "") -> str:
    cols = ["method", "n", "accuracy", "95% CI", "decoded tok/q", "prompt tok/q", "s/q", "peak KV MB",
            "speed× vs text", "decoded vs text"]
    lines = [f"# {title}".rstrip(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, s in report["methods"].items():
        lines.append(
            f"| {name} | {s['questions']} | {s['accuracy']:.3f} | {s['ci95'][0]:.2f}–{s['ci95'][1]:.2f} | "
            f"{s['decoded_tokens_per_question']:.1f} | {s['prompt_tokens_per_question']:.1f} | "
            f"{s['seconds_per_question']:.2f} | {s['peak_cache_bytes'] / 2**20:.1f} | "
            f"{s.get('speedup_vs_text_mas', float('nan')):.2f} | {s.get('decoded_tokens_vs_text_mas', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def report_figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    stats = report["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    acc = [stats[m]["accuracy"] for m in names]
    pairs = list(zip(names, acc, strict=True))
    err = [[a - stats[m]["ci95"][0] for m, a in pairs], [stats[m]["ci95"][1] - a for m, a in pairs]]
    axes[0].bar(names, acc, yerr=err, capsize=4, color="#4c72b0")
    axes[0].set_title("accuracy (95% CI)")
    axes[1].bar(names, [stats[m]["seconds_per_question"] for m in names], color="#dd8452")
    axes[1].set_title("seconds per question")
    axes[2].bar(names, [stats[m]["decoded_tokens_per_question"] for m in names], color="#55a868")
    axes[2].set_title("decoded tokens per question")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, title: str = "") -> dict:
    """Recompute the report from results.jsonl and write report.json / .md / .png (atomically)."""
    report = summarize(read_results(out / "results.jsonl"))
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", report_markdown(report, title))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    if report["methods"]:
        report_figure(report, out / "report.png")
    return report


# ---- running methods -----------------------------------------------------------------------


def fixed_adjacency(topology: str, n: int, seed: int = 0) -> torch.Tensor:
    """A deterministic DAG from a topology mask: every allowed edge i -> j with i < j. (N, N)"""
    mask = topology_mask(topology, n, seed=seed)
    return mask & torch.ones(n, n, dtype=torch.bool).triu(1)


def _record(example, method: str, answer: str, detail: dict, **costs) -> dict:
    """One line of results.jsonl: the answer, its score and what it cost."""
    return {
        "id": example.id,
        "method": method,
        "reward": detail["reward"],
        "answer": answer,
        "extracted": detail.get("extracted"),
        "reference": example.answer[:200],
        **costs,  # decoded_tokens, prompt_tokens, seconds, peak_cache_bytes, edges
    }


class Evaluator:
    """Runs the methods on batches of examples with one module's LM, roster, task and prompts."""

    def __init__(self, module, *, baseline_topology: str = "chain", trained: bool = False,
                 agent_max_new_tokens: int = 128) -> None:
        self.module = module
        self.baseline_topology = baseline_topology
        self.trained = trained
        self.agent_max_new_tokens = agent_max_new_tokens

    def _engine(self, **changes) -> RolloutEngine:
        base = self.module.rollout_config
        config = RolloutConfig(**{**base.__dict__, **changes})
        return RolloutEngine(self.module.llm, self.module.roster, config, fuser=self.module.fuser)

    def _gcache_graph(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.module.roster.num_agents
        if self.trained:
            from gcache.policy.graph_policy import deterministic_dag

            with torch.no_grad():
                logits = self.module.edge_logits(questions)
            mask = self.module.agent_mask
            return deterministic_dag(logits[:, :n, :n], mask).cpu(), logits
        adjacency = fixed_adjacency(self.module.topology, n).expand(len(questions), -1, -1)
        return adjacency, None

    def run(self, method: str, batch) -> list[dict]:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
        questions = [ex.question for ex in batch]
        n = self.module.roster.num_agents
        fmt = self.module.task.answer_format
        index = list(range(len(batch)))
        start = time.perf_counter()
        active = self.module.active
        logits = None
        if method in API_METHODS:
            return self._run_api(method, batch, start)
        if method == "single":
            rows = self._engine().run(questions, chain_adjacency(n).expand(len(batch), -1, -1), index,
                                      answer_format=fmt, active=[])
        elif method in ("text_mas", "latent_mas"):
            adjacency = fixed_adjacency(self.baseline_topology, n).expand(len(batch), -1, -1)
            if method == "text_mas":
                engine = self._engine(method="text", agent_max_new_tokens=self.agent_max_new_tokens)
            else:
                engine = RolloutEngine(
                    self.module.llm, self.module.roster,
                    RolloutConfig(**{**self.module.rollout_config.__dict__, "retention": "full"}),
                )
            rows = engine.run(questions, adjacency, index, answer_format=fmt)
        else:
            adjacency, logits = self._gcache_graph(questions)
            judger_cache = {"gcache": "fused", "no_handoff": "none", "mismatched": "mismatched"}[method]
            rows = self._engine(judger_cache=judger_cache).run(
                questions, adjacency, index, answer_format=fmt, active=active, edge_logits=logits
            )
        answers, _ = self.module._answers(batch, rows)
        details = self.module.task.score_details(answers, list(batch))  # runs code tasks' programs once
        seconds = (time.perf_counter() - start) / len(batch)
        return [
            _record(ex, method, answer, detail, decoded_tokens=rollout.decoded_tokens,
                    prompt_tokens=rollout.prompt_tokens, seconds=seconds,
                    peak_cache_bytes=rollout.peak_cache_bytes, edges=int(rollout.adjacency.sum()))
            for ex, rollout, answer, detail in zip(batch, rows.rollouts, answers, details, strict=True)
        ]

    def _run_api(self, method: str, batch, start: float) -> list[dict]:
        from gcache.modes import api_text_mas

        if self.module.generator_mode is None:
            raise ValueError(f"method {method!r} needs an API endpoint: use mode=hybrid or mode=api_hint")
        n = self.module.roster.num_agents
        adjacency = fixed_adjacency(self.baseline_topology, n).expand(len(batch), -1, -1)
        results = api_text_mas(
            self.module.generator_mode.client, self.module.roster, [ex.question for ex in batch], adjacency,
            list(range(len(batch))), self.module.task.answer_format,
            active=[] if method == "api_single" else self.module.active,
        )
        details = self.module.task.score_details([r["answer"] for r in results], list(batch))
        seconds = (time.perf_counter() - start) / len(batch)
        edges = 0 if method == "api_single" else int(adjacency[0].sum())
        return [
            _record(ex, method, r["answer"], d, decoded_tokens=r["completion_tokens"],
                    prompt_tokens=r["prompt_tokens"], seconds=seconds, peak_cache_bytes=0, edges=edges)
            for ex, r, d in zip(batch, results, details, strict=True)
        ]


def evaluate(cfg: DictConfig, *, module=None) -> dict:
    """Run every method on the split's first `limit` questions; resumable; returns the report."""
    from tqdm.auto import tqdm

    from gcache.train import build_module, build_task, validate

    validate(cfg)
    methods = list(cfg.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; allowed: {list(METHODS)}")
    if "mismatched" in methods and cfg.batch_size < 2:
        raise ValueError("the mismatched control needs batch_size >= 2 (it swaps caches between questions)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = module.task if module is not None else build_task(cfg)
    examples = task.splits()[cfg.split]
    if cfg.limit:
        examples = examples[: cfg.limit]
    if module is None:
        module = build_module(cfg, task=task)
    trained = False
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        module.load_state_dict(state.get("state_dict", state))
        trained = True
    module.eval()
    evaluator = Evaluator(module, baseline_topology=cfg.baseline_topology, trained=trained,
                          agent_max_new_tokens=cfg.agent_max_new_tokens)
    results = out / "results.jsonl"
    done = {(r["id"], r["method"]) for r in repair_results(results)}
    todo = [(m, ex) for m in methods for ex in examples if (ex.id, m) not in done]
    log.info("%d of %d (question, method) pairs to run (%d done)", len(todo), len(methods) * len(examples), len(done))
    with tqdm(total=len(todo), desc="evaluate", disable=not todo) as bar:
        for method in methods:
            pending = [ex for m, ex in todo if m == method]
            for start in range(0, len(pending), cfg.batch_size):
                batch = pending[start : start + cfg.batch_size]
                if method == "mismatched" and len(batch) < 2:
                    batch = [*batch, *[ex for ex in examples if ex.id != batch[0].id][:1]]
                records = [r for r in evaluator.run(method, batch) if (r["id"], method) not in done]
                with results.open("a") as fh:
                    for record in records:
                        fh.write(json.dumps(record) + "\n")
                        done.add((record["id"], method))
                    fh.flush()
                    os.fsync(fh.fileno())
                bar.update(len(records))
    report = write_report(out, title=f"{task.name}: {len(examples)} questions, model {module.llm.name}")
    log.info("\n%s", report_markdown(report))
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    import sys

    from gcache.llm.api import ApiError
    from gcache.secrets import env_secrets, install_secret_filter, load_dotenv
    from gcache.train import EXIT_BAD_INPUT, ConfigError, setup_errors_as_config_errors

    load_dotenv()
    install_secret_filter(env_secrets())
    logging.captureWarnings(True)
    with open_dict(cfg):
        cfg.output_dir = cfg.get("output_dir") or os.getcwd()
    try:
        with setup_errors_as_config_errors():
            report = evaluate(cfg)
    except (ConfigError, ApiError) as exc:  # the message says what to fix; a traceback would bury it
        log.error("error: %s", exc)
        sys.exit(EXIT_BAD_INPUT)
    if cfg.logger and cfg.logger.get("_target_", "").endswith("WandbLogger"):
        import wandb

        from gcache.secrets import redacted_config

        run = wandb.init(project=cfg.logger.get("project", "gcache"), dir=cfg.output_dir, mode="offline",
                         config=redacted_config(cfg))
        columns = ["method", *next(iter(report["methods"].values())).keys()]
        table = wandb.Table(columns=columns)
        for name, stats in report["methods"].items():
            table.add_data(name, *[json.dumps(v) if isinstance(v, list) else v for v in stats.values()])
        run.log({"evaluation": table})
        run.finish()


if __name__ == "__main__":
    import sys

    from gcache.secrets import KEY_SOURCES, secret_overrides

    if keys := secret_overrides(sys.argv[1:]):
        print(f"error: {', '.join(keys)}: {KEY_SOURCES}", file=sys.stderr)
        sys.exit(2)
    main()

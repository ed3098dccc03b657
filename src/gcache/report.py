"""What an evaluation leaves behind: `results.jsonl` (one record per question and method, appended
as batches finish; a torn last line from a crash is dropped) and the report recomputed from it
alone: per-method accuracy with a 95% Wilson interval, costs and ratios against `text_mas`
(`report.json`, `report.md`, `report.png`). Methods whose answers came from an API model
(`api_*`, or any method under `mode=hybrid`/`api_hint`) also get API tokens and cost per
question and cost per correct answer (`api_columns`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcache.stats import wilson_interval

log = logging.getLogger(__name__)


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


API_COLUMNS = ("api_prompt_tokens_per_question", "api_completion_tokens_per_question",
               "api_cost_usd_per_question", "api_cost_usd_per_correct")  # the keys of `api_columns`


def api_columns(rows: Sequence[dict]) -> dict[str, Any]:
    """API tokens and USD per question and USD per correct answer (reward > 0.5) of one method's
    records; {} when none has API fields, cost None without a price or (per correct) without one."""
    rows = [r for r in rows if "api_prompt_tokens" in r]
    if not rows:
        return {}
    n = len(rows)
    costs = [r.get("api_cost_usd") for r in rows]
    cost = None if any(c is None for c in costs) else sum(costs)
    correct = sum(1 for r in rows if r["reward"] is not None and r["reward"] > 0.5)
    return dict(zip(API_COLUMNS, (
        sum(r["api_prompt_tokens"] for r in rows) / n,
        sum(r["api_completion_tokens"] for r in rows) / n,
        None if cost is None else cost / n,
        None if cost is None or not correct else cost / correct,
    ), strict=True))


def api_cells(stats: dict) -> list[str]:
    """The API columns of one method for a markdown table (`—` where there is nothing)."""
    def usd(value):
        return "—" if value is None else f"{value:.3g}"

    if "api_prompt_tokens_per_question" not in stats:
        return ["—"] * 3
    tokens = stats["api_prompt_tokens_per_question"] + stats["api_completion_tokens_per_question"]
    return [f"{tokens:.1f}", usd(stats["api_cost_usd_per_question"]), usd(stats["api_cost_usd_per_correct"])]


API_HEADERS = ["API tok/q", "USD/q", "USD/correct"]


def accuracy_counts(rewards: Sequence[float | None]) -> dict[str, Any]:
    """Accuracy as the exact fraction of the counts (a Python float of correct / scored, not a float32
    mean of batch means), with the counts: correct (the sum of rewards), scored (rewards that are not
    None) and questions."""
    scored = [float(r) for r in rewards if r is not None]
    total = math.fsum(scored)
    return {"accuracy": total / len(scored) if scored else None,
            "correct": int(total) if total.is_integer() else total, "scored": len(scored), "questions": len(rewards)}


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
            "judger_senders_per_question": sum(len(r.get("judger_senders", [])) for r in rows) / n,
            "agents_run_per_question": sum(r.get("agents_run", 0) for r in rows) / n,  # pruned agents cost nothing
            **api_columns(rows),
            "config": rows[0].get("config", {}),
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
    cols = ["method", "n", "accuracy", "95% CI", "decoded tok/q", "prompt tok/q", "agents run/q", "s/q",
            "peak KV MB", "speed× vs text", "decoded vs text"]
    with_api = any("api_prompt_tokens_per_question" in s for s in report["methods"].values())
    if with_api:
        cols += API_HEADERS
    lines = [f"# {title}".rstrip(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    def ratio(value):
        return "—" if value is None else f"{value:.2f}"

    for name, s in report["methods"].items():
        lines.append(
            f"| {name} | {s['questions']} | {s['accuracy']:.3f} | {s['ci95'][0]:.2f}–{s['ci95'][1]:.2f} | "
            f"{s['decoded_tokens_per_question']:.1f} | {s['prompt_tokens_per_question']:.1f} | "
            f"{s.get('agents_run_per_question', 0):.2f} | {s['seconds_per_question']:.2f} | "
            f"{s['peak_cache_bytes'] / 2**20:.1f} | "
            f"{ratio(s.get('speedup_vs_text_mas'))} | {ratio(s.get('decoded_tokens_vs_text_mas'))} |"
            + ("".join(f" {c} |" for c in api_cells(s)) if with_api else "")
        )
    configs = [(name, s["config"]) for name, s in report["methods"].items() if s.get("config")]
    if configs:
        lines += ["", "What each method ran:", ""]
        lines += [f"- `{name}`: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None)
                  for name, config in configs]
    settings = report.get("settings")
    if settings:
        lines += ["", f"Settings of the trained run ({settings['source']})" + (
            "; given on the command line instead: " + ", ".join(
                f"`{k}={v['given']}` (run: `{v['run']}`)" for k, v in settings["given"].items())
            if settings["given"] else ": all applied") + "."]
    return "\n".join(lines) + "\n"


def run_name(directory: str | Path) -> str:
    """A run's name for picture titles: its output directory's name, with its parents' for the
    numbered, per-seed or evaluation directories of a sweep or study (`0`, `seed1`, `seed1/eval`)."""
    path = Path(directory).resolve()
    parts = [path.name]
    while (parts[0].isdigit() or parts[0] == "eval" or (parts[0].startswith("seed") and parts[0][4:].isdigit())) \
            and path.parent != path and len(parts) < 3:
        path = path.parent
        parts.insert(0, path.name)
    return "/".join(parts)


def report_figure(report: dict, path: Path, title: str = ""):
    """report.png: accuracy (0-1, 95% Wilson interval, the value on each bar, a bar at 0 drawn as a
    line), seconds and decoded tokens per question by method; titled with `title` (task, questions,
    model) and the run (the output directory). Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gcache.stats import accuracy_bars

    names = list(report["methods"])
    stats = report["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    acc = [stats[m]["accuracy"] for m in names]
    pairs = list(zip(names, acc, strict=True))
    err = [[a - stats[m]["ci95"][0] for m, a in pairs], [stats[m]["ci95"][1] - a for m, a in pairs]]
    accuracy_bars(axes[0], names, acc, err, ["#4c72b0"] * len(names))
    axes[0].set_title("accuracy (95% CI)")
    axes[1].bar(names, [stats[m]["seconds_per_question"] for m in names], color="#dd8452")
    axes[1].set_title("seconds per question")
    axes[2].bar(names, [stats[m]["decoded_tokens_per_question"] for m in names], color="#55a868")
    axes[2].set_title("decoded tokens per question")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(" · ".join(part for part in (title, f"run {run_name(Path(path).parent)}") if part), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return fig


def write_report(out: Path, title: str = "", settings: dict | None = None) -> dict:
    """Recompute the report from results.jsonl and write report.json / .md / .png (atomically);
    `settings`: where a trained checkpoint's run settings came from and what the command line changed
    (`gcache.evaluate.adopt_run_settings`)."""
    report = summarize(read_results(out / "results.jsonl"))
    if settings is not None:
        report["settings"] = settings
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", report_markdown(report, title))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    if report["methods"]:
        report_figure(report, out / "report.png", title=title)
    return report

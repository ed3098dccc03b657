"""Pictures and files a reader can use alone (issue 30, point 10): titles with task, model and run;
forbidden edges apart from learned zeros; text that reads on its colour; accuracy on 0-1 with zero
bars seen; whole steps; one predictions schema for every method; history under summary.json's
names; every field documented in docs/outputs.md; progress lines during test and comparison."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache import callbacks
from gcache.build import CONF_DIR
from gcache.report import read_results, report_figure
from gcache.stats import history_rows, mcnemar_exact, study_figures, text_colour, wilson_interval
from gcache.tasks.base import Example

DOCS = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
TINY = ["model=tiny-random", "logger=csv", "task=lookup", "limit_train=4", "limit_val=2", "limit_test=4",
        "batch_size=2", "eval_batch_size=2", "policy.graphs_per_question=2", "rollout.latent_steps=2",
        "rollout.max_new_tokens=4", "rollout.cuda_graphs=static"]
# Every predictions record (test_predictions.jsonl, comparison.jsonl) holds at least these.
PREDICTION_KEYS = {"id", "method", "question", "reference", "answer", "extracted", "reward", "graph", "judger_senders",
                   "edges", "config"}


# ---- documentation coverage ------------------------------------------------------------------


def documented_names(text: str) -> list[re.Pattern]:
    """Every backticked name of the page, as a pattern: `<placeholder>` parts match any text."""
    names = set(re.findall(r"`([^`\n]+)`", text))
    return [re.compile("".join(".+" if part.startswith("<") else re.escape(part)
                               for part in re.split(r"(<[^<>]+>)", name) if part) + r"\Z") for name in names]


def undocumented(keys, text: str) -> set[str]:
    patterns = documented_names(text)
    return {key for key in keys if not any(p.match(key) for p in patterns)}


def all_keys(value, skip: tuple[str, ...] = ()) -> set[str]:
    """The keys of a JSON value and of every object nested in it (but inside the keys in `skip`)."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            if key not in skip:
                keys |= all_keys(item, skip)
    elif isinstance(value, list):
        for item in value:
            keys |= all_keys(item, skip)
    return keys


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SimpleNamespace:
    """A small training run (lookup, its default baselines) on the static token loops, then an
    evaluation of its checkpoint, with the log lines of both."""
    from gcache.evaluate import evaluate
    from gcache.train import run

    out = tmp_path_factory.mktemp("outputs") / "run7"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    logger, lines = logging.getLogger("gcache"), Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        summary = run(cfg)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            eval_cfg = compose(config_name="evaluate", overrides=[
                "model=tiny-random", f"ckpt_path={summary['checkpoint']}",
                "methods=[gcache,single,mismatched,text-oracle]"])
        with open_dict(eval_cfg):
            eval_cfg.output_dir = str(out / "eval")
            for key, value in (("limit", 4), ("limit_test", 4), ("batch_size", 2), ("eval_batch_size", 2)):
                if key in eval_cfg:
                    eval_cfg[key] = value
        evaluate(eval_cfg, overrides=[])
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return SimpleNamespace(out=out, summary=summary, log=lines.messages)


def test_every_key_of_every_output_file_is_documented(smoke):
    out, text = smoke.out, DOCS.read_text()
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["comparison"].pop("methods")  # keyed by method name: their fields are the keys
    files = {
        "summary.json": all_keys(summary, skip=("overrides",)) | {"methods"} | all_keys(list(methods.values())),
        "history.jsonl": all_keys(_lines(out / "history.jsonl")),
        "test_predictions.jsonl": all_keys(_lines(out / "test_predictions.jsonl")),
        "comparison.jsonl": all_keys(_lines(out / "comparison.jsonl")),
        "completions": set().union(*(all_keys(_lines(p)) for p in (out / "completions").glob("step*.jsonl"))),
        "results.jsonl": all_keys(read_results(out / "eval" / "results.jsonl")),
    }
    assert "val/p_edge/Door Keeper -> Judger" in files["summary.json"]  # a placeholder's match
    assert {"static", "workspaces", "shapes"} <= files["summary.json"]  # the token loops' statistics
    assert {"subject", "agent_max_new_tokens"} <= files["results.jsonl"]  # a control's and text-oracle's config
    for name, keys in files.items():
        assert keys and not undocumented(keys, text), (name, sorted(undocumented(keys, text)))


def test_a_new_undocumented_field_is_found():
    text = "| `val/p_edge/<sender> -> <receiver>` | ... | `step`, `reward` |"
    assert undocumented({"step", "reward", "val/p_edge/A -> Judger"}, text) == set()
    assert undocumented({"step", "rewards", "val/p_edge/A"}, text) == {"rewards", "val/p_edge/A"}


# ---- one predictions schema -------------------------------------------------------------------


def test_test_predictions_and_comparison_share_one_schema_with_the_policys_rows(smoke):
    out, summary = smoke.out, smoke.summary
    predictions = _lines(out / "test_predictions.jsonl")
    comparison = _lines(out / "comparison.jsonl")
    assert len(predictions) == 4 and {r["method"] for r in predictions} == {"gcache"}
    # the policy's records first, as written in test_predictions.jsonl, then every baseline's
    assert comparison[: len(predictions)] == predictions
    methods = list(dict.fromkeys(r["method"] for r in comparison))
    assert methods == list(summary["comparison"]["methods"]) and methods[0] == "gcache" and len(methods) > 2
    schema = set(predictions[0])
    assert PREDICTION_KEYS <= schema
    for row in comparison:
        assert set(row) == schema, row["method"]
        assert row["question"].startswith("What is") and row["reference"]
    assert predictions[0]["config"]["graph"] == "learned" and predictions[0]["config"]["checkpoint"] == summary["checkpoint"]
    # the evaluation's records of the same checkpoint: the same fields
    results = read_results(out / "eval" / "results.jsonl")
    assert set(results[0]) == schema
    mine = {r["id"]: r for r in results if r["method"] == "gcache"}
    same = ("question", "answer", "extracted", "reward", "graph", "judger_senders", "edges")
    for row in predictions:
        assert {k: mine[row["id"]][k] for k in same} == {k: row[k] for k in same}


def test_the_comparison_in_summary_json_is_computed_from_comparison_jsonl(smoke):
    rows = _lines(smoke.out / "comparison.jsonl")
    rewards = {}
    for row in rows:
        rewards.setdefault(row["method"], []).append(row["reward"])
    for method, entry in smoke.summary["comparison"]["methods"].items():
        values = rewards[method]
        assert entry["accuracy"] == sum(values) / len(values)
        assert entry["ci95"] == list(wilson_interval(sum(values), len(values)))
        if method != "gcache":
            p = mcnemar_exact([a > 0.5 for a in rewards["gcache"]], [b > 0.5 for b in values])["p_value"]
            assert entry["mcnemar_p_vs_gcache"] == p


# ---- history.jsonl ----------------------------------------------------------------------------


def test_history_uses_summary_json_names(smoke):
    history = _lines(smoke.out / "history.jsonl")
    val = smoke.summary["val"]
    assert [h["step"] for h in history] == [0, 2]
    assert all("p_oracle" not in h and "p_distractor" not in h for h in history)
    last = history[-1]
    for key in ("val/accuracy", "val/p_oracle", "val/p_distractor"):
        assert last[key] == pytest.approx(val[key]), key
    assert set(last) == {"step", "val/accuracy", "val/p_oracle", "val/p_distractor", "reward"}


def test_history_readers_accept_the_names_written_before():
    old = [{"step": 0, "val/accuracy": 0.5, "p_oracle": 0.4, "p_distractor": 0.6}]
    assert history_rows(old) == [{"val/p_oracle": 0.4, "val/p_distractor": 0.6, "step": 0, "val/accuracy": 0.5}]
    both = [{"step": 1, "p_oracle": 0.1, "val/p_oracle": 0.9}]
    assert history_rows(both)[0]["val/p_oracle"] == 0.9


# ---- progress lines ---------------------------------------------------------------------------


def test_the_test_split_and_its_comparison_log_their_progress(smoke):
    """The comparison's methods run on each test batch next to the trained policy: one line says which,
    on how many questions and batches; the test's progress lines count both."""
    baselines = [m for m in smoke.summary["comparison"]["methods"] if m != "gcache"]
    assert f"test: gcache and the comparison's {', '.join(baselines)} on 4 questions, 2 per batch" in smoke.log
    assert "test: 4/4 questions" in smoke.log
    assert any(line.startswith("test: 4 predictions in") for line in smoke.log)


def test_the_test_split_logs_questions_done(caplog):
    loader = SimpleNamespace(sampler=range(40))
    trainer = SimpleNamespace(is_global_zero=True, world_size=1, test_dataloaders=loader)
    progress = callbacks.ProgressLog()
    caplog.set_level(logging.INFO, logger="gcache.callbacks")
    progress.on_test_start(trainer, None)
    for index in range(5):
        progress.on_test_batch_end(trainer, None, None, [None] * 8, index)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test:")]
    assert lines == [f"test: {n}/40 questions" for n in (8, 16, 24, 32, 40)]
    caplog.clear()
    progress.on_test_start(trainer, None)  # 40 batches of 1: a line at each tenth, not at each batch
    for index in range(40):
        progress.on_test_batch_end(trainer, None, None, [None], index)
    assert [r.getMessage() for r in caplog.records] == [f"test: {n}/40 questions" for n in range(4, 41, 4)]


# ---- pictures ---------------------------------------------------------------------------------


def _integer_ticks(ax) -> bool:
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_text_colour_is_black_on_light_and_white_on_dark_cells():
    viridis = matplotlib.colormaps["viridis"]
    assert text_colour(viridis(0.99)) == "black"  # yellow: white text was unreadable
    assert text_colour(viridis(0.9)) == "black"
    assert text_colour(viridis(0.0)) == "white"  # dark purple
    assert text_colour(viridis(0.2)) == "white"
    assert text_colour((1, 1, 1, 1)) == "black" and text_colour((0, 0, 0, 1)) == "white"


class _Module:
    """What the picture callbacks read of a GCacheModule: three keepers and the judger, agent ->
    agent edges i < j and agent -> judger edges sampled."""

    def __init__(self) -> None:
        self.task = SimpleNamespace(name="lookup")
        self.llm = SimpleNamespace(name="tiny-random-0")
        self.roster = SimpleNamespace(roles=[SimpleNamespace(name=f"Keeper {i}") for i in range(3)],
                                      judger=SimpleNamespace(name="Judger"))
        self.edge_mask = torch.ones(4, 4, dtype=torch.bool).triu(1)

    def learned_topology(self, question: str):
        probs = torch.zeros(4, 4)
        probs[0, 1], probs[0, 3], probs[1, 3], probs[2, 3] = 0.99, 0.0, 0.2, 0.6
        return probs, probs > 0.5


def _captured(monkeypatch, name: str) -> list:
    figures, original = [], getattr(callbacks, name)

    def keep(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(callbacks, name, keep)
    return figures


def test_topology_picture_titles_task_model_run_and_marks_forbidden_edges(tmp_path, monkeypatch):
    figures = _captured(monkeypatch, "topology_figure")
    example = Example(id="lookup/7", question="What is the code of the white door?", answer="613")
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=4, loggers=[])
    callbacks.TopologyPictures(tmp_path / "run7" / "topology", example).on_validation_epoch_end(trainer, _Module())
    assert (tmp_path / "run7" / "topology" / "step000004.png").is_file()
    (fig,) = figures
    title = fig._suptitle.get_text()
    assert "task lookup" in title and "model tiny-random-0" in title and "run run7" in title
    assert "validation question lookup/7" in title
    matrix = fig.axes[0]
    forbidden = [p for p in matrix.patches if p.get_gid() == "forbidden"]
    assert len(forbidden) == 16 - 6 and all(p.get_hatch() for p in forbidden)  # 6 edges i < j allowed
    cells = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in forbidden}  # (column, row)
    assert (0, 0) in cells and (0, 3) in cells and (0, 1) in cells and (3, 0) not in cells
    numbers = {(round(t.get_position()[0]), round(t.get_position()[1])): t for t in matrix.texts}
    assert not set(numbers) & cells  # no number on a forbidden cell
    assert numbers[(3, 0)].get_text() == "0.00" and numbers[(3, 0)].get_color() == "white"  # a learned zero
    assert numbers[(1, 0)].get_text() == "0.99" and numbers[(1, 0)].get_color() == "black"  # on yellow
    legend = " ".join(t.get_text() for leg in fig.legends for t in leg.get_texts())
    assert "not allowed by the topology" in legend


def test_fixed_judger_edges_are_written_fixed_not_as_learned_probabilities():
    probs = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    allowed = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    fixed = torch.tensor([[False, False, True], [False, False, True], [False, False, False]])
    fig = callbacks.topology_figure(probs, probs > 0.5, ["A", "B", "Judger"], allowed=allowed, fixed=fixed)
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in fig.axes[0].texts}
    assert texts == {(1, 0): "0.30", (2, 0): "fixed", (2, 1): "fixed"}
    assert sum(p.get_gid() == "forbidden" for p in fig.axes[0].patches) == 9 - 3
    matplotlib.pyplot.close(fig)


def test_learning_curve_titles_run_says_its_reward_window_and_has_whole_steps(tmp_path, monkeypatch):
    figures = _captured(monkeypatch, "learning_curve_figure")
    history = callbacks.History(tmp_path / "run7")
    metrics = {"val/accuracy": torch.tensor(0.5), "val/p_oracle": torch.tensor(0.7),
               "val/p_distractor": torch.tensor(0.2)}
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=0, callback_metrics=metrics)
    history.on_validation_end(trainer, _Module())
    for step, reward in ((1, 0.25), (2, 0.75)):
        trainer.global_step, metrics["train/reward"] = step, torch.tensor(reward)
        history.on_train_batch_end(trainer, None, None, None, step - 1)
    history.on_validation_end(trainer, _Module())
    rows = _lines(tmp_path / "run7" / "history.jsonl")
    assert rows[-1] == {"step": 2, "val/accuracy": 0.5, "val/p_oracle": pytest.approx(0.7),
                        "val/p_distractor": pytest.approx(0.2), "reward": 0.5}
    fig = figures[-1]
    assert fig._suptitle.get_text() == "task lookup · model tiny-random-0 · run run7"
    accuracy, edges = fig.axes
    labels = [line.get_label() for line in accuracy.lines]
    assert any("mean over the steps since the previous point" in label and "sampled graphs" in label
               for label in labels), labels
    assert _integer_ticks(accuracy) and _integer_ticks(edges)  # steps 0 and 2: no 0.25-step ticks
    assert [line.get_label() for line in edges.lines] == ["p(oracle edges)", "p(distractor edges into the judger)"]


def test_report_png_has_a_title_an_accuracy_axis_0_to_1_and_zero_bars_seen(tmp_path):
    methods = {name: {"accuracy": acc, "ci95": [max(acc - 0.1, 0.0), acc + 0.1], "seconds_per_question": 0.1,
                      "decoded_tokens_per_question": 4.0} for name, acc in (("single", 0.0), ("gcache", 0.4))}
    (tmp_path / "eval3").mkdir()
    fig = report_figure({"methods": methods}, tmp_path / "eval3" / "report.png",
                        title="lookup: 4 questions, model tiny-random-0")
    assert (tmp_path / "eval3" / "report.png").is_file()
    title = fig._suptitle.get_text()
    assert "lookup" in title and "model tiny-random-0" in title and "run eval3" in title
    accuracy = fig.axes[0]
    assert accuracy.get_ylim() == (0.0, 1.0)  # not autoscaled to the largest bar
    zero = [line for line in accuracy.lines if line.get_gid() == "zero-bar"]
    assert len(zero) == 1 and list(zero[0].get_ydata()) == [0, 0] and zero[0].get_linewidth() >= 3
    assert {t.get_text() for t in accuracy.texts} == {"0.00", "0.40"}


def test_study_figures_title_the_study_and_use_whole_steps_and_0_to_1(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep them open to read
    histories = {s: [{"step": 0, "val/accuracy": 0.25, "val/p_oracle": 0.5, "val/p_distractor": 0.5},
                     {"step": 2, "val/accuracy": 0.5, "p_oracle": 0.9, "p_distractor": 0.1}]  # an older file's names
                 for s in (0, 1)}
    summary = {"reference": "gcache", "methods": {
        "gcache": {"accuracy": 0.5, "ci95": [0.3, 0.7], "per_seed": [{"accuracy": 0.5}]},
        "single": {"accuracy": 0.0, "ci95": [0.0, 0.2], "per_seed": [{"accuracy": 0.0}]}}}
    paths = study_figures(summary, histories, tmp_path / "study3", title="lookup: tiny-random-0, seeds 0, 1")
    assert [p.name for p in paths] == ["curves.png", "edges.png", "comparison.png"]
    curves, edges, comparison = figures
    for fig in figures:
        title = fig._suptitle.get_text()
        assert "lookup: tiny-random-0" in title and "study study3" in title
    assert _integer_ticks(curves.axes[0]) and _integer_ticks(edges.axes[0])
    assert len(edges.axes[0].lines) == 4 and max(edges.axes[0].lines[0].get_ydata()) == 0.9  # old names read
    assert comparison.axes[0].get_ylim() == (0.0, 1.0)
    assert [line.get_gid() for line in comparison.axes[0].lines].count("zero-bar") == 1
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


# ---- the comparison's work shared with the test split -----------------------------------------


def test_the_comparison_runs_on_the_test_batches_sharing_agents_and_gives_what_each_method_alone_gives(
        tmp_path, monkeypatch):
    """The baselines run on each test batch next to the policy (`TestComparison`): oracle reads the keeper the
    policy's graph already ran, single, fixed-full and oracle run as one batch of rows. Without any sharing
    (`share_methods=false`, no memo) every record is the same and more agents are computed."""
    from gcache.rollout import RolloutEngine
    from gcache.train import run

    computed = {"shared": 0, "alone": 0}
    real_run = RolloutEngine.run

    def counting(self, *args, **kwargs):
        batch = real_run(self, *args, **kwargs)
        if not kwargs.get("keep_judger_inputs"):  # not a training step's (validations: the same in both runs)
            computed[mode] += batch.prefills
        return batch

    monkeypatch.setattr(RolloutEngine, "run", counting)
    records = {}
    for mode, extra in (("shared", []), ("alone", ["share_methods=false"])):
        if mode == "alone":
            monkeypatch.setattr(RolloutEngine, "_memo_key", lambda self, *args: object())  # never shared
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*TINY, "validate_at_start=false", "eval_batch_size=null",
                                                          *extra])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / mode)
        computed[mode] = 0
        run(cfg)
        records[mode] = [{**{k: v for k, v in r.items() if k != "seconds"},  # (the run's own directory:)
                          "config": {**r["config"], "checkpoint": str(r["config"]["checkpoint"]).replace(mode, "run")}}
                         for r in _lines(tmp_path / mode / "comparison.jsonl")]
    assert records["shared"] == records["alone"]
    assert {r["method"] for r in records["shared"]} == {"gcache", "single", "fixed-full", "oracle"}
    assert computed["shared"] < computed["alone"], computed

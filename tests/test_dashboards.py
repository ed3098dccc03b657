"""What a run leaves for dashboards, read back from the files: each validation's completions table,
edge probabilities over time and the final comparison, in an offline W&B run and in CSV."""

from __future__ import annotations

import csv
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache.build import CONF_DIR
from gcache.callbacks import Completions
from gcache.train import run

# lookup: four keepers, an oracle graph, agent -> judger edges sampled (topology=debate).
TINY = ["model=tiny-random", "limit_train=4", "limit_val=2", "limit_test=2", "batch_size=2",
        "policy.graphs_per_question=2", "rollout.latent_steps=2", "rollout.max_new_tokens=4", "val_every_n_steps=2"]
KEEPERS = ("Door", "Locker", "Train", "Room")
EDGES = [f"val/p_edge/{keeper} Keeper -> Judger" for keeper in KEEPERS]
VALIDATION_STEPS = [0, 2]  # validate_at_start, then the end of the 2-step epoch
# The loggers use the same step count as the completions, topology pictures and history.jsonl: the
# training steps completed (Lightning's own default logs the last validation at the step's index, 1).
METRIC_STEPS = VALIDATION_STEPS


def _run(tmp_path: Path, logger: str) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, f"logger={logger}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return run(cfg)


def _check_completions(rows: list[dict], step: int, *, files: bool = True) -> None:
    """`files`: the step<N>.jsonl files, which also hold what the judger read (the W&B table does not)."""
    assert len(rows) == 2 and list(rows[0]) == [*Completions.COLUMNS, *(Completions.EXTRA if files else ())]
    for row in rows:
        assert row["step"] == step and row["id"].startswith("lookup/") and row["question"].startswith("What is")
        assert row["graph"] == "(the judger alone)" or "-> Judger" in row["graph"]
        assert row["reference"] and row["reward"] in (0.0, 1.0) and "extracted" in row
        if not files:
            continue
        # The agents the judger read are the graph's senders into it; the oracle: one keeper -> the judger.
        readers = sorted(KEEPERS.index(e.split(" ")[0]) for e in row["graph"].split(", ") if e.endswith("-> Judger"))
        assert sorted(row["judger_senders"]) == readers
        ((keeper, judger),) = row["oracle_edges"]
        assert judger == -1 and 0 <= keeper < 4


def wandb_records(path: Path):
    """The records of a `.wandb` file: a 7-byte W&B header (`:W&B`, magic, version), then the LevelDB
    log format (32 KiB blocks; chunks with a 7-byte header: crc32, length, type full/first/middle/last)
    of serialized `wandb_internal_pb2.Record`s, the protocol `wandb sync` uploads. A chunk's crc32 covers
    its type byte and its bytes; reading stops at the first chunk not yet written whole."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return  # W&B's service is still writing this chunk: the records before it are whole
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_records(run_dir: Path) -> list:
    """The records of an offline W&B run, once all are written. W&B's service process may still be writing
    the file when the run has returned: read it again (for up to 60 s) until the run's last record, `exit`,
    is in it."""
    for _ in range(120):
        records = list(wandb_records(next(run_dir.glob("run-*.wandb"))))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.5)
    raise AssertionError(f"{run_dir}: no exit record after 60 s")


def _read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """History rows and the final summary of an offline W&B run."""
    history, final = [], {}
    for record in run_records(run_dir):
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else []
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        if kind == "history":
            history.append(values)
        elif kind == "summary":
            final.update(values)
    return history, final


def test_an_offline_wandb_run_holds_completions_tables_edge_series_and_the_comparison(tmp_path):
    summary = _run(tmp_path, "wandb")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history, final = _read_run(run_dir)

    # Edge probabilities over time: one series per agent -> judger edge, and oracle vs distractor.
    for key in [*EDGES, "val/p_oracle", "val/p_distractor"]:
        points = [(row["trainer/global_step"], row[key]) for row in history if key in row]
        assert [step for step, _ in points] == METRIC_STEPS, key
        assert all(0.0 < p < 1.0 for _, p in points), key

    # A completions table per validation, its rows in the run's files.
    tables = [row for row in history if "val/completions/path" in row or "val/completions" in row]
    assert len(tables) == len(VALIDATION_STEPS)
    for row, step in zip(tables, VALIDATION_STEPS, strict=True):
        meta = row.get("val/completions") or {k.split("/")[-1]: v for k, v in row.items()
                                              if k.startswith("val/completions/")}
        assert meta["_type"] == "table-file" and meta["nrows"] == 2
        table = json.loads((run_dir / "files" / meta["path"]).read_text())
        _check_completions([dict(zip(table["columns"], values, strict=True)) for values in table["data"]], step,
                           files=False)

    # The final comparison: metrics, a table and the run summary.
    comparison = summary["comparison"]
    assert set(comparison["methods"]) == {"gcache", "single", "fixed-full", "oracle"}
    assert final["comparison"] == comparison
    for method, entry in comparison["methods"].items():
        assert final[f"compare/{method}/accuracy"] == pytest.approx(entry["accuracy"])
    (table_file,) = (run_dir / "files" / "media" / "table" / "compare").glob("table_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == list(comparison["methods"])

    # gcache starts the run (not Lightning): Lightning's x-axis is still every metric's step.
    records = run_records(run_dir)
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "trainer/global_step" for m in metrics)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "gcache"


def test_evaluate_logs_its_report_to_an_offline_wandb_run(tmp_path):
    from gcache.evaluate import _evaluate_command

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "model=tiny-random", "task=lookup", "limit_test=2", "eval_batch_size=2", "rollout.latent_steps=1",
            "rollout.max_new_tokens=2", "methods=[single,fixed-full]", "logger=wandb"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    report = _evaluate_command(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run,) = [r.run for r in run_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.job_type) == ("gcache", "evaluate")
    (table_file,) = (run_dir / "files" / "media" / "table").glob("evaluation_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == list(report["methods"]) == ["single", "fixed-full"]


def test_a_csv_run_holds_completions_files_edge_series_and_the_comparison(tmp_path):
    summary = _run(tmp_path, "csv")
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    for key in [*EDGES, "val/p_oracle", "val/p_distractor"]:
        points = [(int(row["step"]), float(row[key])) for row in rows if row.get(key)]
        assert [step for step, _ in points] == METRIC_STEPS, key
        assert all(0.0 < p < 1.0 for _, p in points), key
    compared = {key: float(value) for row in rows for key, value in row.items()
                if key.startswith("compare/") and value}
    for method, entry in summary["comparison"]["methods"].items():
        assert compared[f"compare/{method}/accuracy"] == pytest.approx(entry["accuracy"])

    for step in VALIDATION_STEPS:
        path = tmp_path / "completions" / f"step{step:06d}.jsonl"
        _check_completions([json.loads(line) for line in path.read_text().splitlines()], step)

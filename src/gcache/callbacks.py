"""Lightning callbacks: pictures of the learned topology, the completions table and the learning
curve after each validation, progress lines, and a clean stop on Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

log = logging.getLogger(__name__)


def topology_figure(probs: torch.Tensor, adjacency: torch.Tensor, names: list[str], title: str = ""):
    """Left: edge-probability matrix (N+1, N+1), the judger last; right: the deterministic graph."""
    n = probs.shape[0]
    fig, (ax_m, ax_g) = plt.subplots(1, 2, figsize=(10, 4.5))
    image = ax_m.imshow(probs.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax_m.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax_m.set_yticks(range(n), names, fontsize=7)
    ax_m.set_xlabel("receiver")
    ax_m.set_ylabel("sender")
    for i in range(n):
        for j in range(n):
            ax_m.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax_m, fraction=0.046)
    ax_m.set_title("edge probability")
    xy = [(math.cos(2 * math.pi * i / n + math.pi / 2), math.sin(2 * math.pi * i / n + math.pi / 2)) for i in range(n)]
    for i in range(n):
        for j in range(n):
            if bool(adjacency[i, j]):
                ax_g.annotate(
                    "", xy=xy[j], xytext=xy[i],
                    arrowprops=dict(arrowstyle="-|>", lw=1 + 2 * float(probs[i, j]), shrinkA=18, shrinkB=18),
                )
    for i, (x, y) in enumerate(xy):
        ax_g.scatter([x], [y], s=900, color="#cde", zorder=2)
        ax_g.text(x, y, names[i].replace(" ", "\n"), ha="center", va="center", fontsize=7, zorder=3)
    ax_g.set_xlim(-1.5, 1.5)
    ax_g.set_ylim(-1.5, 1.5)
    ax_g.axis("off")
    ax_g.set_title("deterministic graph (p > 0.5)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


class TopologyPictures(L.Callback):
    """After each validation: save (and log to W&B) the policy's edge probabilities and graph
    for one fixed validation question, named in the picture's title (its id and text)."""

    def __init__(self, directory: str | Path, example) -> None:
        self.directory = Path(directory)
        self.example = example  # a `gcache.tasks.base.Example` of the validation split

    def title(self, step: int) -> str:
        question = " ".join(self.example.question.split())
        shown = question if len(question) <= 90 else question[:89] + "…"
        return f"step {step}: validation question {self.example.id}\n{shown}"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        probs, adjacency = pl_module.learned_topology(self.example.question)
        names = [role.name for role in pl_module.roster.roles] + [pl_module.roster.judger.name]
        fig = topology_figure(probs, adjacency, names, title=self.title(trainer.global_step))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step{trainer.global_step:06d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="topology", images=[str(path)], step=trainer.global_step)
        log.info("topology picture: %s", path)


class Completions(L.Callback):
    """After each validation: the validation questions' completions (`GCacheModule.completion_records`,
    the first `max_rows` of rank 0's shard) to `<directory>/step<N>.jsonl` and, with W&B, to the
    table `val/completions` at that step."""

    COLUMNS = ("step", "id", "question", "graph", "answer", "extracted", "reference", "reward")
    EXTRA = ("judger_senders", "oracle_edges")  # in the files only: what the judger read, against the oracle

    def __init__(self, directory: str | Path, max_rows: int = 32) -> None:
        self.directory = Path(directory)
        self.max_rows = max_rows

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        rows = pl_module.val_records[: self.max_rows]
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step{trainer.global_step:06d}.jsonl"
        path.write_text("".join(json.dumps({c: r[c] for c in (*self.COLUMNS, *self.EXTRA)}) + "\n" for r in rows))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_table(key="val/completions", columns=list(self.COLUMNS),
                                 data=[[r[c] for c in self.COLUMNS] for r in rows], step=trainer.global_step)


class ProgressLog(L.Callback):
    """A log line every `every_n_steps` training steps (and at the last): step, reward, the last
    validation accuracy, edges and judger senders per graph, seconds per step and time left.
    For runs without a TTY (nohup, Slurm), where a progress bar shows nothing useful."""

    def __init__(self, every_n_steps: int = 5) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._first_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        if not trainer.is_global_zero or (step % self.every_n_steps and step != total):
            return
        metrics = trainer.callback_metrics
        per_step = (time.perf_counter() - self._start) / max(step - self._first_step, 1)
        left = per_step * max(total - step, 0) if math.isfinite(total) else float("nan")

        def value(key: str, fmt: str = "{:.2f}") -> str:
            return fmt.format(float(metrics[key])) if key in metrics else "—"

        log.info(
            "step %d/%s  reward %s  val acc %s  edges/graph %s  judger senders %s  %.1f s/step  ~%s left",
            step, total if math.isfinite(total) else "?", value("train/reward"), value("val/accuracy"),
            value("train/edges_per_graph", "{:.1f}"), value("train/judger_senders", "{:.1f}"), per_step,
            "?" if math.isnan(left) else f"{int(left // 60)}m{int(left % 60):02d}s",
        )


class History(L.Callback):
    """After each validation: append step, validation accuracy, the mean training reward since the
    last validation and the oracle / distractor edge probabilities (tasks with an oracle graph) to
    `history.jsonl`, and redraw `learning_curve.png` from it."""

    KEYS = {"val/accuracy": "val/accuracy", "val/p_oracle": "p_oracle", "val/p_distractor": "p_distractor"}

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/reward" in trainer.callback_metrics:
            self._rewards.append(float(trainer.callback_metrics["train/reward"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step}
        row.update({name: float(metrics[key]) for key, name in self.KEYS.items() if key in metrics})
        if self._rewards:
            row["reward"] = sum(self._rewards) / len(self._rewards)
            self._rewards = []
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in (self.directory / "history.jsonl").read_text().splitlines() if line]
        fig = learning_curve_figure(rows)
        fig.savefig(self.directory / "learning_curve.png", dpi=80)
        plt.close(fig)


def learning_curve_figure(rows: list[dict]):
    """Validation accuracy and training reward (left), oracle vs distractor edge probability (right)."""
    fig, (ax_a, ax_p) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("val/accuracy", "validation accuracy"), ("reward", "training reward")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_a.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.set_xlabel("step")
    ax_a.legend(fontsize=8)
    ax_a.set_title("accuracy")
    for key, style in (("p_oracle", "-"), ("p_distractor", "--")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_p.plot(*zip(*points, strict=True), style, marker="o", label=key)
    ax_p.set_ylim(-0.02, 1.02)
    ax_p.set_xlabel("step")
    ax_p.set_title("edge probability into the judger")
    if ax_p.lines:
        ax_p.legend(fontsize=8)
    fig.tight_layout()
    return fig


class StopOnSignal(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM stops training at the next batch boundary, on every rank at
    the same batch, after a checkpoint. A second Ctrl-C raises KeyboardInterrupt at once.

    Lightning 2.6 handles SIGTERM itself (`trainer/connectors/signal_connector.py`): its handler
    sets `received_sigterm`, the loops raise `SIGTERMException` after the batch, and
    `ModelCheckpoint(save_on_exception=True)` saves in `on_exception`. But under DDP that handler
    also calls `dist.broadcast` from inside the signal handler, i.e. wherever the signal lands,
    and with ranks in different collectives the job hangs (reproduced here with two gloo ranks:
    rank 0 in the handler's broadcast, rank 1 in the step's all-reduce). Ctrl-C, for its part,
    raises KeyboardInterrupt wherever it lands, even inside the optimiser step. So once
    Lightning has registered its handlers (`on_*_start` runs after that), this callback replaces
    the SIGINT and SIGTERM handlers with ones that only record the signal; after each batch the
    ranks agree, with one all-reduce, whether any of them was signalled, and all raise
    `SIGTERMException` at that same point. Lightning's teardown restores the previous handlers.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._record)
            signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        # A plain write to stderr: logging from a signal handler can re-enter a handler mid-write.
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        os.write(2, f"{signal.Signals(signum).name}: stopping after the current batch{again}\n".encode())

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            log.warning("%s: saving a checkpoint at step %d and stopping",
                        signal.Signals(self.received or signal.SIGTERM).name, trainer.global_step)
            raise SIGTERMException

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._install()

    def on_test_start(self, trainer, pl_module) -> None:
        self._install()

    def on_train_batch_end(self, trainer, *args) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_batch_end(self, trainer, *args) -> None:
        self._stop_if_signalled(trainer)

    def on_test_batch_end(self, trainer, *args) -> None:
        self._stop_if_signalled(trainer)

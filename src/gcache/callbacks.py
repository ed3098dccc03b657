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

from gcache.report import run_name  # noqa: E402
from gcache.stats import history_rows, integer_steps, text_colour  # noqa: E402

log = logging.getLogger(__name__)


def run_title(task: str, model: str, run: str) -> str:
    """The first line of every picture of a run: what it trained, on which model, and which run."""
    return f"task {task} · model {model} · run {run}"


def _module_title(pl_module, directory: str | Path) -> str:
    return run_title(pl_module.task.name, pl_module.llm.name, run_name(directory))


def topology_figure(probs: torch.Tensor, adjacency: torch.Tensor, names: list[str], title: str = "",
                    allowed: torch.Tensor | None = None, fixed: torch.Tensor | None = None):
    """Left: edge-probability matrix (N+1, N+1), the judger last; right: the deterministic graph.

    `allowed` (N+1, N+1) bool: the edges the policy samples (its topology mask); the others are
    drawn hatched grey without a number, not as learned zeros. `fixed`: edges always present and not
    learned (agent -> judger under `judger_edges=all`), written "fixed". Numbers are black or white,
    whichever reads on their cell's colour (`text_colour`). Default: every edge allowed, none fixed."""
    from matplotlib.patches import Patch, Rectangle

    n = probs.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool) if allowed is None else allowed.bool().cpu()
    fixed = torch.zeros(n, n, dtype=torch.bool) if fixed is None else fixed.bool().cpu() & ~allowed
    fig, (ax_m, ax_g) = plt.subplots(1, 2, figsize=(10, 5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    shown = torch.where(allowed | fixed, probs.float(), torch.full_like(probs, float("nan"), dtype=torch.float))
    image = ax_m.imshow(shown.numpy(), vmin=0, vmax=1, cmap=cmap)
    ax_m.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax_m.set_yticks(range(n), names, fontsize=7)
    ax_m.set_xlabel("receiver")
    ax_m.set_ylabel("sender")
    for i in range(n):
        for j in range(n):
            if allowed[i, j] or fixed[i, j]:
                value = float(probs[i, j])
                ax_m.text(j, i, "fixed" if fixed[i, j] else f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color=text_colour(cmap(value)))
            else:  # not in the topology: no probability to learn
                ax_m.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.6",
                                         hatch="///", lw=0, gid="forbidden"))
    fig.colorbar(image, ax=ax_m, fraction=0.046)
    ax_m.set_title("edge probability")
    handles = [Patch(facecolor="0.85", edgecolor="0.6", hatch="///", label="not allowed by the topology")]
    if bool(fixed.any()):
        handles.append(Patch(facecolor=cmap(1.0), label="fixed: always present, not learned"))
    fig.legend(handles=handles, loc="lower left", ncol=len(handles), fontsize=7, frameon=False)
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
    fig.tight_layout(rect=(0, 0.09, 1, 1))  # the legend below
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
        allowed = pl_module.edge_mask.cpu()  # what the policy samples; fixed: present without being sampled
        title = f"{_module_title(pl_module, self.directory.parent)}\n{self.title(trainer.global_step)}"
        fig = topology_figure(probs, adjacency, names, title=title, allowed=allowed, fixed=adjacency.cpu() & ~allowed)
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
    validation accuracy, edges and judger senders per graph, seconds per step and time left; and
    during the test split, about every tenth of its batches and at the last, the questions done
    ("test: 8/40 questions"). For runs without a TTY (nohup, Slurm), where a progress bar shows
    nothing useful."""

    def __init__(self, every_n_steps: int = 5) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._first_step = 0
        self._tested = 0

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

    def on_test_start(self, trainer, pl_module) -> None:
        self._tested = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._tested += len(batch)
        if not trainer.is_global_zero:
            return
        loaders = trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:  # this rank's questions (its share under DDP)
            total = sum(len(loader.sampler) for loader in loaders)
        except (TypeError, AttributeError):
            total = None
        if progress_due(self._tested, len(batch), total):
            ranks = f" (rank 0's share, {trainer.world_size} ranks)" if trainer.world_size > 1 else ""
            log.info("test: %d/%s questions%s", self._tested, "?" if total is None else total, ranks)


def progress_due(done: int, last: int, total: int | None) -> bool:
    """Whether a progress line is due after `last` more items brought the count to `done` of
    `total`: at the end and whenever another tenth is passed (always when the total is unknown)."""
    if not total or done >= total:
        return True
    return done * 10 // total > (done - last) * 10 // total


class History(L.Callback):
    """After each validation: append step, validation accuracy, the mean training reward since the
    last validation and the oracle / distractor edge probabilities (tasks with an oracle graph) to
    `history.jsonl`, under summary.json's names (`val/accuracy`, `val/p_oracle`, `val/p_distractor`;
    docs/outputs.md), and redraw `learning_curve.png` from it."""

    KEYS = ("val/accuracy", "val/p_oracle", "val/p_distractor")

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
        row.update({key: float(metrics[key]) for key in self.KEYS if key in metrics})
        if self._rewards:
            row["reward"] = sum(self._rewards) / len(self._rewards)
            self._rewards = []
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in (self.directory / "history.jsonl").read_text().splitlines() if line]
        fig = learning_curve_figure(rows, title=_module_title(pl_module, self.directory))
        fig.savefig(self.directory / "learning_curve.png", dpi=80)
        plt.close(fig)


# What the "reward" of history.jsonl is (`History`): the window of its mean, said on the curve.
REWARD_LABEL = "training reward (mean over the steps since the previous point;\neach step: mean over its sampled graphs)"


def learning_curve_figure(rows: list[dict], title: str = ""):
    """Validation accuracy and training reward (left), oracle vs distractor edge probability (right),
    over whole training steps. Rows may use history.jsonl's names before issue 30 (`p_oracle`)."""
    rows = history_rows(rows)
    fig, (ax_a, ax_p) = plt.subplots(1, 2, figsize=(10, 4.2))
    for key, label in (("val/accuracy", "validation accuracy"), ("reward", REWARD_LABEL)):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_a.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.set_xlabel("training step")
    ax_a.legend(fontsize=7)
    ax_a.set_title("accuracy")
    for key, style, label in (("val/p_oracle", "-", "p(oracle edges)"),
                              ("val/p_distractor", "--", "p(distractor edges into the judger)")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_p.plot(*zip(*points, strict=True), style, marker="o", label=label)
    ax_p.set_ylim(-0.02, 1.02)
    ax_p.set_xlabel("training step")
    ax_p.set_title("validation: edge probability into the judger")
    if ax_p.lines:
        ax_p.legend(fontsize=7)
    for ax in (ax_a, ax_p):
        integer_steps(ax)
    fig.suptitle(title, fontsize=9)
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

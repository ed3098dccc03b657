"""Lightning callbacks: pictures of the learned topology after each validation."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)


def topology_figure(probs: torch.Tensor, adjacency: torch.Tensor, names: list[str], title: str = ""):
    """Left: edge-probability matrix (N, N); right: the deterministic graph (edges p > 0.5)."""
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
    for one fixed question."""

    def __init__(self, directory: str | Path, question: str) -> None:
        self.directory = Path(directory)
        self.question = question

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        from gcache.policy.graph_policy import deterministic_dag

        probs = pl_module.edge_probability_matrix(self.question)
        n = probs.shape[0]
        mask = (pl_module.agent_mask & pl_module._active_mask()).cpu()
        with torch.no_grad():
            logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))[None]
            adjacency = deterministic_dag(logits, mask)[0]
        names = [role.name for role in pl_module.roster.roles][:n]
        fig = topology_figure(probs, adjacency, names, title=f"step {trainer.global_step}")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step{trainer.global_step:06d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="topology", images=[str(path)], step=trainer.global_step)
        log.info("topology picture: %s", path)

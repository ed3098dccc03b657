"""TaskDataModule: a task's train/val/test splits as Lightning dataloaders of `Example` lists.

The training order is a pure function of (seed, epoch): every rank computes the same
permutation and takes its own shard (`ShardSampler`). A checkpoint records how many batches
of the epoch were trained on, so a run resumed mid-epoch continues with the next batch the
uninterrupted run would have seen (Lightning restores the loop counters, not the data order).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from gcache.tasks.base import Example, Task

log = logging.getLogger(__name__)

# Lightning warns on every mid-epoch resume unless the DataLoader itself has state_dict /
# load_state_dict; here the datamodule carries that state (it needs the trainer's progress).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def _collate(batch: list[Example]) -> list[Example]:
    return batch


def eval_batch_size(questions: int, rows_per_question: int, max_rows: int) -> int:
    """Questions per evaluation batch, sized by rows: at most `max_rows` rows (the rollout's `max_batch`,
    what one forward pass takes) of `rows_per_question` each, and `questions` split into batches of
    equal size (40 questions at 32 rows: two batches of 20, not 32 and 8)."""
    if questions < 1:
        return 1
    cap = max(1, max_rows // max(rows_per_question, 1))
    return math.ceil(questions / math.ceil(questions / cap))


class ShardSampler(DistributedSampler):
    """This rank's shard of a split, in an order fixed by (seed, epoch), resumable mid-epoch.

    torch's `DistributedSampler` (epoch e is the permutation seeded with seed + e, the same on
    every rank; rank r takes positions r, r + R, ...; shards are padded to equal length by
    repeating the first indices) plus `skip_once(epoch, n)`: the next pass over `epoch` starts
    at its n-th index. Being a DistributedSampler, Lightning leaves it in place under DDP.
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._skip: tuple[int, int] | None = None  # (epoch, indices to skip) for one pass

    def skip_once(self, epoch: int, count: int) -> None:
        self._skip = (epoch, count)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1]:]
        self._skip = None
        return iter(indices)


class TaskDataModule(L.LightningDataModule):
    """Wraps a `Task`. `limit_*` caps how many questions of a split are used (None = all).

    `batch_size` is per rank: under DDP with R processes a step trains on R * batch_size questions.
    """

    def __init__(
        self,
        task: Task,
        *,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        eval_rows: int = 32,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size  # None: sized by rows (`eval_batch_size`), `eval_rows` per batch
        self.eval_rows = eval_rows
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.shuffle = shuffle
        self.seed = seed
        self._splits: dict[str, list[Example]] | None = None
        self._train_sampler: ShardSampler | None = None
        self._resume: dict[str, int] | None = None  # from a checkpoint, used by the next train_dataloader()

    def split(self, name: str) -> list[Example]:
        if self._splits is None:
            splits = self.task.splits()
            self._splits = {}
            for key, examples in splits.items():
                limit = self.limits.get(key)
                if limit is not None and limit < 1:
                    raise ValueError(f"limit_{key} must be >= 1 or null, got {limit}")
                self._splits[key] = examples[:limit] if limit else examples
                if not self._splits[key]:
                    raise ValueError(f"task {self.task.name!r}: the {key} split is empty")
            log.info(
                "task %s: %s", self.task.name, ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())
            )
        return self._splits[name]

    def _loader(self, name: str, batch_size: int, sampler: ShardSampler | None = None) -> DataLoader:
        # The loader's own generator: creating an iterator then never draws from the global RNG,
        # whose state a checkpoint restores.
        return DataLoader(
            self.split(name), batch_size=batch_size, sampler=sampler, collate_fn=_collate,
            generator=torch.Generator().manual_seed(self.seed), num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ShardSampler(self.split("train"), num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed)
        if self._resume:
            sampler.skip_once(self._resume["epoch"], self._resume["batches_done"] * self.batch_size)
            log.info("resuming epoch %d after %d batches", self._resume["epoch"], self._resume["batches_done"])
            self._resume = None
        self._train_sampler = sampler
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_size("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_size("test"))

    def eval_size(self, name: str) -> int:
        """Questions per validation / test batch: `eval_batch_size`, or sized by rows (one per question: the
        module evaluates one graph per question) over this rank's shard of the split."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        return eval_batch_size(math.ceil(len(self.split(name)) / world), 1, self.eval_rows)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch: the sampler's epoch and the batches whose
        optimiser step is done (Lightning's `processed` count, also right for a checkpoint
        written by an exception between two steps)."""
        trainer = self.trainer
        if trainer is None or self._train_sampler is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._train_sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

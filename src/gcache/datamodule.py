"""TaskDataModule: a task's train/val/test splits as Lightning dataloaders of `Example` lists."""

from __future__ import annotations

import logging

import lightning as L
from torch.utils.data import DataLoader

from gcache.tasks.base import Example, Task

log = logging.getLogger(__name__)


def _collate(batch: list[Example]) -> list[Example]:
    return batch


class TaskDataModule(L.LightningDataModule):
    """Wraps a `Task`. `limit_*` caps how many questions of a split are used (None = all)."""

    def __init__(
        self,
        task: Task,
        *,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
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
        self.eval_batch_size = eval_batch_size or batch_size
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.shuffle = shuffle
        self.seed = seed
        self._splits: dict[str, list[Example]] | None = None

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

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        import torch

        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.split(name), batch_size=batch_size, shuffle=shuffle, collate_fn=_collate,
            generator=generator, num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)

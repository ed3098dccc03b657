"""Prompt prefixes computed once: the KV cache of the start that many prompts share.

Every agent's prompt starts with the same chat header and role prompt (its system message) for
every question, sampled graph and step, and the judger's with its own; only the last message (the
facts, the question) changes. A `PrefixCache` (one per model, `LocalLM.prefix_cache`) prefills such
a prefix once, alone, at positions 0 … P−1 (one row), and a prompt with nothing before it (an agent
without senders, the judger alone) then prefills only what follows it, on the prefix
(`RolloutEngine._prefill_prompts`). A prompt on a past cannot reuse it: there the prefix's tokens
attend to the past, so their keys and values differ. The prefix's ids are those of the chat
template rendered with a sentinel in place of the last message's content, cut at the sentinel
(`prefix_ids`). A prompt reuses them only when its own token ids start with exactly those ids and
go on after them (`usable`), so what it prefills is the whole prompt's token sequence: equal to one
prefill of the whole prompt up to float rounding (`tests/test_kv.py`, every model family the kv
tests cover, in left-padded batches next to prompts on a past).

Bounded: at most `max_entries` prefixes and `max_bytes` of keys and values, least recently used
first out. Built outside inference mode (a prefix first made during a validation is read by the
next training step).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from gcache import kv

SENTINEL = "\u2063"  # an invisible separator: never in a prompt


class PrefixCache:
    def __init__(self, model: torch.nn.Module, tokenizer, chat_text, *, max_entries: int = 64,
                 max_bytes: int = 256 * 1024**2) -> None:
        """chat_text: messages -> the prompt text (the model's chat template and its kwargs)."""
        self.model = model
        self.tokenizer = tokenizer
        self.chat_text = chat_text
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], kv.KV] = OrderedDict()
        self._ids: dict[tuple, tuple[int, ...]] = {}
        self.uses = 0  # prompts prefilled on a cached prefix
        self.computed = 0  # prefixes prefilled (again after an eviction)
        self.tokens_computed = 0  # their tokens

    def prefix_ids(self, messages: list[dict[str, str]]) -> tuple[int, ...]:
        """The token ids of the chat prompt of `messages` up to its last message's content: what every
        prompt that differs from it only in that content starts with (when the tokenizer splits there)."""
        key = tuple((m["role"], m["content"]) for m in messages[:-1]) + (messages[-1]["role"],)
        if key not in self._ids:
            probe = [*messages[:-1], {**messages[-1], "content": SENTINEL}]
            head = self.chat_text(probe).split(SENTINEL)[0]
            self._ids[key] = tuple(self.tokenizer(head, add_special_tokens=False)["input_ids"])
        return self._ids[key]

    def usable(self, messages: list[dict[str, str]], ids: list[int]) -> int:
        """How many leading tokens of a prompt (its ids, unpadded) its prefix covers: the prefix's length
        when `ids` start with exactly the prefix's ids and go on after them (a prompt needs a last token
        of its own), else 0."""
        prefix = self.prefix_ids(messages)
        if 0 < len(prefix) < len(ids) and tuple(ids[: len(prefix)]) == prefix:
            return len(prefix)
        return 0

    def get(self, ids: tuple[int, ...]) -> kv.KV:
        """The KV of `ids` prefilled alone (one row, positions 0 … P−1), computed once while it stays cached."""
        self.uses += 1
        if ids in self.entries:
            self.entries.move_to_end(ids)
            return self.entries[ids]
        device = self.model.get_input_embeddings().weight.device
        with torch.inference_mode(False), torch.no_grad():
            tokens = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
            entry = kv.prefill(self.model, tokens, torch.ones_like(tokens), logits=False).kv
        self.computed += 1
        self.tokens_computed += len(ids)
        self.entries[ids] = entry
        while len(self.entries) > self.max_entries or (
                len(self.entries) > 1 and sum(kv.nbytes(e) for e in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)
        return entry

    def stats(self) -> dict[str, int]:
        """Prefixes kept, their bytes, prefixes computed and their tokens, prompts prefilled on one."""
        return {"kept": len(self.entries), "bytes": sum(kv.nbytes(e) for e in self.entries.values()),
                "computed": self.computed, "tokens_computed": self.tokens_computed, "uses": self.uses}

    def release(self) -> None:
        self.entries.clear()

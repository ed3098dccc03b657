"""Generation modes: who writes the final answer after the judger has read the fused cache.

- `local` (no object): the judger's own decoding is the answer.
- `hybrid`: the judger decodes a draft from its fused cache; an API model writes the
  final answer from the question and that draft.
- `api_hint`: the judger decodes a short hint (≤ `hint_tokens`) from its fused cache;
  the API model answers from the question and the hint.

In both API modes what the API receives is text decoded *from the fused cache*, so a
different cache gives a different request (never a metadata string about the cache). The
messages are `gcache.prompts.hybrid_messages` / `hint_messages`; the API-only baselines
(`api_single`, `api_text_mas`) run in `gcache.rollout.api_text_mas`.

Accounting: `ApiMode.ledger` splits the client's usage into the parts of a run (the module
enters `train`, `val`, `test`; the comparison `compare`), `last_usage` is the usage of each item
of the last `finalize`, and `totals()` is what `summary.json` reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gcache.prompts import hint_messages, hybrid_messages

log = logging.getLogger(__name__)

MODES = ("local", "hybrid", "api_hint")


class ApiMode:
    """Sends each judger output (draft or hint) with its question to the API model."""

    def __init__(self, name: str, client, *, local_tokens: int) -> None:
        if name not in ("hybrid", "api_hint"):
            raise ValueError(f"mode={name!r} is not an API mode; allowed: hybrid, api_hint")
        if local_tokens < 1:
            raise ValueError(f"the local draft/hint needs >= 1 token, got {local_tokens}")
        self.name = name
        self.client = client
        self.local_tokens = local_tokens  # the judger decodes at most this many tokens
        self.last_requests: list[list[dict]] = []
        from gcache.llm.api import UsageLedger

        self.ledger = UsageLedger(client.usage)
        self.last_usage: list = []  # UsageTotals of each item of the last finalize

    def totals(self, parts: dict | None = None, total=None) -> dict[str, dict[str, Any]]:
        """Usage per part of the run (default: the ledger's) and `total` (default: everything the
        client sent, the start-up check included), as `UsageTotals.summary`."""
        parts = self.ledger.parts if parts is None else parts
        total = self.client.usage.snapshot() if total is None else total
        return {**{name: t.summary(priced=self.client.priced) for name, t in parts.items()},
                "total": total.summary(priced=self.client.priced)}

    def item_usage(self) -> list[dict[str, Any]]:
        """Per item of the last `finalize`: the fields a record carries (cost None without a price)."""
        return [{"api_prompt_tokens": u.prompt_tokens, "api_completion_tokens": u.completion_tokens,
                 "api_cost_usd": u.cost_usd if self.client.priced else None} for u in self.last_usage]

    def requests(self, questions: Sequence[str], outputs: Sequence[str], answer_format: str) -> list[list[dict]]:
        build = hybrid_messages if self.name == "hybrid" else hint_messages
        return [build(q, o, answer_format) for q, o in zip(questions, outputs, strict=True)]

    def finalize(
        self, questions: Sequence[str], outputs: Sequence[str], answer_format: str
    ) -> tuple[list[str | None], dict[str, float]]:
        """Final answers from the API (None where the request failed after its retries: that
        item cannot be scored), and this call's usage (tokens, cost, failed items) for logging.
        When every request fails, the first failure is raised: the endpoint is down, not one item."""
        requests = self.requests(questions, outputs, answer_format)
        self.last_requests = requests
        before = self.client.usage.snapshot()
        from gcache.llm.api import ApiError, UsageTotals

        replies = self.client.chat_many_sync(requests, per_item=True)
        self.last_usage = [
            UsageTotals(retries=max(r.attempts - 1, 0), failures=1) if isinstance(r, ApiError) else
            UsageTotals(requests=1, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                        cost_usd=r.cost_usd, retries=r.attempts - 1)
            for r in replies]
        failed = [r for r in replies if isinstance(r, ApiError)]
        if failed and len(failed) == len(replies):
            raise failed[0]
        if failed:
            log.warning("%d of %d API requests failed after their retries (%s): those items are not scored",
                        len(failed), len(replies), failed[0])
        stats = {f"api_{k}": float(v) for k, v in self.client.usage.delta(before).as_dict().items()}
        stats["api_failed_items"] = float(len(failed))
        return [None if isinstance(r, ApiError) else r.text for r in replies], stats


def build_mode(cfg: DictConfig | dict | None):
    """None for `local`; an `ApiMode` with a checked client for `hybrid` / `api_hint`."""
    if cfg is None:
        return None
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = cfg.get("name", "local")
    if name not in MODES:
        raise ValueError(f"mode={name!r} is not one of {list(MODES)}")
    if name == "local":
        return None
    from gcache.llm.api import ApiClient, ApiConfig

    api = dict(cfg.get("api") or {})
    local_tokens = int(cfg["draft_tokens"] if name == "hybrid" else cfg["hint_tokens"])
    client = ApiClient(ApiConfig(**api))
    client.check_sync()  # fail before training, naming the endpoint
    return ApiMode(name, client, local_tokens=local_tokens)


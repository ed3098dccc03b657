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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
        from gcache.llm.api import ApiError

        replies = self.client.chat_many_sync(requests, per_item=True)
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


"""Generation modes: who writes the final answer after the judger has read the fused cache.

- `local` (no object): the judger's own decoding is the answer.
- `hybrid`: the judger decodes a draft from its fused cache; an API model writes the
  final answer from the question and that draft.
- `api_hint`: the judger decodes a short hint (≤ `hint_tokens`) from its fused cache;
  the API model answers from the question and the hint.

In both API modes what the API receives is text decoded *from the fused cache*, so a
different cache gives a different request (never a metadata string about the cache).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MODES = ("local", "hybrid", "api_hint")

SYSTEM = "You are an expert problem solver. Answer accurately and follow the requested answer format."


def hybrid_messages(question: str, draft: str, answer_format: str) -> list[dict]:
    user = (
        f"Question:\n{question}\n\n"
        f"A team of smaller models worked on this question together and wrote this draft:\n{draft}\n\n"
        f"Check the draft, correct it if it is wrong, and give the final answer. {answer_format}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def hint_messages(question: str, hint: str, answer_format: str) -> list[dict]:
    user = f"Question:\n{question}\n\nHint from a collaborating model:\n{hint}\n\n{answer_format}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


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


def api_text_mas(
    client,
    roster,
    questions: Sequence[str],
    adjacency,
    question_index: Sequence[int],
    answer_format: str,
    *,
    active: Sequence[int] | None = None,
) -> list[dict]:
    """The API-only baselines: every agent is the API model and passes text along the graph
    (no active agents = the API single agent). Prompts are the local text MAS's prompts.
    adjacency (R, N, N) bool. Returns per row: answer, prompt_tokens, completion_tokens."""
    from gcache.prompts import agent_messages, judger_messages
    from gcache.rollout import agent_depths

    n = roster.num_agents
    active = list(range(n)) if active is None else list(active)
    rows = range(adjacency.shape[0])
    depth = [agent_depths(adjacency[r].cpu(), active) for r in rows]
    texts: list[dict[int, str]] = [{} for _ in rows]
    usage = [[0, 0] for _ in rows]
    levels = max((max(d.values(), default=-1) for d in depth), default=-1) + 1
    for level in range(levels):
        todo = [(r, j) for r in rows for j in active if depth[r][j] == level]
        requests = []
        for r, j in todo:
            received = [(roster.roles[i].name, texts[r][i]) for i in active if bool(adjacency[r, i, j])]
            requests.append(agent_messages(roster.roles[j], questions[question_index[r]], received=received))
        for (r, j), reply in zip(todo, client.chat_many_sync(requests), strict=True):
            texts[r][j] = reply.text
            usage[r][0] += reply.prompt_tokens
            usage[r][1] += reply.completion_tokens
    requests = [
        judger_messages(roster.judger, questions[question_index[r]], answer_format, reads_others=bool(active),
                        received=[(roster.roles[i].name, texts[r][i]) for i in active])
        for r in rows
    ]
    results = []
    for r, reply in zip(rows, client.chat_many_sync(requests), strict=True):
        results.append({
            "answer": reply.text,
            "prompt_tokens": usage[r][0] + reply.prompt_tokens,
            "completion_tokens": usage[r][1] + reply.completion_tokens,
        })
    return results

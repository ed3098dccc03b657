"""Rollout engine: execute a DAG of agents for a batch of questions with one frozen model.

`RolloutEngine.run(questions, adjacency, question_index)` takes R rows, each a
(question, communication graph) pair, and for every row:

1. groups its active agents into waves by depth in the DAG (roots first);
2. for each wave, across all rows at once, builds each agent's input cache — the
   fusion of its predecessors' stored caches (`CacheFuser.fuse`, or plain
   concatenation) — stacks them left-padded into one batch, prefills the agents'
   role prompts on top, runs `latent_steps` latent steps, and stores each agent's
   cache according to `retention`;
3. runs the judger on the fusion of the agents' caches and decodes its answer.

Agents whose inputs are identical — same question, same role, same predecessors
(recursively) — are computed once and shared, e.g. across the G graphs sampled for a
question (`RolloutBatch.prefills` vs `prefills_naive`).

Retention (what an agent hands on):
- `full`: its whole working cache (what it received + its prompt + its latent steps).
  Caches then contain their ancestors, so the judger reads the sinks of the graph only
  (each agent's work exactly once); on a chain this is the LatentMAS chain.
- `role_latent`: its own prompt + latent positions; the judger reads every agent.
- `latent_only`: only its latent positions (LatentMAS's truncation, but with positions
  kept consistent); the judger reads every agent.

`method="text"` runs the same graphs as a text multi-agent system: agents decode text
and receivers read their predecessors' texts in their prompt (the text-MAS baseline).
With no active agents the judger answers alone (the single-agent baseline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gcache import kv
from gcache.agents import Role, Roster
from gcache.llm.local import LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.policy.graph_policy import topological_waves

log = logging.getLogger(__name__)

RETENTIONS = ("full", "role_latent", "latent_only")
METHODS = ("latent", "text")
JUDGER_CACHES = ("fused", "none", "mismatched")


@dataclass(frozen=True)
class RolloutConfig:
    method: str = "latent"  # latent | text
    latent_steps: int = 10
    retention: str = "full"  # full | role_latent | latent_only
    realign: bool = True
    max_new_tokens: int = 64  # judger's answer
    agent_max_new_tokens: int = 128  # text method: each agent's message
    temperature: float = 0.0
    top_p: float = 1.0
    num_rounds: int = 1  # from round 2 on, agents also read the previous round's outputs
    reuse: bool = True  # compute identical agents once
    judger_cache: str = "fused"  # fused | none (control: no handoff) | mismatched (control)
    max_batch: int = 32  # rows per forward

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention={self.retention!r} is not one of {RETENTIONS}")
        if self.judger_cache not in JUDGER_CACHES:
            raise ValueError(f"judger_cache={self.judger_cache!r} is not one of {JUDGER_CACHES}")
        if self.latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.retention == "latent_only" and self.latent_steps == 0 and self.method == "latent":
            raise ValueError("retention='latent_only' with latent_steps=0 hands on nothing; use latent_steps > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


@dataclass
class Rollout:
    """One (question, graph) row."""

    question_index: int
    adjacency: torch.Tensor  # (N, N) bool
    answer: str
    decoded_tokens: int  # judger (+ agents' messages in the text method)
    prompt_tokens: int  # tokens prefilled: agents' prompts + the judger's
    agent_cache_lengths: dict[int, int]  # agent -> positions it handed on
    judger_cache_length: int  # positions the judger read before its prompt
    peak_cache_bytes: int  # largest working cache of any agent of this row (bytes of K and V)
    seconds: float  # the run's wall time divided by its rows (work shared between rows is amortised)
    messages: dict[int, str] = field(default_factory=dict)  # text method: agent -> its message


@dataclass
class JudgerInput:
    """What the judger of a row read: kept for the fuser's differentiable loss."""

    question_index: int
    senders: list[int]  # agent indices
    sender_kvs: list[kv.KV]  # one single-row KV per sender, detached
    prompt: str


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    judger_inputs: list[JudgerInput]
    prefills: int  # agent prefills computed
    prefills_naive: int  # agent prefills without sharing identical agents
    judger_decodes: int = 0  # judger decodes computed (rows with identical judger inputs share one)


@dataclass
class _Node:
    kv: kv.KV | None  # handed-on cache (latent) — single row
    text: str  # handed-on message (text)
    prompt_tokens: int
    decoded_tokens: int
    peak_bytes: int


# ---- prompts ----------------------------------------------------------------------------------


def agent_messages(role: Role, question: str, *, received: Sequence[tuple[str, str]] = (), latent: bool) -> list[dict]:
    """Chat messages of an agent. `received`: (sender name, message) pairs for the text method."""
    parts = [f"Question:\n{question}"]
    if received:
        parts += [f"{name} wrote:\n{text}" for name, text in received]
    if latent:
        parts.append("Think about the question step by step in your role.")
    else:
        parts.append("Work on the question in your role. Be concise.")
    return [{"role": "system", "content": role.prompt}, {"role": "user", "content": "\n\n".join(parts)}]


def judger_messages(
    role: Role, question: str, answer_format: str, *, received: Sequence[tuple[str, str]] = ()
) -> list[dict]:
    parts = [f"Question:\n{question}"]
    parts += [f"{name} wrote:\n{text}" for name, text in received]
    parts.append(answer_format)
    return [{"role": "system", "content": role.prompt}, {"role": "user", "content": "\n\n".join(parts)}]


# ---- engine -----------------------------------------------------------------------------------


def agent_depths(adjacency: torch.Tensor, active: Sequence[int]) -> dict[int, int]:
    """Wave (longest-path depth) of each active agent in a DAG (N, N) restricted to `active`."""
    index = torch.as_tensor(list(active), dtype=torch.long)
    waves = topological_waves(adjacency[index][:, index])  # raises on a cycle
    return {int(index[j]): d for d, wave in enumerate(waves) for j in wave}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RolloutEngine:
    def __init__(
        self,
        llm: LocalLM,
        roster: Roster,
        config: RolloutConfig,
        fuser: CacheFuser | None = None,
    ) -> None:
        self.llm = llm
        self.roster = roster
        self.config = config
        self.fuser = fuser
        model_cfg = llm.model.config
        head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
        elem = next(llm.model.parameters()).element_size()
        kv_heads = getattr(model_cfg, "num_key_value_heads", None) or model_cfg.num_attention_heads
        # Bytes of keys + values that one position costs across all layers.
        self.bytes_per_position = 2 * model_cfg.num_hidden_layers * kv_heads * head_dim * elem

    # -- helpers --
    def _fuse(self, senders: list[kv.KV], logits: torch.Tensor | None) -> kv.KV:
        """senders: single-row KVs; logits (S,) edge logits or None."""
        if not senders:
            return kv.empty(1, self.llm.device)
        if self.fuser is None:
            return kv.concat(senders, self.llm.rotary)
        s = None if logits is None else logits.to(self.llm.device)[:, None]
        return self.fuser.fuse(senders, s, self.llm.rotary)

    def _retain(self, full: kv.KV, prompt_width: int) -> kv.KV:
        steps = self.config.latent_steps
        if self.config.retention == "full":
            return full
        if self.config.retention == "latent_only":
            return kv.keep_last(full, steps, self.llm.rotary)
        return kv.keep_last(full, prompt_width + steps, self.llm.rotary)  # role_latent

    @torch.no_grad()
    def run(
        self,
        questions: Sequence[str],
        adjacency: torch.Tensor,
        question_index: Sequence[int],
        *,
        answer_format: str,
        active: Sequence[int] | None = None,
        edge_logits: torch.Tensor | None = None,
        keep_judger_inputs: bool = False,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        """Run R rows. adjacency (R, N, N) bool; question_index (R,) into `questions`;
        edge_logits (Q, N+1, N+1) per question (column N = the judger) or None."""
        started = time.perf_counter()
        cfg = self.config
        n = self.roster.num_agents
        if adjacency.dim() != 3 or adjacency.shape[1:] != (n, n):
            raise ValueError(f"adjacency must be (R, {n}, {n}), got {tuple(adjacency.shape)}")
        if len(question_index) != adjacency.shape[0]:
            raise ValueError(f"{len(question_index)} question indices for {adjacency.shape[0]} rows")
        active = list(range(n)) if active is None else list(active)
        adjacency = adjacency.detach().cpu().bool()
        rows = range(adjacency.shape[0])
        latent = cfg.method == "latent"
        realign = self.llm.realignment(cfg.realign)

        # What a reader (the judger, or an agent of the next round) receives from a row:
        # the sinks under full retention (their caches hold their ancestors), every active
        # agent otherwise and in the text method — each agent's work exactly once.
        readers = []
        for r in rows:
            if latent and cfg.retention == "full":
                readers.append([i for i in active if not any(bool(adjacency[r, i, j]) for j in active)])
            else:
                readers.append(list(active))

        # Node keys: (question, round, agent, keys of its senders) — equal keys, equal computation.
        # Senders of an agent: its predecessors in the graph, and from round 2 on, the readers'
        # outputs of the previous round (temporal edges).
        depth = [agent_depths(adjacency[r], active) for r in rows]
        levels = max((max(d.values(), default=-1) for d in depth), default=-1) + 1
        senders_of: dict[tuple, list[tuple[int, tuple]]] = {}
        level_of: dict[tuple, int] = {}
        where: dict[tuple, tuple[int, int]] = {}
        keys: list[dict[int, tuple]] = [{} for _ in rows]  # the last round's keys per row
        row_nodes: list[list[tuple]] = [[] for _ in rows]
        for rnd in range(cfg.num_rounds):
            previous = keys
            keys = [{} for _ in rows]
            for r in rows:
                temporal = [(i, previous[r][i]) for i in readers[r]] if rnd else []
                for j in sorted(active, key=lambda a: depth[r][a]):
                    senders = temporal + [(i, keys[r][i]) for i in active if bool(adjacency[r, i, j])]
                    key = (question_index[r], rnd, j, tuple(k for _, k in senders))
                    key = key if cfg.reuse else (r, *key)
                    keys[r][j] = key
                    senders_of[key] = senders
                    level_of[key] = rnd * levels + depth[r][j]
                    where.setdefault(key, (r, j))
                    row_nodes[r].append(key)
        nodes: dict[tuple, _Node] = {}
        prefills_naive = len(rows) * len(active) * cfg.num_rounds

        for level in range(cfg.num_rounds * levels):
            pending = [(key, (*where[key], senders_of[key])) for key in where if level_of[key] == level]
            for chunk in _chunks(pending, cfg.max_batch):
                self._run_agents(chunk, questions, question_index, nodes, edge_logits, realign, generator)

        judger_senders = readers
        rollouts, judger_inputs = self._run_judger(
            questions, question_index, adjacency, keys, row_nodes, nodes, judger_senders, edge_logits,
            answer_format, keep_judger_inputs, generator,
        )
        per_row = (time.perf_counter() - started) / max(len(rollouts), 1)
        for rollout in rollouts:
            rollout.seconds = per_row
        return RolloutBatch(
            rollouts, judger_inputs, prefills=len(nodes), prefills_naive=prefills_naive,
            judger_decodes=self.last_judger_decodes,
        )

    def _run_agents(self, chunk, questions, question_index, nodes, edge_logits, realign, generator):
        """One batched forward for the agents of `chunk`: items (key, (row, agent, senders))."""
        cfg = self.config
        latent = cfg.method == "latent"
        texts, pasts = [], []
        for _, (r, j, senders) in chunk:
            q = question_index[r]
            role = self.roster.roles[j]
            if latent:
                agents = [i for i, _ in senders]
                logits = None if edge_logits is None else edge_logits[q, agents, j]
                pasts.append(self._fuse([nodes[k].kv for _, k in senders], logits))
                messages = agent_messages(role, questions[q], latent=True)
            else:
                received = [(self.roster.roles[i].name, nodes[k].text) for i, k in senders]
                messages = agent_messages(role, questions[q], received=received, latent=False)
            texts.append(self.llm.chat_text(messages))
        ids, mask = self.llm.encode(texts)
        prompt_tokens = mask.sum(-1).tolist()
        if latent:
            past = kv.stack(pasts)
            step = kv.prefill(self.llm.model, ids, mask, past=past)
            result = kv.latent_steps(self.llm.model, step, cfg.latent_steps, realign).step
            full_lengths = result.kv.lengths.tolist()
            retained = self._retain(result.kv, ids.shape[1])
            for b, (key, _) in enumerate(chunk):
                nodes[key] = _Node(
                    kv=kv.compact(kv.select(retained, [b])),
                    text="",
                    prompt_tokens=int(prompt_tokens[b]),
                    decoded_tokens=0,
                    peak_bytes=int(full_lengths[b]) * self.bytes_per_position,
                )
        else:
            step = kv.prefill(self.llm.model, ids, mask)
            tokens, counts = kv.decode(
                self.llm.model, step.kv, step.logits, max_new_tokens=cfg.agent_max_new_tokens,
                eos_token_ids=self.llm.eos_token_ids, pad_token_id=self.llm.tokenizer.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
            )
            messages_out = self.llm.decode_ids(tokens, counts)
            for b, (key, _) in enumerate(chunk):
                nodes[key] = _Node(
                    kv=None,
                    text=messages_out[b],
                    prompt_tokens=int(prompt_tokens[b]),
                    decoded_tokens=int(counts[b]),
                    peak_bytes=(int(prompt_tokens[b]) + int(counts[b])) * self.bytes_per_position,
                )

    def _run_judger(self, questions, question_index, adjacency, keys, row_nodes, nodes, judger_senders, edge_logits,
                    answer_format, keep_inputs, generator):
        cfg = self.config
        latent = cfg.method == "latent"
        rows = list(range(adjacency.shape[0]))
        n = self.roster.num_agents
        judger = self.roster.judger
        # Which row's fused cache each row's judger reads (the mismatched control swaps questions).
        source = list(rows)
        if latent and cfg.judger_cache == "mismatched":
            others = {r: [s for s in rows if question_index[s] != question_index[r]] for r in rows}
            if any(not o for o in others.values()):
                raise ValueError("judger_cache='mismatched' needs rows of at least two different questions")
            source = [others[r][r % len(others[r])] for r in rows]
        prompts, judger_inputs = [], []
        for r in rows:
            q = question_index[r]
            received = []
            if not latent:
                received = [(self.roster.roles[i].name, nodes[keys[r][i]].text) for i in judger_senders[r]]
            prompts.append(self.llm.chat_text(judger_messages(judger, questions[q], answer_format, received=received)))
            if latent and keep_inputs:
                s = source[r]
                judger_inputs.append(
                    JudgerInput(
                        question_index=q,
                        senders=list(judger_senders[s]),
                        sender_kvs=[nodes[keys[s][i]].kv for i in judger_senders[s]],
                        prompt=prompts[-1],
                    )
                )
        # Rows whose judger reads the same senders (same question, same agents) decode once.
        def judger_key(r: int):
            s = source[r]
            senders = tuple(keys[s][i] for i in judger_senders[s])
            return (question_index[r], question_index[s], senders) if cfg.reuse else r

        unique: dict = {}
        for r in rows:
            unique.setdefault(judger_key(r), r)
        outputs: dict[int, tuple[str, int, int, int]] = {}  # row -> (answer, decoded, prompt, cache len)
        for chunk in _chunks(list(unique.values()), cfg.max_batch):
            ids, mask = self.llm.encode([prompts[r] for r in chunk])
            pasts = []
            for r in chunk:
                s = source[r]
                if latent and cfg.judger_cache != "none":
                    qs = question_index[s]
                    logits = None if edge_logits is None else edge_logits[qs, judger_senders[s], n]
                    pasts.append(self._fuse([nodes[keys[s][i]].kv for i in judger_senders[s]], logits))
                else:
                    pasts.append(kv.empty(1, self.llm.device))
            past = kv.stack(pasts)
            step = kv.prefill(self.llm.model, ids, mask, past=past)
            tokens, counts = kv.decode(
                self.llm.model, step.kv, step.logits, max_new_tokens=cfg.max_new_tokens,
                eos_token_ids=self.llm.eos_token_ids, pad_token_id=self.llm.tokenizer.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
            )
            answers = self.llm.decode_ids(tokens, counts)
            for b, r in enumerate(chunk):
                outputs[r] = (answers[b], int(counts[b]), int(mask[b].sum()), int(past.lengths[b]))
        rollouts = []
        for r in rows:
            answer, decoded, prompt_len, cache_len = outputs[unique[judger_key(r)]]
            computed = [nodes[k] for k in row_nodes[r]]
            rollouts.append(Rollout(
                question_index=question_index[r],
                adjacency=adjacency[r],
                answer=answer,
                decoded_tokens=decoded + sum(x.decoded_tokens for x in computed),
                prompt_tokens=prompt_len + sum(x.prompt_tokens for x in computed),
                agent_cache_lengths={
                    j: (nodes[k].kv.lengths.item() if nodes[k].kv is not None else 0) for j, k in keys[r].items()
                },
                judger_cache_length=cache_len,
                peak_cache_bytes=max(
                    [(cache_len + prompt_len + decoded) * self.bytes_per_position] + [x.peak_bytes for x in computed]
                ),
                seconds=0.0,  # set by `run`: the batch's wall time spread over its rows
                messages={j: nodes[k].text for j, k in keys[r].items()} if not latent else {},
            ))
        self.last_judger_decodes = len(unique)
        return rollouts, judger_inputs


def chain_adjacency(n: int) -> torch.Tensor:
    """(N, N) bool: 0 -> 1 -> … -> N-1."""
    idx = torch.arange(n)
    return idx[None, :] == idx[:, None] + 1


def run_latent_chain(
    llm: LocalLM,
    roster: Roster,
    questions: Sequence[str],
    *,
    answer_format: str,
    latent_steps: int = 10,
    max_new_tokens: int = 64,
    realign: bool = True,
) -> RolloutBatch:
    """The LatentMAS chain: agents in roster order pass their whole cache on; the judger decodes.

    A special case of the engine (chain graph, `full` retention, plain concatenation)."""
    config = RolloutConfig(latent_steps=latent_steps, retention="full", max_new_tokens=max_new_tokens, realign=realign)
    engine = RolloutEngine(llm, roster, config)
    adjacency = chain_adjacency(roster.num_agents).expand(len(questions), -1, -1)
    return engine.run(questions, adjacency, list(range(len(questions))), answer_format=answer_format)

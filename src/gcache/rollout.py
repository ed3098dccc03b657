"""Rollout engine: execute DAGs of agents for a batch of questions with one frozen model.

A row is a (question, communication graph) pair. Graphs are (N+1, N+1) bool adjacencies
over the N agents and the judger (node N, incoming edges only): `adjacency[i, j]` means
agent i sends to j, `adjacency[i, N]` that agent i sends to the judger.

What a reader receives. An agent's *segment* is what it adds: its prompt (role, facts,
question) and its `latent_steps` latent positions, computed on top of what it received.
A stored segment holds positions 0…len−1 (keys re-rotated, `gcache.kv.keep_last`), so
readers can concatenate segments in any order (`gcache.kv.concat`). Every agent's segment
reaches any reader **at most once**:

- `full`: a reader (agent or judger) receives the segments of all its ancestors, once
  each, in a topological order (by depth, then agent index). On a chain this is exactly
  the LatentMAS chain: the judger reads 0, 1, …, N−1 and agent k's segment was computed
  on 0…k−1, i.e. the last agent's whole cache.
- `role_latent`: a reader receives its direct senders' segments (prompt + latent).
- `latent_only`: its direct senders' latent positions only.
- `method="text"`: agents decode a message; a reader reads its direct senders' messages.

Only agents with a path to the judger run (the others cannot change the answer and cost
nothing); a graph without judger edges is the judger answering alone.

The fuser. With a `CacheFuser`, the judger's input is the weighted concatenation of the segments
it reads: segment i weighted by w_i(edge logit i → judger) — the judger's attention to its slots
(`fusion="attention"`, the KV's log-weights) or its values (`"values"`, per layer) — once, where i
is a direct sender (its edge i → judger was sampled); ancestors read through a sender (`full`
retention) get weight 1. Agents read plain concatenations, so what the fuser's loss differentiates
(the judger's fusion, `GCacheModule.fuser_loss`) is exactly what the rollout applies, and an
untrained fuser (w = 1) reproduces plain concatenation.

Planning (`plan_rollouts`: which agent reads which segments, which computations are
identical and shared) is a pure function of the graphs; `RolloutEngine.run` executes a
plan level by level, one left-padded batch per chunk of agents. Agents with the same
question, role and inputs (recursively) are computed once, e.g. across the G graphs
sampled for a question (`RolloutBatch.prefills` vs `prefills_naive`).

Judger controls (`judger_cache`): `fused` (the real input), `mismatched` (the input built
for another question of the batch), `zeroed` (values zeroed, keys kept: attention lands on
nothing), `shuffled` (each segment's slots permuted, keys re-rotated to their new
positions: content kept, order destroyed).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gcache import kv, kv_static
from gcache.agents import Roster
from gcache.llm.local import REALIGNMENTS, LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.policy.sampling import topological_waves
from gcache.policy.topology import fixed_adjacency, judger_senders_all
from gcache.prompts import agent_messages, judger_messages

log = logging.getLogger(__name__)

RETENTIONS = ("full", "role_latent", "latent_only")
METHODS = ("latent", "text")
JUDGER_CACHES = ("fused", "mismatched", "zeroed", "shuffled")
CUDA_GRAPHS = ("auto", "on", "static", "off")


@dataclass(frozen=True)
class RolloutConfig:
    method: str = "latent"  # latent | text
    latent_steps: int = 10
    retention: str = "full"  # full | role_latent | latent_only
    realign: str = "ridge"  # ridge | identity | random | soft (see gcache.llm.local.LocalLM.realignment)
    realign_temperature: float = 0.3  # the `soft` realignment's temperature
    max_new_tokens: int = 64  # judger's answer
    agent_max_new_tokens: int = 128  # text method: each agent's message
    temperature: float = 0.0
    top_p: float = 1.0
    reuse: bool = True  # compute identical agents once
    judger_cache: str = "fused"  # fused | mismatched | zeroed | shuffled (controls)
    judger_latent_steps: int = 0  # latent steps of the judger before it answers (equal-budget single agent)
    max_batch: int = 32  # rows per forward
    cuda_graphs: str = "auto"  # auto (on for CUDA, off for CPU) | on | static | off: the token loops (`loops`)
    workspace_memory: float | str = "25%"  # the static loops' workspaces: GiB, or "N%" of the device's free memory
    prefix_cache: bool = True  # prefill prompts' shared starts once (`gcache.prefix_cache`)

    def __post_init__(self) -> None:
        """Every check of these values, in one place. Each message starts with the field's name (the CLI
        shows it as `error: rollout.<message>`)."""
        for name, minimum in (("latent_steps", 0), ("judger_latent_steps", 0), ("max_new_tokens", 1),
                              ("agent_max_new_tokens", 1), ("max_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.realign_temperature, bool) or not isinstance(self.realign_temperature, (int, float)) \
                or not self.realign_temperature > 0:
            raise ValueError(f"realign_temperature must be a number > 0, got {self.realign_temperature!r}")
        for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {list(METHODS)}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention={self.retention!r} is not one of {list(RETENTIONS)}")
        if self.judger_cache not in JUDGER_CACHES:
            raise ValueError(f"judger_cache={self.judger_cache!r} is not one of {list(JUDGER_CACHES)}")
        if self.realign not in REALIGNMENTS:
            raise ValueError(f"realign={self.realign!r} is not one of {list(REALIGNMENTS)}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} is not one of {list(CUDA_GRAPHS)}")
        kv_static.check_memory(self.workspace_memory, "workspace_memory")
        if self.retention == "latent_only" and self.latent_steps == 0 and self.method == "latent":
            raise ValueError("retention='latent_only' with latent_steps=0 hands on nothing; use latent_steps > 0")


    def loops(self, device: torch.device) -> str:
        """How token loops (decoding, latent steps) run on `device`: `graphs` (static
        workspaces captured as CUDA graphs: `on`, and `auto` on CUDA), `static` (the same workspaces and
        steps without the capture and replay calls, on any device: the GPU path under test on CPU), or
        `eager` (`off`, and `auto` on CPU: buffers that grow per call, rows leave as they end)."""
        if self.cuda_graphs == "on" and device.type != "cuda":
            raise ValueError(f"cuda_graphs='on' needs the model on a CUDA device, it is on {device}; "
                             "use static (the same loops without capture), auto or off")
        if self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device.type == "cuda"):
            return "graphs"
        return "static" if self.cuda_graphs == "static" else "eager"


# ---- planning (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentNode:
    """One agent computation of a plan."""

    question: int  # index into the questions
    agent: int
    reads: tuple[int, ...]  # ids of the nodes whose segments (or messages) it reads, in order
    level: int  # 0 = reads nothing; else 1 + the highest level it reads


@dataclass
class Plan:
    nodes: list[AgentNode]  # in level order (a topological order)
    row_nodes: list[list[int]]  # per row: the nodes it runs (agents with a path to the judger)
    judger_reads: list[tuple[int, ...]]  # per row: the nodes the judger reads, in order
    naive_nodes: int  # agent computations without sharing (sum of len(row_nodes))

    @property
    def levels(self) -> int:
        return max((node.level for node in self.nodes), default=-1) + 1


def _inputs(j: int, a: list[list[bool]], order: list[int], position: dict[int, int],
            ancestors: dict[int, set[int]], reads: str) -> list[int]:
    """The agents whose segments node j reads, in topological order; records j's ancestors
    (every agent of `order` before j has been seen)."""
    senders = [i for i in order if a[i][j]]
    if reads == "senders":
        return senders
    found = set(senders).union(*(ancestors[i] for i in senders))
    ancestors[j] = found
    return sorted(found, key=position.__getitem__)


def check_inputs(adjacency: torch.Tensor, n: int, agent_facts: Sequence[Sequence[str]] | None) -> None:
    """What every executor checks first: graphs (R, N+1, N+1) over n agents and the judger, and
    n facts (or none) per question."""
    if adjacency.dim() != 3 or adjacency.shape[1:] != (n + 1, n + 1):
        raise ValueError(
            f"adjacency must be (R, {n + 1}, {n + 1}) over {n} agents and the judger (node {n}), got "
            f"{tuple(adjacency.shape)}; `judger_senders_all` adds every agent -> judger to an (R, N, N) graph"
        )
    if agent_facts is not None and any(len(f) not in (0, n) for f in agent_facts):
        raise ValueError(f"agent_facts must hold {n} texts (or none) per question")


def plan_rollouts(
    adjacency: torch.Tensor,
    question_index: Sequence[int],
    *,
    reads: str = "ancestors",
    active: Sequence[int] | None = None,
    reuse: bool = True,
) -> Plan:
    """Which agent reads which segments, for R rows. adjacency (R, N+1, N+1) bool (node N = judger).

    reads: "ancestors" (full retention: every ancestor once, in topological order) or
    "senders" (direct senders, in topological order). Nodes are shared between rows when
    their question, agent and inputs agree (`reuse`)."""
    if reads not in ("ancestors", "senders"):
        raise ValueError(f"reads={reads!r} is not 'ancestors' or 'senders'")
    if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
        raise ValueError(f"adjacency must be (R, N+1, N+1), got {tuple(adjacency.shape)}")
    rows, size = adjacency.shape[0], adjacency.shape[1]
    n = size - 1
    if len(question_index) != rows:
        raise ValueError(f"{len(question_index)} question indices for {rows} rows")
    adjacency = adjacency.detach().cpu().bool().clone()
    if bool(adjacency[:, n, :].any()):
        raise ValueError("the judger (node N) sends to nobody: adjacency[:, N, :] must be False")
    allowed = torch.zeros(size, dtype=torch.bool)
    allowed[list(range(n)) if active is None else list(active)] = True
    allowed[n] = True
    adjacency &= allowed[None, :, None] & allowed[None, None, :]

    ids: dict[tuple, int] = {}
    nodes: list[AgentNode] = []
    row_nodes: list[list[int]] = []
    judger_reads: list[tuple[int, ...]] = []
    for r in range(rows):
        a = adjacency[r].tolist()
        needed, stack = set(), [n]  # agents with a path to the judger
        while stack:
            x = stack.pop()
            for i in range(n):
                if a[i][x] and i not in needed:
                    needed.add(i)
                    stack.append(i)
        agents = sorted(needed)
        index = torch.as_tensor(agents, dtype=torch.long)
        waves = topological_waves(adjacency[r][index][:, index]) if agents else []  # raises on a cycle
        order = [agents[j] for wave in waves for j in wave]
        position = {agent: p for p, agent in enumerate(order)}
        ancestors: dict[int, set[int]] = {}
        node_of: dict[int, int] = {}
        mine = []
        for j in order:
            read = tuple(node_of[i] for i in _inputs(j, a, order, position, ancestors, reads))
            key = (question_index[r], j, read) if reuse else (r, j, read)
            if key not in ids:
                level = 1 + max((nodes[x].level for x in read), default=-1)
                ids[key] = len(nodes)
                nodes.append(AgentNode(int(question_index[r]), j, read, level))
            node_of[j] = ids[key]
            mine.append(ids[key])
        row_nodes.append(mine)
        judger_reads.append(tuple(node_of[i] for i in _inputs(n, a, order, position, ancestors, reads)))
    # Level order, stable: a node's inputs always come before it.
    order = sorted(range(len(nodes)), key=lambda x: nodes[x].level)
    renumber = {old: new for new, old in enumerate(order)}
    nodes = [AgentNode(nodes[x].question, nodes[x].agent, tuple(renumber[i] for i in nodes[x].reads), nodes[x].level)
             for x in order]
    return Plan(
        nodes=nodes,
        row_nodes=[[renumber[x] for x in row] for row in row_nodes],
        judger_reads=[tuple(renumber[x] for x in read) for read in judger_reads],
        naive_nodes=sum(len(row) for row in row_nodes),
    )


# ---- records --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One (question, graph) row."""

    question_index: int
    adjacency: torch.Tensor  # (N+1, N+1) bool, node N = the judger
    answer: str
    decoded_tokens: int  # judger (+ agents' messages in the text method)
    prompt_tokens: int  # tokens prefilled: agents' prompts + the judger's
    agent_cache_lengths: dict[int, int]  # agent -> positions of the segment it handed on
    judger_senders: list[int]  # agents whose segments (or messages) the judger read, in order
    judger_cache_length: int  # positions the judger read before its prompt
    agents_run: int  # agents with a path to the judger (the others are pruned)
    peak_cache_bytes: int  # largest working cache of any agent or the judger of this row (K and V)
    seconds: float  # the run's wall time divided by its rows (work shared between rows is amortised)
    messages: dict[int, str] = field(default_factory=dict)  # text method: agent -> its message
    # What the judger read from other agents: cache positions (latent) or decoded message tokens (text),
    # and their bytes (keys and values of every layer at the model's dtype, or the messages' UTF-8).
    handed_positions: int = 0
    handed_bytes: int = 0


@dataclass
class JudgerInput:
    """What the judger of a row read: kept for the fuser's differentiable loss and for tests."""

    question_index: int  # the question the judger answered
    source_question: int  # the question whose segments it read (differs under `mismatched`)
    senders: list[int]  # agent indices of the segments, in order
    sender_kvs: list[kv.KV]  # one single-row segment per sender, detached, ungated
    gated: list[bool]  # per segment: a direct sender (sampled edge agent -> judger), gated; else an ancestor, gate 1
    prompt: str
    sender_starts: list[SenderStart | None]  # per segment: where its latent steps began (a trained realignment)
    cache: kv.KV  # the exact (gated, controlled) cache the judger's prompt was prefilled on


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    judger_inputs: list[JudgerInput]
    prefills: int  # agent computations run (not those an `AgentMemo` held)
    prefills_naive: int  # agent computations without sharing identical agents
    judger_decodes: int = 0  # judger decodes computed (greedy: rows with identical judger inputs share one)
    prefill_tokens: int = 0  # prompt tokens run through the model (agents and judgers; cached prefixes once)


@dataclass
class _Done:
    kv: kv.KV | None  # the handed-on segment (latent), single row
    text: str  # the handed-on message (text)
    prompt_tokens: int
    decoded_tokens: int
    peak_bytes: int
    length: int = 0  # real positions of the handed-on segment (latent)
    start: SenderStart | None = None  # kept for a trained realignment's loss (`RolloutEngine.segment_with_grad`)


@dataclass
class SenderStart:
    """Where an agent's latent steps began: its cache after its prompt (one row, as batched: its past
    and left padding included) and last hidden state; `width` slots were kept of the result, the
    columns `gap` (the batch's padding between a cached prefix and the rest of the prompt) dropped,
    then the last `length` kept (`RolloutEngine._run_agents`). Lets a loss recompute the handed-on
    segment with autograd through the latent steps (a trained realignment)."""

    step: kv.Step
    width: int
    length: int
    gap: tuple[int, int] = (0, 0)


def _facts(node: AgentNode, agent_facts) -> str:
    """What an agent node's agent alone holds for its question ("" without `agent_facts`)."""
    facts = agent_facts[node.question] if agent_facts is not None else ()
    return facts[node.agent] if facts else ""


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AgentMemo:
    """Agents' work shared across rollouts: an agent with the same question, facts, role, inputs (the memo
    keys of what it reads) and settings (model, roster, method, retention, latent steps, realignment and a
    trained one, loops, prefix cache) hands on the same segment whichever rollout runs it, so it is computed
    once. Used by greedy rollouts only, never for a training loss. `gcache.evaluate` shares one between the
    methods of a batch of questions and clears it for every batch (its memory is a batch's agents); a
    training run keeps one for its validations (`max_bytes`: the least recently used segments go beyond
    it), whose questions and agents are the same at every validation."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.entries: OrderedDict[tuple, _Done] = OrderedDict()
        self.max_bytes = max_bytes  # None: unbounded (cleared by its owner)
        self.bytes = 0
        self.computed = 0  # agent computations stored
        self.shared = 0  # agent computations taken from the memo instead

    def get(self, key: tuple) -> _Done | None:
        done = self.entries.get(key)
        if done is not None:
            self.entries.move_to_end(key)
        return done

    def put(self, key: tuple, done: _Done) -> None:
        if key in self.entries:
            return
        self.entries[key] = done
        self.bytes += _nbytes(done)
        while self.max_bytes is not None and self.bytes > self.max_bytes and self.entries:
            self.bytes -= _nbytes(self.entries.popitem(last=False)[1])

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def _nbytes(done: _Done) -> int:
    return kv.nbytes(done.kv) if done.kv is not None else len(done.text.encode())


# ---- engine ---------------------------------------------------------------------------------------


class RolloutEngine:
    def __init__(self, llm: LocalLM, roster: Roster, config: RolloutConfig, fuser: CacheFuser | None = None) -> None:
        self.llm = llm
        self.roster = roster
        self.config = config
        self.fuser = fuser
        elem = next(llm.model.parameters()).element_size()
        # Bytes of keys + values that one position costs across all layers.
        self.bytes_per_position = 2 * llm.num_layers * llm.kv_dim * elem
        loops = config.loops(llm.device)
        self.pool = None if loops == "eager" else llm.loop_pool(capture=loops == "graphs",
                                                                memory=config.workspace_memory)
        self.memo: AgentMemo | None = None  # agents shared with other engines' greedy rollouts (`AgentMemo`)
        # what, besides its question, role and inputs, decides an agent's work (`AgentMemo`'s keys)
        self._agent_settings = (id(llm), id(roster), config.method, config.latent_steps, config.retention,
                                config.realign, config.realign_temperature, config.agent_max_new_tokens,
                                config.prefix_cache, loops, id(fuser.realign) if self.trains_realignment else None)

    def plan(self, adjacency: torch.Tensor, question_index: Sequence[int], active: Sequence[int] | None) -> Plan:
        cfg = self.config
        full = cfg.method == "latent" and cfg.retention == "full"
        return plan_rollouts(adjacency, question_index, reads="ancestors" if full else "senders",
                             active=active, reuse=cfg.reuse)

    @torch.no_grad()
    def run(
        self,
        questions: Sequence[str],
        adjacency: torch.Tensor,
        question_index: Sequence[int],
        *,
        answer_format: str,
        active: Sequence[int] | None = None,
        agent_facts: Sequence[Sequence[str]] | None = None,
        edge_logits: torch.Tensor | None = None,
        keep_judger_inputs: bool = False,
        generator: torch.Generator | None = None,
        undecoded: Sequence[int] = (),
    ) -> RolloutBatch:
        """Run R rows. adjacency (R, N+1, N+1) bool (node N = the judger); question_index (R,)
        into `questions`; agent_facts[q][i]: what agent i holds for question q (or None);
        edge_logits (Q, N+1, N+1) per question (the judger's gates) or None. Rows in `undecoded` run
        their agents and build their judger's input (kept with `keep_judger_inputs`, for a loss) but
        their judger neither prefills nor decodes: their rollouts' answers are empty."""
        started = time.perf_counter()
        self._prefilled = 0
        check_inputs(adjacency, self.roster.num_agents, agent_facts)
        if generator is not None and generator.device.type != self.llm.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {self.llm.device}: sampling "
                             f"draws on the model's device (torch.Generator(device={str(self.llm.device)!r}))")
        adjacency = adjacency.detach().cpu().bool()
        plan = self.plan(adjacency, question_index, active)
        done: dict[int, _Done] = {}
        realign = self.base_realignment()
        agent_realign = self.agent_realignment(realign)
        keep_starts = keep_judger_inputs and self.trains_realignment
        memo = self.memo if self.memo is not None and self.config.temperature == 0 and not keep_starts else None
        keys: dict[int, tuple] = {}
        taken = 0  # agent nodes taken from the memo
        for level in range(plan.levels):
            pending = [x for x, node in enumerate(plan.nodes) if node.level == level]
            if memo is not None:
                for x in pending:
                    keys[x] = self._memo_key(plan.nodes[x], keys, questions, agent_facts)
                    if (held := memo.get(keys[x])) is not None:
                        done[x] = held
                        taken += 1
                pending = [x for x in pending if x not in done]
            for chunk in _chunks(pending, self.config.max_batch):
                self._run_agents(plan, chunk, questions, agent_facts, done, agent_realign, generator, keep_starts)
            if memo is not None:
                for x in pending:
                    memo.put(keys[x], done[x])
                memo.computed += len(pending)
        if memo is not None:
            memo.shared += taken
        rollouts, judger_inputs, decodes = self._run_judger(
            plan, questions, question_index, adjacency, done, edge_logits, answer_format, keep_judger_inputs,
            realign, generator, set(undecoded),
        )
        per_row = (time.perf_counter() - started) / max(len(rollouts), 1)
        for rollout in rollouts:
            rollout.seconds = per_row
        return RolloutBatch(rollouts, judger_inputs, prefills=len(plan.nodes) - taken, prefills_naive=plan.naive_nodes,
                            judger_decodes=decodes, prefill_tokens=self._prefilled)

    def _memo_key(self, node: AgentNode, keys: dict[int, tuple], questions, agent_facts) -> tuple:
        """Everything that decides an agent node's work (`AgentMemo`): its question and facts, its role, the
        keys of the nodes it reads, the engine's settings."""
        return (questions[node.question], _facts(node, agent_facts), node.agent, tuple(keys[x] for x in node.reads),
                self._agent_settings)

    def base_realignment(self):
        """The config's realignment (`realign`, `realign_temperature`): the judger's latent steps."""
        return self.llm.realignment(self.config.realign, self.config.realign_temperature)

    @property
    def trains_realignment(self) -> bool:
        return self.fuser is not None and self.fuser.realign is not None

    def agent_realignment(self, base=None):
        """What agents' latent steps feed back: the base realignment (default: the config's), corrected
        by a fuser's trained realignment (the `realign` channel)."""
        base = self.base_realignment() if base is None else base
        return self.fuser.realign.bind(base) if self.trains_realignment else base

    def segment_with_grad(self, start: SenderStart, realign) -> kv.KV:
        """An agent's handed-on segment recomputed from its start with autograd through its latent
        steps fed by `realign` (`agent_realignment()`: the trained realignment's gradient path): the
        same slots the rollout kept."""
        result = kv.latent_steps_with_grad(self.llm.model, start.step, self.config.latent_steps, realign)
        return kv.tail(kv.drop_columns(kv.keep_last(result, start.width, self.llm.rotary), *start.gap), start.length)

    def _agent_messages(self, plan: Plan, node: AgentNode, questions, agent_facts, done) -> list[dict]:
        received = []
        if self.config.method == "text":
            received = [(self.roster.roles[plan.nodes[x].agent].name, done[x].text) for x in node.reads]
        return agent_messages(self.roster.roles[node.agent], questions[node.question],
                              facts=_facts(node, agent_facts), received=received)

    def _prefill_prompts(self, messages: list[list[dict]], texts: list[str], pasts: list[kv.KV], *, logits: bool):
        """Prefill each row's chat prompt on its past (single-row compact KVs), left-padded in one batch.
        With `prefix_cache`, a prompt with nothing before it (an agent without senders, any text agent, the
        judger alone) whose start is a cached prefix (`gcache.prefix_cache`) prefills only the rest, on the
        prefix: the same tokens at the same positions. (After a past the prefix's tokens attend to it, so their keys
        and values are the past's own: never cached.) Returns the step, each row's prompt tokens (whole
        prompts), the prefix tokens each row took from the cache and the width T of the prefilled block.
        `texts`: the prompts (`messages` rendered by the chat template)."""
        ids, mask = self.llm.tokenize(texts)  # host, left-padded
        prompt_tokens = mask.sum(-1).tolist()
        heads = [0] * len(messages)
        if self.config.prefix_cache:
            prefixes = self.llm.prefix_cache()
            computed = prefixes.tokens_computed
            rows = [row[len(row) - n :] for row, n in zip(ids.tolist(), prompt_tokens, strict=True)]  # unpadded
            heads = [0 if p.seq_len else prefixes.usable(m, row) for m, row, p in zip(messages, rows, pasts, strict=True)]
            if any(heads):
                pasts = [prefixes.get(tuple(row[:h])) if h else p for p, row, h in zip(pasts, rows, heads, strict=True)]
                rest = [row[h:] for row, h in zip(rows, heads, strict=True)]
                width = max(len(r) for r in rest)
                ids = torch.full((len(rest), width), self.llm.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(rest), width, dtype=torch.long)
                for b, r in enumerate(rest):  # left-padded again
                    ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                    mask[b, width - len(r) :] = 1
            self._prefilled += prefixes.tokens_computed - computed
        self._prefilled += int(mask.sum())
        ids_device, mask_device = torch.stack([ids, mask]).to(self.llm.device)  # (2, B, T): one copy
        past = kv.stack(pasts, compacted=True)  # concatenations of compact single-row segments
        step = kv.prefill(self.llm.model, ids_device, mask_device, past=past, logits=logits)
        return step, prompt_tokens, heads, ids.shape[1]

    def _run_agents(self, plan: Plan, chunk: list[int], questions, agent_facts, done, realign, generator,
                    keep_starts: bool = False) -> None:
        """One batched forward for the agent nodes of `chunk`; `keep_starts`: record each node's
        `SenderStart` (for a trained realignment's loss)."""
        cfg = self.config
        nodes = [plan.nodes[x] for x in chunk]
        messages = [self._agent_messages(plan, node, questions, agent_facts, done) for node in nodes]
        texts = [self.llm.chat_text(m) for m in messages]
        if cfg.method == "latent":
            pasts = [self._concat([done[x].kv for x in node.reads]) for node in nodes]
            past_lengths = [sum(done[x].length for x in node.reads) for node in nodes]
            step, prompt_tokens, heads, width = self._prefill_prompts(messages, texts, pasts, logits=False)
            result = kv.latent_steps(self.llm.model, step, cfg.latent_steps, realign, pool=self.pool).step
            latent_only = cfg.retention == "latent_only"
            if latent_only or not any(heads):
                # Row b's real slots are the last ones of one window: its left-padded prompt, then its latents.
                window = cfg.latent_steps if latent_only else width + cfg.latent_steps
                segment = kv.keep_last(result.kv, window, self.llm.rotary)  # (B, H, window, Dh) per layer
            for b, x in enumerate(chunk):
                length = cfg.latent_steps if latent_only else prompt_tokens[b] + cfg.latent_steps  # real slots
                gap = (0, 0)
                if latent_only or not any(heads):
                    kept, row = window, kv.tail(kv.select(segment, [b]), length)
                else:  # the row's cached prefix, the block's padding (dropped), its prompt's rest, its latents
                    kept = heads[b] + width + cfg.latent_steps
                    gap = (heads[b], heads[b] + width - (prompt_tokens[b] - heads[b]))
                    row = kv.drop_columns(kv.keep_last(kv.select(result.kv, [b]), kept, self.llm.rotary), *gap)
                full = past_lengths[b] + prompt_tokens[b] + cfg.latent_steps
                start = SenderStart(kv.Step(kv.select(step.kv, [b]), step.hidden[b : b + 1], None), kept,
                                    row.seq_len, gap) if keep_starts else None
                done[x] = _Done(row, "", prompt_tokens[b], 0, full * self.bytes_per_position, length, start)
            return
        # text: a reader reads its senders' messages in its prompt, so every agent's prompt starts afresh (and
        # with a cached prefix)
        empty = [kv.empty(1, self.llm.device) for _ in nodes]
        step, prompt_tokens, _, _ = self._prefill_prompts(messages, texts, empty, logits=True)
        texts, counts = self._decode(step, cfg.agent_max_new_tokens, generator)
        for b, x in enumerate(chunk):
            done[x] = _Done(None, texts[b], prompt_tokens[b], counts[b],
                            (prompt_tokens[b] + counts[b]) * self.bytes_per_position)

    def _decode(self, step: kv.Step, max_new_tokens: int, generator) -> tuple[list[str], list[int]]:
        """Texts and token counts decoded from a prefilled batch with the config's sampling (one copy to
        the host for the whole batch)."""
        cfg = self.config
        tokens, counts = kv.decode(
            self.llm.model, step.kv, step.logits, max_new_tokens=max_new_tokens,
            eos_token_ids=self.llm.eos_tensor(), pad_token_id=self.llm.tokenizer.pad_token_id,
            temperature=cfg.temperature, top_p=cfg.top_p, generator=generator, pool=self.pool,
            # a host read is free on CPU, where eager loops let rows that end leave at once; on a GPU it
            # is a sync, and static loops (the GPU's, also under test on CPU) keep their rows anyway
            check_every=1 if self.pool is None and self.llm.device.type == "cpu" else 8,
        )
        host = torch.cat([tokens, counts[:, None]], 1).cpu()  # (B, T + 1): one copy to the host
        tokens, counts = host[:, :-1], host[:, -1]
        return self.llm.decode_ids(tokens, counts), counts.tolist()

    def _concat(self, segments: list[kv.KV]) -> kv.KV:
        return kv.concat(segments, self.llm.rotary) if segments else kv.empty(1, self.llm.device)

    def judger_cache(self, segments: list[kv.KV], logits: torch.Tensor | None, generator=None,
                     gated: list[bool] | None = None) -> kv.KV:
        """The judger's input from the segments it reads (single-row KVs): the control's
        transformation, then the fuser's gates (logits (S,) of sender -> judger; only segments of
        direct senders, `gated`) or plain concatenation."""
        cfg = self.config
        if not segments:
            return kv.empty(1, self.llm.device)
        if cfg.judger_cache == "zeroed":
            segments = [kv.zero_values(s) for s in segments]
        elif cfg.judger_cache == "shuffled":
            segments = [kv.shuffle_slots(s, self.llm.rotary, generator) for s in segments]
        if self.fuser is None:
            return kv.concat(segments, self.llm.rotary)
        s = torch.zeros(len(segments)) if logits is None else logits
        return self.fuser.fuse(segments, s[:, None], self.llm.rotary, gated=gated)

    def _run_judger(self, plan, questions, question_index, adjacency, done, edge_logits, answer_format,
                    keep_inputs, realign, generator, undecoded=frozenset()):
        """Every row's judger: its input built once per distinct input, decoded in batches, and the
        row's `Rollout` (with its `JudgerInput` for the fuser loss when `keep_inputs`)."""
        latent = self.config.method == "latent"
        rows = list(range(adjacency.shape[0]))
        source = self._judger_sources(question_index)

        # per row: which segments its judger reads come from direct senders (gated), of its source row
        gated = {r: self._direct_senders(adjacency[source[r]], [plan.nodes[x].agent for x in plan.judger_reads[source[r]]])
                 for r in rows}

        def key(r: int):  # rows whose judgers read the same inputs share its prefill (and a greedy decode)
            s = source[r]  # the same segments gated alike: which are senders is part of the input
            return (question_index[r], question_index[s], plan.judger_reads[s], tuple(gated[r])) if self.config.reuse else r

        unique: dict = {}
        for r in rows:
            unique.setdefault(key(r), r)
        messages, caches = self._judger_inputs(plan, list(unique.values()), source, questions, question_index, done,
                                               edge_logits, answer_format, generator, gated)
        prompts = {r: self.llm.chat_text(m) for r, m in messages.items()}
        cache_lengths = {r: sum(done[x].length for x in plan.judger_reads[source[r]]) if latent else 0
                         for r in unique.values()}
        groups: dict[int, list[int]] = {}
        for r in rows:
            if r not in undecoded:
                groups.setdefault(unique[key(r)], []).append(r)
        outputs = self._decode_judgers(groups, messages, prompts, caches, cache_lengths, realign, generator)
        sampled = self.config.temperature > 0
        for r in undecoded:  # an input built for a loss only: nothing decoded, nothing prefilled
            outputs.setdefault(r if sampled else unique[key(r)], ("", 0, 0, cache_lengths[unique[key(r)]]))
        rollouts, judger_inputs = [], []
        for r in rows:
            u = unique[key(r)]
            reads = plan.judger_reads[source[r]]
            rollouts.append(self._rollout(plan, r, question_index[r], adjacency[r], reads, done,
                                          *outputs[r if sampled else u]))
            if latent and keep_inputs:
                judger_inputs.append(JudgerInput(
                    question_index=question_index[r],
                    source_question=question_index[source[r]],
                    senders=[plan.nodes[x].agent for x in reads],
                    sender_kvs=[done[x].kv for x in reads],
                    gated=gated[r],
                    prompt=prompts[u],
                    sender_starts=[done[x].start for x in reads],
                    cache=caches[u],
                ))
        decoded = [r for r in rows if r not in undecoded]
        return rollouts, judger_inputs, len(decoded) if sampled else len({unique[key(r)] for r in decoded})

    def _judger_sources(self, question_index: Sequence[int]) -> list[int]:
        """Which row's inputs each row's judger reads: its own, or under the mismatched control
        another question's."""
        rows = range(len(question_index))
        if self.config.method != "latent" or self.config.judger_cache != "mismatched":
            return list(rows)
        others = {r: [s for s in rows if question_index[s] != question_index[r]] for r in rows}
        if any(not o for o in others.values()):
            raise ValueError("judger_cache='mismatched' needs rows of at least two different questions")
        return [others[r][r % len(others[r])] for r in rows]

    def _direct_senders(self, adjacency: torch.Tensor, agents: list[int]) -> list[bool]:
        """Per agent read by a judger: whether its edge agent -> judger is in the graph (N+1, N+1)."""
        n = self.roster.num_agents
        column = adjacency[:, n].tolist()  # a host tensor: the plan's graphs live on the CPU
        return [bool(column[a]) for a in agents]

    def _judger_inputs(self, plan, rows, source, questions, question_index, done, edge_logits, answer_format,
                       generator, gated) -> tuple[dict[int, list[dict]], dict[int, kv.KV]]:
        """The judger's prompt (chat messages) and cache of each of `rows`."""
        latent = self.config.method == "latent"
        n = self.roster.num_agents
        # slot permutations are drawn on the host, from a CPU generator of their own (a decoding generator
        # lives on the model's device; one generator cannot serve both on CUDA)
        shuffle_gen = torch.Generator().manual_seed(generator.initial_seed() if generator is not None else 0)
        prompts: dict[int, list[dict]] = {}
        caches: dict[int, kv.KV] = {}
        for r in rows:
            s = source[r]
            reads = plan.judger_reads[s]
            received = [] if latent else [(self.roster.roles[plan.nodes[x].agent].name, done[x].text) for x in reads]
            prompts[r] = judger_messages(self.roster.judger, questions[question_index[r]], answer_format,
                                         reads_others=bool(reads), received=received)
            if latent:
                agents = [plan.nodes[x].agent for x in reads]
                logits = None if edge_logits is None else edge_logits[question_index[s], agents, n]
                caches[r] = self.judger_cache([done[x].kv for x in reads], logits, shuffle_gen, gated=gated[r])
            else:
                caches[r] = kv.empty(1, self.llm.device)
        return prompts, caches

    def _decode_judgers(self, groups: dict[int, list[int]], messages, prompts, caches, cache_lengths, realign,
                        generator) -> dict[int, tuple[str, int, int, int]]:
        """groups: a row whose judger input is computed -> the rows reading that same input. Each input is
        prefilled once; greedy decoding is shared by its rows, a sampled one is drawn per row (G samples
        of a question are G draws, not copies). Returns row -> (answer, decoded tokens, prompt tokens,
        cache length), `max_batch` inputs per prefill and at most `max_batch` rows per decode."""
        cfg = self.config
        sampled = cfg.temperature > 0
        outputs = {}
        for chunk in _chunks(list(groups), cfg.max_batch):
            step, prompt_tokens, _, _ = self._prefill_prompts([messages[u] for u in chunk], [prompts[u] for u in chunk],
                                                              [caches[u] for u in chunk], logits=True)
            if cfg.judger_latent_steps:
                step = kv.latent_steps(self.llm.model, step, cfg.judger_latent_steps, realign, logits=True,
                                       pool=self.pool).step
            # (input index in the chunk, row) of every decode: one per input, or one per row when sampling
            targets = [(b, r) for b, u in enumerate(chunk) for r in (groups[u] if sampled else [u])]
            for part in _chunks(targets, cfg.max_batch):
                index = [b for b, _ in part]
                rows_step = step if len(part) == len(chunk) and index == list(range(len(chunk))) else kv.Step(
                    kv.select(step.kv, index), step.hidden[index], step.logits[index])
                answers, counts = self._decode(rows_step, cfg.max_new_tokens, generator)
                for j, (b, r) in enumerate(part):
                    outputs[r] = (answers[j], counts[j], prompt_tokens[b], cache_lengths[chunk[b]])
        return outputs

    def _rollout(self, plan, r: int, question: int, adjacency: torch.Tensor, reads, done, answer: str,
                 decoded: int, prompt_len: int, cache_len: int) -> Rollout:
        """Row r's result: its judger's answer and what the row cost (its agents and its judger)."""
        computed = [done[x] for x in plan.row_nodes[r]]
        judger_bytes = (cache_len + prompt_len + self.config.judger_latent_steps + decoded) * self.bytes_per_position
        latent = self.config.method == "latent"
        handed_positions = cache_len if latent else sum(done[x].decoded_tokens for x in reads)
        handed_bytes = (cache_len * self.bytes_per_position if latent
                        else sum(len(done[x].text.encode()) for x in reads))
        return Rollout(
            question_index=question,
            adjacency=adjacency,
            answer=answer,
            decoded_tokens=decoded + sum(x.decoded_tokens for x in computed),
            prompt_tokens=prompt_len + sum(x.prompt_tokens for x in computed),
            agent_cache_lengths={
                plan.nodes[x].agent: done[x].length
                for x in plan.row_nodes[r]
            },
            judger_senders=[plan.nodes[x].agent for x in reads],
            judger_cache_length=cache_len,
            agents_run=len(plan.row_nodes[r]),
            peak_cache_bytes=max([judger_bytes] + [x.peak_bytes for x in computed]),
            seconds=0.0,  # set by `run`: the batch's wall time spread over its rows
            messages={plan.nodes[x].agent: done[x].text for x in plan.row_nodes[r]}
            if self.config.method != "latent" else {},
            handed_positions=handed_positions,
            handed_bytes=handed_bytes,
        )


def run_latent_chain(
    llm: LocalLM,
    roster: Roster,
    questions: Sequence[str],
    *,
    answer_format: str,
    latent_steps: int = 10,
    max_new_tokens: int = 64,
    realign: str = "ridge",
) -> RolloutBatch:
    """The LatentMAS chain: agents in roster order, each on all earlier agents' work; the judger
    reads all of it. A special case of the engine (chain graph, `full` retention, plain concatenation)."""
    config = RolloutConfig(latent_steps=latent_steps, retention="full", max_new_tokens=max_new_tokens, realign=realign)
    engine = RolloutEngine(llm, roster, config)
    adjacency = judger_senders_all(fixed_adjacency("chain", roster.num_agents).expand(len(questions), -1, -1))
    return engine.run(questions, adjacency, list(range(len(questions))), answer_format=answer_format)


# ---- API-only baselines ---------------------------------------------------------------------------


def api_text_mas(
    client,
    roster: Roster,
    questions: Sequence[str],
    adjacency: torch.Tensor,
    question_index: Sequence[int],
    answer_format: str,
    *,
    active: Sequence[int] | None = None,
    agent_facts: Sequence[Sequence[str]] | None = None,
    reuse: bool = True,
) -> list[dict]:
    """The API-only baselines: the local text method (`RolloutEngine` with method="text") with
    every agent and the judger played by the API model. No agent sends to the judger: the API
    single agent.

    adjacency (R, N+1, N+1) bool (node N = the judger), question_index (R,) into `questions`,
    agent_facts[q][i] and `active` as in `RolloutEngine.run`. The plan is `plan_rollouts` with
    direct senders, as the local text method's: the same agents run (those with a path to the
    judger, shared between rows of a question with `reuse`) and every agent and the judger receive
    the same messages, in the same order, with the same prompts (`gcache.prompts`). One batched
    `client.chat_many_sync` per level, then one for the judgers (one request per row).

    Returns per row: answer, prompt_tokens and completion_tokens (the server's usage of the row's
    agents and its judger; an agent shared by rows counts in each, as in `Rollout`), and
    judger_senders (the agents whose messages the judger read, in order)."""
    check_inputs(adjacency, roster.num_agents, agent_facts)
    plan = plan_rollouts(adjacency, question_index, reads="senders", active=active, reuse=reuse)
    texts: dict[int, str] = {}
    usage: dict[int, tuple[int, int]] = {}  # node -> (prompt tokens, completion tokens)
    for level in range(plan.levels):
        pending = [x for x, node in enumerate(plan.nodes) if node.level == level]
        requests = []
        for x in pending:
            node = plan.nodes[x]
            facts = agent_facts[node.question] if agent_facts is not None else ()
            received = [(roster.roles[plan.nodes[i].agent].name, texts[i]) for i in node.reads]
            requests.append(agent_messages(roster.roles[node.agent], questions[node.question],
                                           facts=facts[node.agent] if facts else "", received=received))
        for x, reply in zip(pending, client.chat_many_sync(requests), strict=True):
            texts[x] = reply.text
            usage[x] = (reply.prompt_tokens, reply.completion_tokens)
    requests = [
        judger_messages(roster.judger, questions[question_index[r]], answer_format, reads_others=bool(reads),
                        received=[(roster.roles[plan.nodes[x].agent].name, texts[x]) for x in reads])
        for r, reads in enumerate(plan.judger_reads)
    ]
    replies = client.chat_many_sync(requests) if requests else []
    return [
        {
            "answer": reply.text,
            "prompt_tokens": reply.prompt_tokens + sum(usage[x][0] for x in plan.row_nodes[r]),
            "completion_tokens": reply.completion_tokens + sum(usage[x][1] for x in plan.row_nodes[r]),
            "judger_senders": [plan.nodes[x].agent for x in plan.judger_reads[r]],
        }
        for r, reply in enumerate(replies)
    ]

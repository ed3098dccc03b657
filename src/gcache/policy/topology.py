"""Topologies: which edges may exist among the agents, and the fixed graphs built from them.

Node N of an (N+1, N+1) graph is the judger. A topology mask (N, N) says which agent ->
agent edges the policy may sample; `edge_mask` adds the agent -> judger edges it samples;
the fixed graphs of baselines (`fixed_adjacency`, `with_judger_edges`, `oracle_adjacency`)
are built here too, so a learned and a fixed graph come from the same rules.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOPOLOGIES: tuple[str, ...] = (
    "full",
    "chain",
    "star",
    "layered",
    "mesh",
    "random",
    "debate",
    "direct",
)


def topology_mask(name: str, n: int, *, seed: int = 0) -> Tensor:
    """Which directed edges i -> j among ``n`` agents may exist. # (n, n) bool

    ``mask[i, j]`` allows agent i to send its cache to agent j. Never a self loop.

    - ``full``: every ordered pair; the sampler keeps the result acyclic.
    - ``chain``: i -> i+1.
    - ``star``: hub -> spokes: agent 0 sends to every other agent (0 -> j, j >= 1).
      The spokes all build on the hub's cache and never talk to each other; the
      judger (not a node) aggregates all of them.
    - ``layered``: agents split in order into 2 layers (n <= 3) or 3 layers
      (n >= 4), sizes as equal as possible with earlier layers larger; every agent
      of layer k may send to every agent of layer k+1.
    - ``mesh``: every forward pair i < j (a DAG by construction).
    - ``random``: each ordered pair independently with p = 0.5, fixed by ``seed``.
    - ``debate``: no edges; every agent works alone and only the judger aggregates.
    - ``direct``: no edges, and only agent 0 runs (see :func:`active_agents`): the
      single-agent baseline. Any ``n`` is accepted.

    Raises:
        ValueError: unknown ``name`` (lists the allowed names) or ``n < 1``.
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; allowed: {', '.join(TOPOLOGIES)}")
    if n < 1:
        raise ValueError(f"number of agents n must be >= 1, got {n}")
    idx = torch.arange(n)
    src, dst = idx[:, None], idx[None, :]  # broadcast to (n, n)
    if name == "full":
        return src != dst
    if name == "chain":
        return dst == src + 1
    if name == "star":
        return (src == 0) & (dst != 0)
    if name == "layered":
        num_layers = 1 if n == 1 else 2 if n <= 3 else 3
        layer = torch.cat(
            [torch.full((len(c),), k) for k, c in enumerate(idx.tensor_split(num_layers))]
        )
        return layer[None, :] == layer[:, None] + 1
    if name == "mesh":
        return src < dst
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(n, n, generator=generator) < 0.5) & (src != dst)
    return torch.zeros(n, n, dtype=torch.bool)  # debate, direct


def active_agents(name: str, n: int) -> list[int]:
    """Agents that run under topology ``name``: only agent 0 for ``direct``, else all."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; allowed: {', '.join(TOPOLOGIES)}")
    return [0] if name == "direct" else list(range(n))


JUDGER_EDGES = ("sampled", "all")


def edge_mask(topology: str, n: int, *, judger_edges: str = "sampled", seed: int = 0) -> Tensor:
    """Edges the policy samples over N agents and the judger (node N). # (N+1, N+1) bool

    Agent -> agent edges follow the topology among the agents that run under it; agent ->
    judger edges are sampled for every running agent when `judger_edges="sampled"`, and
    left out (every graph gets them instead, `with_judger_edges`) when `"all"`."""
    if judger_edges not in JUDGER_EDGES:
        raise ValueError(f"judger_edges={judger_edges!r} is not one of {JUDGER_EDGES}")
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    agents = active_agents(topology, n)
    mask[:n, :n] = topology_mask(topology, n, seed=seed)
    if judger_edges == "sampled":
        mask[agents, n] = True
    return mask


def fixed_adjacency(topology: str, n: int, seed: int = 0) -> Tensor:
    """A deterministic DAG from a topology mask: every allowed edge i -> j with i < j. # (N, N) bool"""
    mask = topology_mask(topology, n, seed=seed)
    return mask & torch.ones(n, n, dtype=torch.bool).triu(1)


def judger_senders_all(adjacency: Tensor, active: list[int] | None = None) -> Tensor:
    """Agent graphs (R, N, N) -> (R, N+1, N+1) with every (active) agent sending to the judger:
    the judger rule of fixed topologies."""
    r, n, _ = adjacency.shape
    out = torch.zeros(r, n + 1, n + 1, dtype=torch.bool)
    out[:, :n, :n] = adjacency.bool().cpu()
    agents = list(range(n)) if active is None else list(active)
    out[:, agents, n] = True
    return out


def with_judger_edges(adjacency: Tensor, active: list[int], judger_edges: str) -> Tensor:
    """Graphs (R, N+1, N+1) plus the edges that are not sampled: every active agent -> judger
    under `judger_edges="all"`. A detached CPU bool copy."""
    adjacency = adjacency.detach().cpu().bool().clone()
    if judger_edges == "all":
        adjacency[:, active, adjacency.shape[-1] - 1] = True
    return adjacency


def oracle_adjacency(examples, n: int, *, flat: bool = False) -> Tensor:
    """The tasks' oracle graphs (R, N+1, N+1) from `Example.oracle_edges` (-1 = the judger).
    `flat`: every agent of the oracle graph sends to the judger instead, with no agent -> agent
    edge (the `oracle-flat` control: the same agents, side by side, none reading another)."""
    out = torch.zeros(len(examples), n + 1, n + 1, dtype=torch.bool)
    for r, ex in enumerate(examples):
        if not ex.oracle_edges:
            raise ValueError(f"method 'oracle': question {ex.id!r} of this task has no oracle graph")
        for src, dst in ex.oracle_edges:
            if flat:
                out[r, src, n] = True
                if dst != -1:
                    out[r, dst, n] = True
            else:
                out[r, src, n if dst == -1 else dst] = True
    return out


def wrong_senders(adjacency: Tensor) -> Tensor:
    """The same graphs (R, N+1, N+1) with the judger reading, in place of each agent i it reads,
    agent (i + 1) mod N: the judger's column shifted by one agent, every other edge kept (the
    `wrong-sender` control: a trained channel reading a keeper that does not hold the answer).
    Refuses a row whose judger reads every agent or none (shifting would change nothing)."""
    adjacency = adjacency.detach().cpu().bool().clone()
    n = adjacency.shape[-1] - 1
    column = adjacency[:, :n, n]  # (R, N)
    counts = column.sum(-1)
    if bool(((counts == 0) | (counts == n)).any()):
        raise ValueError("the wrong-sender control needs graphs whose judger reads some agents but not all "
                         "(e.g. the oracle graph or a learned one); shifting an empty or full column changes nothing")
    adjacency[:, :n, n] = column.roll(1, dims=1)
    return adjacency

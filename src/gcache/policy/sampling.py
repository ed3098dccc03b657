"""DAG sampling from edge logits, and the probabilities, expected edge count and entropy
of the edge distribution; waves of a DAG for scheduling.

Sampling (:func:`sample_dags`): for each graph, the allowed edges (the topology
mask) are visited in a uniformly random order; each edge is drawn from
Bernoulli(p_ij) unless accepting it would close a cycle with the edges already
accepted, in which case it is skipped and not decided. The result is a DAG, and
log pi(G) = sum over decided edges of log p_ij (accepted) or log(1 - p_ij)
(rejected). Strictly this is the log-probability of the decisions given the
visiting order; the order does not depend on the parameters, so it is a valid
score-function estimator for the joint (order, decisions) process.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DagSample(NamedTuple):
    """G sampled DAGs per question."""

    adjacency: Tensor  # (B, G, N, N) bool, [i, j] = edge i -> j accepted
    decided: Tensor  # (B, G, N, N) bool, edge drawn from its Bernoulli (not skipped, in mask)
    visit_rank: (
        Tensor  # (B, G, N, N) long, position of the edge in the visiting order, -1 if not in mask
    )
    log_prob: Tensor  # (B, G) float, sum of log p / log(1-p) over decided edges; differentiable


def _check(logits: Tensor, mask: Tensor, temperature: float) -> None:
    if logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
        raise ValueError(f"logits must be (B, N, N), got {tuple(logits.shape)}")
    n = logits.shape[1]
    if mask.shape != (n, n) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a ({n}, {n}) bool tensor, got {tuple(mask.shape)} {mask.dtype}"
        )
    if mask.diagonal().any():
        raise ValueError(
            f"mask allows self loops at agents {mask.diagonal().nonzero().flatten().tolist()}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _accept_acyclic(
    src: Tensor, dst: Tensor, order: Tensor, want: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Visit edges in ``order`` per graph, accepting wanted edges that keep a DAG.

    Args:
        src, dst: endpoints of the E candidate edges. # (E,)
        order: edge ids in visiting order, per graph. # (M, E)
        want: whether each edge would be accepted if it closes no cycle. # (M, E)

    Returns:
        accepted, decided: per graph and edge; an edge is decided unless it would
        have closed a cycle when visited. # (M, E) bool each
    """
    m, e = want.shape
    rows = torch.arange(m)
    reach = torch.eye(n, dtype=torch.bool).repeat(m, 1, 1)  # (M, N, N) reflexive transitive closure
    accepted = torch.zeros(m, e, dtype=torch.bool)
    decided = torch.zeros(m, e, dtype=torch.bool)
    for k in range(e):
        edge = order[:, k]  # (M,)
        i, j = src[edge], dst[edge]  # (M,)
        ok = ~reach[rows, j, i]  # adding i -> j closes a cycle iff j already reaches i
        take = ok & want[rows, edge]
        decided[rows, edge] = ok
        accepted[rows, edge] = take
        # Everything that reaches i now reaches everything j reaches.
        new = reach[rows, :, i].unsqueeze(2) & reach[rows, j, :].unsqueeze(1)  # (M, N, N)
        reach |= new & take[:, None, None]
    return accepted, decided


def _scatter_edges(values: Tensor, src: Tensor, dst: Tensor, n: int, fill=False) -> Tensor:
    """Per-edge values (M, E) -> dense (M, N, N)."""
    out = torch.full((values.shape[0], n, n), fill, dtype=values.dtype)
    out[:, src, dst] = values
    return out


def sample_dags(
    logits: Tensor,
    mask: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> DagSample:
    """Sample ``num_samples`` DAGs per question (algorithm in the module docstring).

    Args:
        logits: edge logits from :class:`GraphPolicy`. # (B, N, N)
        mask: allowed edges from :func:`topology_mask`. # (N, N) bool
        num_samples: graphs per question, G >= 1.
        generator: CPU generator for the visiting orders and Bernoulli draws.
        temperature: p = sigmoid(logits / temperature).
    """
    _check(logits, mask, temperature)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    b, n, _ = logits.shape
    g, m = num_samples, b * num_samples
    src, dst = mask.cpu().nonzero(as_tuple=True)  # (E,) each
    e = src.numel()
    edge_logits = logits[:, src.to(logits.device), dst.to(logits.device)] / temperature  # (B, E)
    probs = torch.sigmoid(edge_logits.detach().float()).cpu().repeat_interleave(g, dim=0)  # (M, E)

    order = torch.rand(m, e, generator=generator).argsort(
        dim=1
    )  # (M, E) uniform random permutations
    want = torch.rand(m, e, generator=generator) < probs  # (M, E) Bernoulli draws
    accepted, decided = _accept_acyclic(src, dst, order, want, n)  # (M, E)

    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(e).expand(m, e))  # rank[m, order[m, k]] = k

    acc = accepted.view(b, g, e).to(logits.device)
    dec = decided.view(b, g, e).to(logits.device)
    edge_logits = edge_logits.unsqueeze(1)  # (B, 1, E)
    # log sigmoid(x) = -softplus(-x), stable for any x. (F.logsigmoid is equivalent but
    # took ~5 ms per call on tiny tensors with 2 CPU threads in torch 2.13.)
    terms = torch.where(acc, -F.softplus(-edge_logits), -F.softplus(edge_logits))  # (B, G, E)
    log_prob = (terms * dec).sum(-1)  # (B, G)

    shape = (b, g, n, n)
    return DagSample(
        adjacency=_scatter_edges(accepted, src, dst, n).view(shape).to(logits.device),
        decided=_scatter_edges(decided, src, dst, n).view(shape).to(logits.device),
        visit_rank=_scatter_edges(rank, src, dst, n, fill=-1).view(shape).to(logits.device),
        log_prob=log_prob,
    )


def deterministic_dag(logits: Tensor, mask: Tensor) -> Tensor:
    """The evaluation graph: allowed edges with p > 0.5, kept greedily by decreasing p. # (B, N, N) bool

    Edges are visited from the most to the least probable; one that would close a
    cycle with the edges already kept is dropped. Ties go to the lower row-major
    index (i * N + j). Temperature does not matter: p > 0.5 iff logit > 0.
    """
    _check(logits, mask, 1.0)
    b, n, _ = logits.shape
    src, dst = mask.cpu().nonzero(as_tuple=True)  # (E,)
    edge_logits = (
        logits.detach()[:, src.to(logits.device), dst.to(logits.device)].float().cpu()
    )  # (B, E)
    order = edge_logits.argsort(dim=1, descending=True, stable=True)  # (B, E)
    accepted, _ = _accept_acyclic(src, dst, order, edge_logits > 0, n)
    return _scatter_edges(accepted, src, dst, n).to(logits.device)


def edge_probabilities(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """p_ij = sigmoid(s_ij / T) on allowed edges, 0 elsewhere; differentiable. # (B, N, N)"""
    _check(logits, mask, temperature)
    return torch.sigmoid(logits / temperature) * mask.to(logits.device)


def expected_edges(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Expected number of edges before cycle skipping, sum of p over allowed edges. # (B,)"""
    return edge_probabilities(logits, mask, temperature).sum(dim=(1, 2))


def edge_entropy(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Sum of the Bernoulli entropies of the allowed edges, in nats; differentiable. # (B,)"""
    _check(logits, mask, temperature)
    x = logits / temperature
    # H = -p log p - (1-p) log(1-p) = p softplus(-x) + (1-p) softplus(x), stable for any x.
    p = torch.sigmoid(x)
    entropy = p * F.softplus(-x) + (1 - p) * F.softplus(x)  # (B, N, N)
    return (entropy * mask.to(logits.device)).sum(dim=(1, 2))


def topological_waves(adjacency: Tensor) -> list[list[int]]:
    """Group agents into waves that can run in parallel. # adjacency: (N, N) bool

    Wave 0 holds the agents without predecessors; an agent is in wave k + 1 when its
    latest predecessor is in wave k (longest-path depth). Every agent appears in
    exactly one wave, in increasing index order within a wave.

    Raises:
        ValueError: if the graph has a cycle (self loops included).
    """
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be (N, N), got {tuple(adjacency.shape)}")
    adj = adjacency.bool().cpu().tolist()
    n = len(adj)
    indegree = [sum(adj[i][j] for i in range(n)) for j in range(n)]
    wave = [0] * n
    ready = [j for j in range(n) if indegree[j] == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in range(n):
            if adj[i][j]:
                wave[j] = max(wave[j], wave[i] + 1)
                indegree[j] -= 1
                if indegree[j] == 0:
                    ready.append(j)
    if done < n:
        cyclic = [j for j in range(n) if indegree[j] > 0]
        raise ValueError(f"adjacency has a cycle through agents {cyclic}")
    waves: list[list[int]] = [[] for _ in range(max(wave, default=-1) + 1)]
    for j in range(n):
        waves[wave[j]].append(j)
    return waves

"""Graph policy: scores every directed edge between agents, samples DAGs, and its loss.

Pipeline for a batch of B questions and a roster of N agents::

    x_i  = [role_emb_i || query_emb]                   # (B, N, 2D) node features
    h    = GCN(x, anchor graph)                        # (B, N, H)  torch_geometric GCN
    z    = PairNorm(MLP([x || h]))                     # (B, N, K)  centred over the N agents
    a_i  = q . r_i - mean over the N agents of q . r   # (B, N)     query-role affinity
    s_ij = exp(log_scale) * (z_i W z_j + w_send.z_i + w_recv.z_j) + bias
           + kappa * (g_send a_i + g_recv a_j)         # (B, N, N)
    p_ij = sigmoid(s_ij / temperature)

Departures from G-Designer (S = Z Z^T, min-max rescaled to [-1, 1]), each for a
reason found by running the synthetic tasks of ``tests/test_graph_policy.py`` or
the lookup simulation:

* Unbounded logits. The min-max rescale with T = 1 caps every edge probability at
  sigmoid(1) = 0.731, so the topology can never become confident. Here a learned
  log-scale and bias let p go to 0 or 1.
* Directed scores. ``z_i . z_j`` is symmetric, p_ij = p_ji, so the policy could not
  prefer i -> j over j -> i; only the sampler's visiting order would settle the
  direction. W is a learned K x K matrix with random N(0, 1/K) entries, so
  s_ij and s_ji start (nearly) independent; initialised to the identity (the
  Z Z^T form) both directions of a rewarded pair tended to saturate together.
  The sender/receiver terms w_send.z_i + w_recv.z_j (initialised to 0) keep
  direction learnable for N = 2, where centred vectors satisfy z_1 = -z_0 and
  every bilinear form is symmetric.
* Centred node vectors (torch_geometric ``PairNorm``: subtract the mean over the
  agents of a question, rescale to RMS norm 1). What all agents share (the query
  half of the features, the MLP biases) otherwise dominates Z at initialisation,
  every logit moves together, and on the synthetic task all edges went to p = 1
  within ~50 Adam steps, after which the gradient vanished with p(0->2) =
  p(2->0) = 1. Centred vectors leave the common level to the single bias and
  make |s| depend only on the learned scale. Centring is per question, so the
  question still changes the differences between agents.
* Query-role affinity. With x_i = [r_i || q] alone, the question meets a role only
  where the MLP has learned a product of the two halves: on the lookup routing
  simulation (:mod:`gcache.policy.simulate`, ``scripts/policy_sim.py``: one of 4
  keepers holds the answer) that took 55-90 REINFORCE steps at lr 3e-3, and at 1e-2
  half the seeds had not converged after 300. The centred inner product a_i (the
  cosine for :class:`~gcache.embeddings.TextEmbedder`'s normalised embeddings) lets
  them meet directly, weighted by learned gains for the sender and the receiver of
  an edge. The gains start at 0: the untrained policy is the one without the term.
  Adam moves a parameter by about lr per step whatever its gradient's scale, and on
  lookup kappa * g_send must reach ~15 (centred cosines: ~0.3 relevant keeper,
  ~-0.1 distractors); the fixed multiplier kappa (``affinity_scale`` = 100) makes
  that ~15 steps at lr 1e-2 instead of ~1500. Centring leaves the common level to
  the bias (uncentred, convergence took twice as many steps). A learned D x D form
  q . U r was tried too: fast enough to matter, it learned the synthetic rewarded
  edge of the tests in ~5 steps while the reverse edge transiently rose; slowed
  down, it added nothing over g. GCN and MLP are trained with the gains. Where
  profiles say nothing about the question the affinity is noise (the synthetic
  question-dependent task with random embeddings took ~1.2x the steps); with
  identical profiles (the ``uniform`` roster) it is exactly 0.
* The MLP reads [x || h], not h alone: GCN smoothing can make linked agents
  identical (on a symmetric 2-node graph one layer does), losing the roles. The
  anchor graph is used as given (directed, with self loops): agent j aggregates
  from the roles that feed it.

Sampling (:func:`sample_dags`): for each graph, the allowed edges (the topology
mask) are visited in a uniformly random order; each edge is drawn from
Bernoulli(p_ij) unless accepting it would close a cycle with the edges already
accepted, in which case it is skipped and not decided. The result is a DAG, and
log pi(G) = sum over decided edges of log p_ij (accepted) or log(1 - p_ij)
(rejected). Strictly this is the log-probability of the decisions given the
visiting order; the order does not depend on the parameters, so it is a valid
score-function estimator for the joint (order, decisions) process.

Loss (:func:`reinforce_loss`), for G graphs sampled per question::

    A_g  = r_g - mean(r_h : h != g, r_h scorable)       leave-one-out baseline
    loss = -mean(A_g * log pi(G_g)) + edge_cost * mean(E[#edges]) - entropy_coef * mean(H)

Simplifications: plain on-policy REINFORCE, one gradient step per batch of
rollouts, so no importance ratio or clipping, and no KL penalty to a reference
policy (the edge entropy bonus is the only regulariser besides the edge cost).
Advantages are not divided by the reward std.

Why leave-one-out: G-Designer/G-cache use ``-r * log pi`` with r in {0, 1}, which
gives no gradient at all on failures and has high variance. With a leave-one-out
baseline a graph that failed (r = 0) on a question where another sampled graph
succeeded gets a negative advantage and is pushed down, a success among failures
is pushed up, and a question every graph solves (or fails) contributes nothing,
because nothing distinguishes its graphs. The baseline of sample g never uses r_g,
so the estimator stays unbiased.

Unscorable rewards are NaN (trl's ``None``): they get zero advantage and are left
out of every baseline. When a question has no other scorable reward (G = 1, or
all its other rewards are NaN) its baseline is the mean of the scorable rewards
of the *other questions* in the batch (still independent of the sample, so still
unbiased), and 0 if there are none. The mean in the loss runs over all B x G
entries, unscorable ones included (with zero advantage).

Usage::

    policy = GraphPolicy()
    logits = policy(role_emb, query_emb, roster.anchor_edge_index())  # (B, N, N)
    mask = topology_mask("full", roster.num_agents)
    T = policy.temperature
    sample = sample_dags(logits, mask, num_samples=4, generator=gen, temperature=T)
    rewards = ...  # (B, G) from rollouts of sample.adjacency; NaN = unscorable
    loss, stats = reinforce_loss(
        sample.log_prob, rewards, expected_edges(logits, mask, T), edge_entropy(logits, mask, T),
        edge_cost=0.01, entropy_coef=0.001,
    )
    eval_graph = deterministic_dag(logits, mask)  # (B, N, N)
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCN, MLP, PairNorm

logger = logging.getLogger(__name__)

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


class GraphPolicy(nn.Module):
    """GCN + MLP over the role graph, conditioned on the question; scores every directed edge.

    Args:
        embed_dim: size D of the role and query embeddings (node features are 2D).
        hidden_dim: GCN width and MLP hidden width.
        out_dim: size K of the node vectors z.
        gcn_layers: number of ``GCNConv`` layers (each followed by ReLU).
        mlp_layers: number of linear layers of the MLP (the last one is plain).
        dropout: dropout in the GCN and the MLP.
        init_scale: initial value of the learned logit scale (stored as its log).
        affinity_scale: fixed multiplier kappa of the query-role affinity term; under
            Adam one step moves that term by about kappa * lr * |a|. 0 removes the term
            and its parameters: the policy as it was before.
        temperature: p = sigmoid(s / temperature); pass ``policy.temperature`` to
            :func:`sample_dags` and friends. Not learned.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        hidden_dim: int = 64,
        out_dim: int = 32,
        gcn_layers: int = 2,
        mlp_layers: int = 2,
        dropout: float = 0.0,
        init_scale: float = 1.0,
        affinity_scale: float = 100.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("embed_dim", embed_dim),
            ("hidden_dim", hidden_dim),
            ("out_dim", out_dim),
            ("gcn_layers", gcn_layers),
            ("mlp_layers", mlp_layers),
        ):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if affinity_scale < 0:
            raise ValueError(f"affinity_scale must be >= 0, got {affinity_scale}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.embed_dim = embed_dim
        self.out_dim = out_dim
        self.affinity_scale = affinity_scale
        self.temperature = temperature
        # jk="last" applies the activation after every layer, the last included.
        # GCN normalisation with self loops is well defined on graphs of a few nodes
        # (an isolated node keeps its own features); no feature norm layers.
        self.gcn = GCN(
            in_channels=2 * embed_dim,
            hidden_channels=hidden_dim,
            num_layers=gcn_layers,
            dropout=dropout,
            act="relu",
            norm=None,
            jk="last",
            normalize=True,
            add_self_loops=True,
        )
        # The MLP also sees the node's own features: GCN smoothing alone can erase a
        # role's identity (on a symmetric 2-node graph both nodes come out identical).
        # norm=None: torch_geometric's default batch norm over a handful of nodes is noise.
        self.mlp = MLP(
            in_channels=2 * embed_dim + hidden_dim,
            hidden_channels=hidden_dim,
            out_channels=out_dim,
            num_layers=mlp_layers,
            dropout=dropout,
            act="relu",
            norm=None,
            plain_last=True,
        )
        self.pair_norm = PairNorm(scale=1.0)
        # W random, not the identity: with W = I (the symmetric Z Z^T form) raising
        # s_ij also raises s_ji one for one; on the question-dependent synthetic task
        # 3 of 10 seeds stalled with both directions of the rewarded pair near p = 1.
        self.edge_weight = nn.Parameter(
            torch.randn(out_dim, out_dim) / math.sqrt(out_dim)
        )  # W, (K, K)
        self.send_weight = nn.Parameter(torch.zeros(out_dim))  # w_send, (K,)
        self.recv_weight = nn.Parameter(torch.zeros(out_dim))  # w_recv, (K,)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.zeros(()))
        if affinity_scale > 0:
            # (g_send, g_recv); zero, so the untrained policy is the one without the term.
            self.affinity_gain = nn.Parameter(torch.zeros(2))

    def node_vectors(
        self, role_emb: Tensor, query_emb: Tensor, anchor_edge_index: Tensor
    ) -> Tensor:
        """Centred node vectors z for each question, mean 0 and RMS norm 1 over the N agents. # (B, N, K)"""
        if role_emb.dim() != 2 or query_emb.dim() != 2:
            raise ValueError(
                f"role_emb must be (N, D) and query_emb (B, D), got {tuple(role_emb.shape)} "
                f"and {tuple(query_emb.shape)}"
            )
        if role_emb.shape[1] != self.embed_dim or query_emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings must have embed_dim={self.embed_dim} columns, got role_emb "
                f"{tuple(role_emb.shape)} and query_emb {tuple(query_emb.shape)}"
            )
        n, b = role_emb.shape[0], query_emb.shape[0]
        if anchor_edge_index.dim() != 2 or anchor_edge_index.shape[0] != 2:
            raise ValueError(
                f"anchor_edge_index must be (2, E), got {tuple(anchor_edge_index.shape)}"
            )
        if anchor_edge_index.numel() and (
            anchor_edge_index.min() < 0 or anchor_edge_index.max() >= n
        ):
            raise ValueError(f"anchor_edge_index refers to nodes outside 0..{n - 1}")
        x = torch.cat(
            [role_emb.unsqueeze(0).expand(b, n, -1), query_emb.unsqueeze(1).expand(b, n, -1)],
            dim=-1,
        ).reshape(b * n, -1)  # (B*N, 2D)
        # One graph per question in a single disjoint batch: node b*N + i is agent i of question b.
        # The anchor graph stays directed: agent j aggregates from the roles that feed it.
        edges = anchor_edge_index.to(x.device).long()  # (2, E)
        offsets = torch.arange(b, device=x.device).repeat_interleave(edges.shape[1]) * n  # (B*E,)
        batch_edges = edges.repeat(1, b) + offsets  # (2, B*E)
        h = self.gcn(x, batch_edges)  # (B*N, H)
        z = self.mlp(torch.cat([x, h], dim=-1))  # (B*N, K)
        batch = torch.arange(b, device=x.device).repeat_interleave(n)  # (B*N,)
        return self.pair_norm(z, batch, b).reshape(b, n, self.out_dim)  # (B, N, K)

    def affinity(self, role_emb: Tensor, query_emb: Tensor) -> Tensor:
        """Query-role affinity q . r_i, centred over the N agents of each question. # (B, N)"""
        dot = query_emb @ role_emb.T  # (B, N)
        return dot - dot.mean(dim=1, keepdim=True)

    def forward(self, role_emb: Tensor, query_emb: Tensor, anchor_edge_index: Tensor) -> Tensor:
        """Edge logits s_ij for agent i sending to agent j, per question. # (B, N, N)

        Args:
            role_emb: role profile embeddings. # (N, D)
            query_emb: question embeddings. # (B, D)
            anchor_edge_index: the roster's directed anchor role graph. # (2, E)
        """
        z = self.node_vectors(role_emb, query_emb, anchor_edge_index)  # (B, N, K)
        pair = torch.einsum("bik,kl,bjl->bij", z, self.edge_weight, z)  # (B, N, N)
        send = (z @ self.send_weight).unsqueeze(2)  # (B, N, 1)
        recv = (z @ self.recv_weight).unsqueeze(1)  # (B, 1, N)
        logits = self.log_scale.exp() * (pair + send + recv) + self.bias  # (B, N, N)
        if self.affinity_scale > 0:
            a = self.affinity(role_emb, query_emb)  # (B, N)
            g_send, g_recv = self.affinity_scale * self.affinity_gain
            logits = logits + g_send * a.unsqueeze(2) + g_recv * a.unsqueeze(1)
        return logits


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


def reinforce_loss(
    log_prob: Tensor,
    rewards: Tensor,
    expected_edges: Tensor,
    entropy: Tensor,
    *,
    edge_cost: float,
    entropy_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE with a leave-one-out baseline, edge cost and entropy bonus.

    Args:
        log_prob: log pi of each sampled graph (from :func:`sample_dags`). # (B, G)
        rewards: task rewards; NaN = unscorable. # (B, G)
        expected_edges: from :func:`expected_edges`. # (B,)
        entropy: from :func:`edge_entropy`. # (B,)
        edge_cost: weight of the expected edge count (communication cost).
        entropy_coef: weight of the entropy bonus.

    Returns:
        The scalar loss and detached statistics for logging.
    """
    if log_prob.dim() != 2 or rewards.shape != log_prob.shape:
        raise ValueError(
            f"log_prob and rewards must both be (B, G), got {tuple(log_prob.shape)} and {tuple(rewards.shape)}"
        )
    b = log_prob.shape[0]
    if expected_edges.shape != (b,) or entropy.shape != (b,):
        raise ValueError(
            f"expected_edges and entropy must be ({b},), got {tuple(expected_edges.shape)} and {tuple(entropy.shape)}"
        )
    rewards = rewards.detach().to(log_prob.device, log_prob.dtype)
    scorable = ~rewards.isnan()  # (B, G)
    r = torch.where(scorable, rewards, torch.zeros_like(rewards))  # (B, G)
    count = scorable.to(r.dtype)

    # Leave-one-out within the question: mean of the other scorable rewards.
    others_n = count.sum(1, keepdim=True) - count  # (B, G)
    others_sum = r.sum(1, keepdim=True) - r  # (B, G)
    loo = others_sum / others_n.clamp_min(1)
    # Fallback when no other graph of the question is scorable: the other questions' rewards.
    rest_n = count.sum() - count.sum(1, keepdim=True)  # (B, 1)
    rest_sum = r.sum() - r.sum(1, keepdim=True)  # (B, 1)
    fallback = torch.where(rest_n > 0, rest_sum / rest_n.clamp_min(1), torch.zeros_like(rest_sum))
    baseline = torch.where(others_n > 0, loo, fallback.expand_as(loo))  # (B, G)
    advantage = torch.where(scorable, r - baseline, torch.zeros_like(r))  # (B, G)

    pg_loss = -(advantage * log_prob).mean()
    edges = expected_edges.mean()
    ent = entropy.mean()
    loss = pg_loss + edge_cost * edges - entropy_coef * ent
    stats = {
        "pg_loss": pg_loss.detach(),
        "reward_mean": rewards.nanmean(),  # NaN if nothing was scorable
        "scorable_frac": count.mean(),
        "advantage_abs_mean": advantage.abs().mean(),
        "expected_edges": edges.detach(),
        "entropy": ent.detach(),
        "log_prob_mean": log_prob.detach().mean(),
    }
    return loss, stats

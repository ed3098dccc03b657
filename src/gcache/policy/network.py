"""The graph policy network: scores every directed edge between agents for a question.

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

What the scores are used for: :mod:`gcache.policy.sampling` (DAGs, probabilities,
entropy) and :mod:`gcache.policy.loss` (REINFORCE). A step of training::

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

import math

import torch
from torch import Tensor, nn
from torch_geometric.nn import GCN, MLP, PairNorm


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

"""The topology's training loss: REINFORCE over sampled DAGs.

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
"""

from __future__ import annotations

import torch
from torch import Tensor


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

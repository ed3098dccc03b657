"""Policy-only simulation of routing on the ``lookup`` task: how many rollouts does the policy need?

N keepers each hold the facts of one domain; a question asks one item and only the
relevant keeper's cache holds the answer. The policy scores the N agent -> judger
edges (node N is the judger), :func:`sample_dags` draws G graphs per question, and
instead of running the LM each graph gets a Bernoulli reward from the calibration
table measured on the embedded model (:data:`REWARD_BY_DISTRACTORS`). Training is
Adam on the module's loss (leave-one-out :func:`reinforce_loss`, edge cost, entropy
bonus); every ``eval_every`` steps the mean p(relevant -> judger) and
p(distractor -> judger) on held-out questions are recorded.

Questions and profiles come from ``gcache.tasks.lookup`` and the ``keepers`` roster
when both exist; otherwise (:func:`lookup_data` says which in ``source``) from an
equivalent generator here: 8 colours x 4 domains, 2 colours per domain held out.

Usage::

    data = lookup_data()                      # embeds once with TextEmbedder
    history = simulate(GraphPolicy, data, steps=150, lr=1e-2, seed=0)
    settings = config_settings(load_policy_config())   # gcache/conf/policy/default.yaml
    history = simulate(data=data, steps=150, seed=0, **settings)
    history.steps_to(p_rel=0.9, p_dis=0.1)    # first evaluated step meeting both, or None

``scripts/policy_sim.py`` compares policy settings over seeds.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gcache.policy.loss import reinforce_loss
from gcache.policy.sampling import edge_entropy, edge_probabilities, expected_edges, sample_dags

logger = logging.getLogger(__name__)

DEFAULT_POLICY_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "policy" / "default.yaml"

# Judger reward by the number of distractors read next to the relevant keeper (calibration
# on the embedded LM); any graph without the relevant keeper scores 0, so does the empty one.
REWARD_BY_DISTRACTORS: tuple[float, ...] = (1.0, 0.65, 0.35, 0.15)

# Fallback generator, used only when gcache.tasks.lookup / the keepers roster are missing.
_DOMAINS = (  # (item, things, keeper profile)
    ("code", "door", "Keeps the codes of the doors."),
    ("number", "locker", "Keeps the numbers of the lockers."),
    ("platform", "train", "Keeps the platforms of the trains."),
    ("floor", "room", "Keeps the floors of the rooms."),
)
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_JUDGER_PROFILE = "Reads what the keepers hold and answers the question."


@dataclass(frozen=True)
class LookupData:
    """Embedded roles and questions of the routing problem (node N is the judger)."""

    role_emb: Tensor  # (N+1, D) keeper profiles, then the judger's
    anchor_edge_index: (
        Tensor  # (2, E) roster anchor edges + every agent -> judger, as the module builds it
    )
    train_query: Tensor  # (Q, D)
    train_relevant: Tensor  # (Q,) long, index of the keeper that holds the answer
    heldout_query: Tensor  # (H, D)
    heldout_relevant: Tensor  # (H,) long
    source: str  # "gcache.tasks.lookup" or "generated"

    @property
    def num_agents(self) -> int:
        """N, the keepers (the judger not counted)."""
        return self.role_emb.shape[0] - 1

    def mask(self) -> Tensor:
        """Only agent -> judger edges may exist. # (N+1, N+1) bool"""
        n = self.num_agents
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:n, n] = True
        return mask


def _generated_questions() -> tuple[
    list[str], list[str], list[tuple[str, int]], list[tuple[str, int]]
]:
    """(keeper profiles, judger profile, train (question, keeper), held-out (question, keeper))."""
    train, heldout = [], []
    for k, (item, thing, _) in enumerate(_DOMAINS):
        for c, colour in enumerate(_COLOURS):
            question = f"What is the {item} of the {colour} {thing}?"
            # Two colours per domain held out, different ones for each domain.
            (heldout if c in (2 * k, 2 * k + 1) else train).append((question, k))
    return [d[2] for d in _DOMAINS], [_JUDGER_PROFILE], train, heldout


def _task_questions(num_agents: int):
    """The same from ``gcache.tasks.lookup`` and the ``keepers`` roster; None when either is missing.

    The task repeats question texts across its examples and splits, so held-out questions
    are chosen among the distinct texts: a quarter of each keeper's, fixed by a seeded shuffle.
    """
    try:
        from gcache.agents import build_roster
        from gcache.tasks.lookup import Lookup

        roster = build_roster("keepers", num_agents)
    except (ImportError, ValueError) as exc:
        logger.info("lookup task or keepers roster unavailable (%s): generating questions", exc)
        return None
    by_keeper: dict[int, list[str]] = {}
    for ex in Lookup(num_agents=num_agents).load_examples():
        ((keeper, _),) = ex.oracle_edges  # one hop: the relevant keeper -> the judger (-1)
        if ex.question not in by_keeper.setdefault(keeper, []):
            by_keeper[keeper].append(ex.question)
    train, heldout = [], []
    for keeper, questions in sorted(by_keeper.items()):
        questions = sorted(questions)
        random.Random(keeper).shuffle(questions)
        cut = max(1, len(questions) // 4)
        heldout += [(q, keeper) for q in questions[:cut]]
        train += [(q, keeper) for q in questions[cut:]]
    return list(roster.profiles), [roster.judger.profile], train, heldout, roster


def lookup_data(embedder=None, num_agents: int = 4) -> LookupData:
    """Embed keepers, judger and questions with ``embedder`` (default: a new ``TextEmbedder``)."""
    from gcache.embeddings import TextEmbedder

    embedder = embedder or TextEmbedder()
    found = _task_questions(num_agents)
    n = num_agents
    judger = torch.stack([torch.arange(n), torch.full((n,), n)])  # (2, N) agent -> judger
    if found is None:
        if num_agents != len(_DOMAINS):
            raise ValueError(
                f"the generated questions have {len(_DOMAINS)} keepers, asked for {num_agents}"
            )
        profiles, judger_profile, train, heldout = _generated_questions()
        anchor, source = judger, "generated"
    else:
        profiles, judger_profile, train, heldout, roster = found
        anchor, source = torch.cat([roster.anchor_edge_index(), judger], 1), "gcache.tasks.lookup"
    return LookupData(
        role_emb=embedder.embed(profiles + judger_profile),
        anchor_edge_index=anchor,
        train_query=embedder.embed([q for q, _ in train]),
        train_relevant=torch.tensor([k for _, k in train]),
        heldout_query=embedder.embed([q for q, _ in heldout]),
        heldout_relevant=torch.tensor([k for _, k in heldout]),
        source=source,
    )


def lookup_rewards(adjacency: Tensor, relevant: Tensor, generator: torch.Generator) -> Tensor:
    """Bernoulli rewards of sampled graphs from :data:`REWARD_BY_DISTRACTORS`. # (B, G)

    Args:
        adjacency: sampled graphs over N agents + the judger. # (B, G, N+1, N+1) bool
        relevant: the keeper holding each question's answer. # (B,) long
    """
    b, g, n = adjacency.shape[0], adjacency.shape[1], adjacency.shape[-1] - 1
    to_judger = adjacency[..., :n, n]  # (B, G, N)
    has_relevant = to_judger.gather(2, relevant.view(b, 1, 1).expand(b, g, 1)).squeeze(2)  # (B, G)
    distractors = to_judger.sum(-1) - has_relevant.long()  # (B, G), at most N - 1
    table = torch.tensor(REWARD_BY_DISTRACTORS + (0.0,) * n)  # more distractors than measured: 0
    p_success = torch.where(has_relevant, table[distractors], 0.0)  # (B, G)
    return (torch.rand(p_success.shape, generator=generator) < p_success).float()


@dataclass
class History:
    """Held-out routing probabilities after each evaluated step (step 0 = untrained)."""

    steps: list[int] = field(default_factory=list)
    p_rel: list[float] = field(default_factory=list)  # mean p(relevant -> judger)
    p_dis: list[float] = field(default_factory=list)  # mean p(distractor -> judger)
    reward: list[float] = field(default_factory=list)  # mean training reward of the step, per step

    def steps_to(self, p_rel: float = 0.9, p_dis: float = 0.1) -> int | None:
        """First evaluated step with mean p_rel above and mean p_dis below the thresholds."""
        for step, rel, dis in zip(self.steps, self.p_rel, self.p_dis, strict=True):
            if rel > p_rel and dis < p_dis:
                return step
        return None


@torch.no_grad()
def routing_probabilities(
    policy: nn.Module, data: LookupData, query: Tensor, relevant: Tensor
) -> tuple[float, float]:
    """Mean p(relevant -> judger) and mean p(distractor -> judger) over the questions."""
    n = data.num_agents
    logits = policy(data.role_emb, query, data.anchor_edge_index)  # (B, N+1, N+1)
    p = edge_probabilities(logits, data.mask(), policy.temperature)[:, :n, n]  # (B, N)
    is_rel = torch.nn.functional.one_hot(relevant, n).bool()  # (B, N)
    return p[is_rel].mean().item(), p[~is_rel].mean().item()


def simulate(
    policy_factory: Callable[[], nn.Module],
    data: LookupData,
    *,
    steps: int,
    lr: float,
    batch: int = 4,
    graphs: int = 4,
    seed: int = 0,
    eval_every: int = 5,
    edge_cost: float = 0.01,
    entropy_coef: float = 0.01,
    stop_at: tuple[float, float] | None = None,
) -> History:
    """Train a fresh policy on simulated lookup rewards; evaluate on held-out questions.

    Args:
        policy_factory: builds the policy (called after seeding torch with ``seed``).
        data: from :func:`lookup_data`.
        steps: Adam steps, each on ``batch`` training questions x ``graphs`` sampled graphs.
        lr: Adam learning rate.
        eval_every: evaluate after every this many steps (and before the first).
        edge_cost, entropy_coef: as in :func:`reinforce_loss`.
        stop_at: (p_rel, p_dis) thresholds; stop at the first evaluation meeting both.
    """
    torch.manual_seed(seed)
    policy = policy_factory()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    sampler = torch.Generator().manual_seed(seed)  # graphs and rewards
    picker = random.Random(seed)  # questions
    mask = data.mask()
    history = History()

    def evaluate(step: int) -> bool:
        rel, dis = routing_probabilities(policy, data, data.heldout_query, data.heldout_relevant)
        history.steps.append(step)
        history.p_rel.append(rel)
        history.p_dis.append(dis)
        return stop_at is not None and rel > stop_at[0] and dis < stop_at[1]

    if evaluate(0):
        return history
    num_train = data.train_query.shape[0]
    for step in range(1, steps + 1):
        idx = torch.tensor(picker.sample(range(num_train), batch))
        query = data.train_query[idx]  # (B, D)
        logits = policy(data.role_emb, query, data.anchor_edge_index)  # (B, N+1, N+1)
        t = policy.temperature
        sample = sample_dags(logits, mask, graphs, sampler, temperature=t)
        rewards = lookup_rewards(sample.adjacency, data.train_relevant[idx], sampler)  # (B, G)
        loss, _ = reinforce_loss(
            sample.log_prob,
            rewards,
            expected_edges(logits, mask, t),
            edge_entropy(logits, mask, t),
            edge_cost=edge_cost,
            entropy_coef=entropy_coef,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.reward.append(rewards.mean().item())
        if step % eval_every == 0 and evaluate(step):
            break
    return history


def load_policy_config(path: str | Path = DEFAULT_POLICY_CONFIG) -> DictConfig:
    """A ``policy`` config group file, as ``gcache.train`` composes it."""
    return OmegaConf.load(path)


def config_settings(policy_cfg: DictConfig) -> dict[str, Any]:
    """The arguments of :func:`simulate` that a policy config sets, read as ``gcache.train`` does."""
    return {
        "policy_factory": lambda: instantiate(policy_cfg.net),
        "lr": policy_cfg.policy_lr,
        "edge_cost": policy_cfg.edge_cost,
        "entropy_coef": policy_cfg.entropy_coef,
    }

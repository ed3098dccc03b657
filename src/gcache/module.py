"""GCacheModule: the LightningModule that learns the communication graph and the cache fuser.

Its only parameters are the `GraphPolicy` (GCN + MLP) and the `CacheFuser`. The frozen
LM and the sentence embedder are held outside the module's parameters (plain
attributes, built in `setup`) and never written into checkpoints.

`training_step` for a batch of B questions reads sample -> rollout -> score (`collect`, one
`Trajectory` record) -> `losses` -> `step_metrics`:

1. edge logits (B, N+1, N+1) from the policy over the N agents and the judger (node N);
2. G DAGs per question over the agents and the judger: agent -> agent edges under the
   topology mask, agent -> judger edges sampled too (`judger_edges="sampled"`) or all
   present (`"all"`, the rule of fixed topologies). Only agents with a path to the judger
   run; a graph without judger edges is the judger answering alone;
3. rollouts of all B·G graphs (`RolloutEngine`, batched, identical agents shared);
4. rewards from the task (`Task.reward`; None = unscorable, left out of baselines);
5. policy loss: REINFORCE with a leave-one-out baseline + edge cost − entropy bonus;
6. fuser loss: teacher-forced NLL of the reference answer given the judger's prompt on
   its fused cache, each sender weighted from its judger-edge logit, on the graph where the
   judger reads every agent (`fuser_graph="all"`: one more row per question, built with the
   sampled rows' agents and never decoded) or on the sampled graphs (`"sampled"`). The weights
   are applied only where the judger reads (see `gcache.rollout`), so this loss differentiates
   exactly what the rollout applies. It trains the fuser; it reaches the policy through the edge
   logits only when `fuser_trains_policy=True` (default off: the topology learns from reward);
7. one Adam step on policy + fuser (automatic optimisation).

Validation and test use the deterministic graph (p > 0.5) and greedy decoding. Validations keep their
agents' segments (`val_memo`, bounded): an agent's work depends on its question, role and inputs, not on
the policy, so the keepers a later validation routes were mostly computed by an earlier one.

`graphs="oracle"` (tasks with oracle graphs, e.g. `lookup`) replaces steps 1-2 and 5: every
question runs once on its task's oracle graph, the policy is neither sampled nor trained, and
only the fuser (its gates and channel) learns, from the answer NLL. It isolates what the
channel can carry from who is routed to the judger; validation and test use the oracle graph too.

Randomness and reproducibility:

- DAG sampling draws from a generator seeded by (seed, question id, global step), one per
  question. A question's graphs therefore do not depend on which batch, rank or process it
  lands in: under DDP every rank samples its own questions' graphs exactly as a single
  process would (no seed + rank streams are needed), and a resumed run samples what the
  uninterrupted run did without any generator state in the checkpoint.
- Everything else that may draw random numbers (policy dropout, decoding at temperature > 0)
  uses the global torch / numpy / Python generators; checkpoints save and restore them.
- A non-finite reward or loss skips the update on every rank, with a warning naming the
  question ids. The decision is all-reduced, so DDP ranks always agree; the step still
  back-propagates a zero loss (Lightning refuses a `None` loss under DDP, and every rank must
  join the gradient all-reduce), and `optimizer_step` drops those gradients so Adam leaves
  the parameters and its state untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from gcache.agents import Roster
from gcache.checkpoints import rng_states, set_rng_states
from gcache.embeddings import TextEmbedder
from gcache.llm.local import LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.policy.loss import reinforce_loss
from gcache.policy.network import GraphPolicy
from gcache.policy.sampling import (
    DagSample,
    deterministic_dag,
    edge_entropy,
    edge_probabilities,
    expected_edges,
    sample_dags,
)
from gcache.policy.topology import (
    active_agents,
    edge_mask,
    fixed_adjacency,
    judger_senders_all,
    oracle_adjacency,
    with_judger_edges,
)
from gcache.rollout import AgentMemo, RolloutBatch, RolloutConfig, RolloutEngine
from gcache.tasks.base import Example, Task

log = logging.getLogger(__name__)

GRAPHS = ("learned", "oracle")  # where a step's graphs come from: sampled from the policy, or the task's oracle
# Validations run the same questions every time: their agents' segments are kept between them, up to this
# (the quickstart: at most its 16 questions x 4 keepers, about 5 MB each in float32: 320 MB).
VAL_MEMO_BYTES = 512 * 2**20

# Lightning warns whenever a module overrides `transfer_batch_to_device` next to a datamodule;
# ours does so on purpose (batches are lists of Examples, not tensors).
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device`")


@dataclass(frozen=True)
class LossConfig:
    edge_cost: float = 0.01
    entropy_coef: float = 0.01
    fuser_weight: float = 1.0
    fuser_rows_per_question: int = 1  # sampled graphs per question used in the fuser loss (fuser_graph "sampled")
    fuser_graph: str = "sampled"  # what the fuser's NLL reads: "sampled" graphs, or "all" (every agent -> judger)


FUSER_GRAPHS = ("sampled", "all")


@dataclass
class Trajectory:
    """One training step's experience: what the policy sampled, what ran, and what it scored."""

    batch: list[Example]  # B questions
    logits: torch.Tensor  # (B, N+1, N+1) edge logits (with their graph: the losses differentiate them)
    sample: DagSample | None  # G sampled graphs per question and their log-probabilities (B, G); None: oracle graphs
    adjacency: torch.Tensor  # (B·G, N+1, N+1) the graphs that ran: sampled plus fixed edges (oracle: G = 1)
    question_index: list[int]  # (B·G,) each row's question
    rows: RolloutBatch  # the rollouts (answers, costs) and what each judger read
    answers: list[str | None]  # (B·G,) final answers; None = an API request that failed
    scores: list[float | None]  # (B·G,) task rewards; None = unscorable
    api_stats: dict[str, float]  # API usage of the final answers (hybrid, api_hint)
    rollout_s: float  # seconds spent in rollouts and final answers
    fuser_inputs: list | None = None  # judger inputs of the fuser's graphs (`fuser_graph="all"`; None: the rows')

    def rewards(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, G) rewards; NaN = unscorable."""
        values = [math.nan if r is None else float(r) for r in self.scores]
        return torch.tensor(values, device=device).view(len(self.batch), -1)


@dataclass
class StepLosses:
    total: torch.Tensor  # policy + fuser_weight * fuser
    policy: torch.Tensor  # REINFORCE + edge cost - entropy bonus
    fuser: torch.Tensor  # the judger's answer NLL on its fused cache
    stats: dict[str, torch.Tensor]  # the REINFORCE loss's statistics (advantages, entropy, ...)


class GCacheModule(L.LightningModule):
    def __init__(
        self,
        *,
        task: Task,
        roster: Roster,
        policy: GraphPolicy,
        fuser: CacheFuser,
        llm: LocalLM,
        embedder: TextEmbedder,
        rollout: RolloutConfig,
        topology: str = "full",
        topology_seed: int = 0,
        graphs_per_question: int = 4,
        policy_lr: float = 1e-3,
        fuser_lr: float = 5e-2,
        channel_lr: float = 1e-3,
        loss: LossConfig = LossConfig(),
        judger_edges: str = "sampled",
        fuser_trains_policy: bool = False,
        graphs: str = "learned",
        generator_mode: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if graphs_per_question < 1:
            raise ValueError(f"graphs_per_question must be >= 1, got {graphs_per_question}")
        if graphs not in GRAPHS:
            raise ValueError(f"graphs={graphs!r} is not one of {list(GRAPHS)}")
        if graphs == "oracle" and not task.oracle_graphs:
            raise ValueError(f"graphs='oracle' needs a task with oracle graphs (e.g. lookup); {task.name!r} has none")
        if loss.fuser_graph not in FUSER_GRAPHS:
            raise ValueError(f"fuser_graph={loss.fuser_graph!r} is not one of {list(FUSER_GRAPHS)}")
        self.graphs = graphs
        self.task = task
        self.roster = roster
        self.policy = policy
        self.fuser = fuser
        if fuser.num_layers != llm.num_layers:
            raise ValueError(f"the fuser has {fuser.num_layers} layers but the model has {llm.num_layers}")
        # Plain attributes, not submodules: never trained, never in a checkpoint.
        self.llm = llm
        self.embedder = embedder
        if generator_mode is not None:  # the local judger writes a draft / hint of bounded length
            rollout = dataclasses.replace(rollout, max_new_tokens=generator_mode.local_tokens)
        self.rollout_config = rollout
        self.topology = topology
        self.graphs_per_question = graphs_per_question
        self.policy_lr = policy_lr
        self.fuser_lr = fuser_lr
        self.channel_lr = channel_lr
        self.loss_config = loss
        self.generator_mode = generator_mode  # gcache.modes.* object or None (= local)
        self.seed = seed
        n = roster.num_agents
        # Edges sampled over the agents and the judger; the topology never links an agent that
        # does not run (`direct` runs agent 0 alone and allows no agent edges).
        self.judger_edges = judger_edges
        self.fuser_trains_policy = fuser_trains_policy
        self.register_buffer("edge_mask", edge_mask(topology, n, judger_edges=judger_edges, seed=topology_seed),
                             persistent=False)
        self.active = active_agents(topology, n)
        self.topology_seed = topology_seed
        self._role_emb: torch.Tensor | None = None
        self._engine: RolloutEngine | None = None
        self.last_step_timings: dict[str, float] = {}
        self._skip_update = False  # set by training_step, read by optimizer_step
        self.test_records: list[dict] = []  # per-question test predictions of this rank
        self.val_records: list[dict] = []  # this validation's completions on this rank (`completion_records`)
        # baselines run on every test batch next to the policy, sharing its agents (`gcache.evaluate.TestComparison`)
        self.test_comparison = None
        # the validation questions' agents, computed at the first validation that runs them (`AgentMemo`)
        self.val_memo = AgentMemo(max_bytes=VAL_MEMO_BYTES)
        # The config groups this run was built with (`gcache.build.build_module`), saved in checkpoints so
        # that an evaluation of one runs what the run ran (`gcache.evaluate.adopt_run_settings`).
        self.run_settings: dict[str, Any] = {}
        # What decides the meaning of the parameters (checked when a checkpoint is loaded again).
        self.run_identity: dict[str, Any] = {
            "task": task.name, "model": llm.name, "roster": roster.name, "num_agents": roster.num_agents,
            "topology": topology, "topology_seed": topology_seed, "judger_edges": judger_edges,
            "policy": {k: v for k, v in vars(policy).items()
                       if k != "training" and isinstance(v, (int, float, str, bool))},
            # what every prompt was built with (absent when empty, as in checkpoints before the key)
            **({"chat_template_kwargs": dict(llm.chat_template_kwargs)} if llm.chat_template_kwargs else {}),
            # absent at their defaults, as in checkpoints from before these keys
            **({"channel": fuser.describe()} if fuser.channel != "gates" else {}),
            **({"fusion": fuser.fusion} if fuser.fusion != "values" else {}),
            **({"graphs": graphs} if graphs != "learned" else {}),
        }

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None:
            self._engine = RolloutEngine(self.llm, self.roster, self.rollout_config, fuser=self.fuser)
        return self._engine

    def _role_embeddings(self) -> torch.Tensor:
        if self._role_emb is None:
            texts = [*self.roster.profiles, self.roster.judger.profile]
            with torch.inference_mode(False):  # kept from a validation (inference mode) into training
                self._role_emb = self.embedder.embed(texts)  # (N+1, D)
        return self._role_emb.to(self.device)

    def _anchor_edges(self) -> torch.Tensor:
        """Roster anchor edges plus every agent -> judger (node N). (2, E)"""
        n = self.roster.num_agents
        judger = torch.stack([torch.arange(n), torch.full((n,), n)])
        return torch.cat([self.roster.anchor_edge_index(), judger], 1).to(self.device)

    def dag_generator(self, example_id: str) -> torch.Generator:
        """The DAG-sampling stream of one question at the current global step (see the module doc)."""
        key = f"{self.seed}/{example_id}/{self.global_step}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)

    def sample_graphs(self, batch: list[Example], logits: torch.Tensor) -> DagSample:
        """G DAGs per question, each question from its own stream. (B, G, N+1, N+1) adjacency"""
        parts = [
            sample_dags(logits[i : i + 1], self.edge_mask, self.graphs_per_question,
                        generator=self.dag_generator(ex.id), temperature=self.policy.temperature)
            for i, ex in enumerate(batch)
        ]
        return DagSample(*(torch.cat(field) for field in zip(*parts, strict=True)))

    def add_fixed_edges(self, adjacency: torch.Tensor) -> torch.Tensor:
        """Graphs (R, N+1, N+1) plus the edges that are not sampled: every running agent ->
        judger under `judger_edges="all"`."""
        return with_judger_edges(adjacency, self.active, self.judger_edges)

    def edge_logits(self, questions: list[str]) -> torch.Tensor:
        """(B, N+1, N+1) policy logits; column N scores agent -> judger edges."""
        query = self.embedder.embed(questions).to(self.device)  # (B, D)
        return self.policy(self._role_embeddings(), query, self._anchor_edges())

    # ---- steps ---------------------------------------------------------------------------------
    def score(self, answers: list[str | None], examples: list[Example]) -> list[float | None]:
        """Task rewards; None where there is no answer (an API request that failed for good)."""
        rewards = self.task.reward(["" if a is None else a for a in answers], examples)
        return [None if a is None else r for a, r in zip(answers, rewards, strict=True)]

    def _answers(self, batch: list[Example], rows) -> tuple[list[str | None], dict[str, float]]:
        """Final answers: the judger's decoding (local) or the API model's (hybrid, api_hint;
        None for an item whose request failed after its retries)."""
        answers = [r.answer for r in rows.rollouts]
        if self.generator_mode is None:
            return answers, {}
        questions = [batch[r.question_index].question for r in rows.rollouts]
        return self.generator_mode.finalize(questions, answers, self.task.answer_format)

    def api_part(self, name: str) -> AbstractContextManager:
        """The API usage inside counts to part `name` of the run (`ApiMode.ledger`); local: nothing."""
        return nullcontext() if self.generator_mode is None else self.generator_mode.ledger.part(name)

    # ---- training: sample -> rollout -> score -> trajectory -> losses -> metrics ------------------
    def training_step(self, batch: list[Example], batch_idx: int):
        start = time.perf_counter()
        with self.api_part("train"):
            trajectory = self.collect(batch)
        losses = self.losses(trajectory)
        # Forward parts of the update (the backward and optimiser step follow in Lightning).
        self.last_step_timings = {"rollout_s": trajectory.rollout_s,
                                  "update_forward_s": time.perf_counter() - start - trajectory.rollout_s}
        self._skip_update = not self._on_every_rank(losses is not None)
        if self._skip_update:
            if losses is not None:
                log.warning("step %d skipped: another rank had a non-finite reward or loss", self.global_step)
            return sum(p.sum() for p in self.parameters()) * 0.0  # zero gradients; optimizer_step drops them
        metrics = self.step_metrics(trajectory, losses, start)
        # One step count everywhere (loggers, history.jsonl, completions/, topology/, checkpoints): the
        # training steps completed, so this step's metrics are at global_step + 1 (Lightning's default
        # for loggers is the index of the step, one less). A logged `step` sets the loggers' step.
        self.log_dict({**metrics, "step": float(self.global_step + 1)}, batch_size=len(batch), prog_bar=False)
        self.log("reward", metrics["train/reward"], prog_bar=True, batch_size=len(batch), logger=False)
        return losses.total

    def collect(self, batch: list[Example]) -> Trajectory:
        """Sample G graphs per question (`graphs="oracle"`: each question's oracle graph, once), run
        them all, and score the answers."""
        b, g, n = len(batch), self.graphs_per_question, self.roster.num_agents
        logits = self.edge_logits([ex.question for ex in batch])  # (B, N+1, N+1)
        if self.graphs == "oracle":
            sample, adjacency, index = None, oracle_adjacency(batch, n), list(range(b))  # (B, N+1, N+1)
        else:
            sample = self.sample_graphs(batch, logits)  # (B, G, N+1, N+1)
            adjacency = self.add_fixed_edges(sample.adjacency.reshape(b * g, n + 1, n + 1))  # (B·G, N+1, N+1)
            index = [q for q in range(b) for _ in range(g)]
        ran = adjacency.shape[0]
        if self.loss_config.fuser_graph == "all" and self.graphs == "learned":  # + one row per question: every
            # agent -> judger, not decoded (oracle graphs: the fuser trains on the oracle graph it runs)
            adjacency = torch.cat([adjacency, self.all_senders_graph(b)])
            index = index + list(range(b))
        rollout_start = time.perf_counter()
        rows = self.engine.run(
            [ex.question for ex in batch], adjacency, index, answer_format=self.task.answer_format,
            active=self.active, agent_facts=[ex.agent_facts for ex in batch], edge_logits=logits.detach(),
            keep_judger_inputs=True, undecoded=range(ran, adjacency.shape[0]),
        )
        fuser_inputs = None
        if ran < adjacency.shape[0]:
            fuser_inputs = rows.judger_inputs[ran:]
            rows = dataclasses.replace(rows, rollouts=rows.rollouts[:ran], judger_inputs=rows.judger_inputs[:ran])
            adjacency, index = adjacency[:ran], index[:ran]
        answers, api_stats = self._answers(batch, rows)
        rollout_s = time.perf_counter() - rollout_start
        return Trajectory(batch=batch, logits=logits, sample=sample, adjacency=adjacency, question_index=index,
                          rows=rows, answers=answers, scores=self.score(answers, [batch[q] for q in index]),
                          api_stats=api_stats, rollout_s=rollout_s, fuser_inputs=fuser_inputs)

    def all_senders_graph(self, rows: int) -> torch.Tensor:
        """(rows, N+1, N+1) the topology's fixed graph with every running agent -> judger: the graph
        of `gcache-fuser-only`, where several senders are read (what `fuser_graph="all"` trains on)."""
        n = self.roster.num_agents
        agents = fixed_adjacency(self.topology, n, self.topology_seed).expand(rows, -1, -1)
        return judger_senders_all(agents, self.active)

    def losses(self, trajectory: Trajectory) -> StepLosses | None:
        """REINFORCE on the sampled graphs plus the fuser's answer NLL; None (with a warning naming the
        questions) when a reward or the loss is not finite: the step is skipped."""
        cfg = self.loss_config
        batch, logits, mask = trajectory.batch, trajectory.logits, self.edge_mask
        # None = unscorable (left out of baselines); a NaN or inf the task returned is a bug to report.
        bad = sorted({batch[q].id for q, r in zip(trajectory.question_index, trajectory.scores, strict=True)
                      if r is not None and not math.isfinite(r)})
        if bad:
            log.warning("non-finite reward for question(s) %s at step %d: step skipped", bad, self.global_step)
            return None
        temp = self.policy.temperature
        rewards = trajectory.rewards(self.device)  # (B, G)
        if trajectory.sample is None:  # oracle graphs: nothing sampled, the policy is not trained
            policy_loss = logits.sum() * 0.0  # zero, but every rank's policy joins the DDP all-reduce
            stats = {"reward_mean": rewards.nanmean()}
        else:
            policy_loss, stats = reinforce_loss(
                trajectory.sample.log_prob, rewards, expected_edges(logits, mask, temp),
                edge_entropy(logits, mask, temp), edge_cost=cfg.edge_cost, entropy_coef=cfg.entropy_coef,
            )
        inputs = trajectory.rows.judger_inputs if trajectory.fuser_inputs is None else trajectory.fuser_inputs
        fuser_loss = self.fuser_loss(batch, inputs, logits)
        total = policy_loss + cfg.fuser_weight * fuser_loss
        if not bool(torch.isfinite(total)):
            log.warning("non-finite loss (policy %s, fuser %s) for question(s) %s at step %d: step skipped",
                        float(policy_loss.detach()), float(fuser_loss.detach()), [ex.id for ex in batch],
                        self.global_step)
            return None
        return StepLosses(total=total, policy=policy_loss, fuser=fuser_loss, stats=stats)

    def step_metrics(self, trajectory: Trajectory, losses: StepLosses, start: float) -> dict[str, torch.Tensor]:
        """`train/*`: reward, losses, edge statistics, costs and the judger's gate per sender."""
        logits, mask, adjacency, rows = trajectory.logits, self.edge_mask, trajectory.adjacency, trajectory.rows
        n = self.roster.num_agents
        rewards = trajectory.rewards(self.device)
        scorable = rewards[~rewards.isnan()]
        metrics = {
            "train/reward": scorable.mean() if scorable.numel() else torch.tensor(0.0),
            "train/policy_loss": losses.policy.detach(),
            "train/fuser_loss": losses.fuser.detach(),
            "train/edge_prob": edge_probabilities(logits, mask)[:, mask].mean().detach()
            if bool(mask.any()) else torch.tensor(0.0),
            "train/edges_per_graph": adjacency.float().sum((-1, -2)).mean(),
            "train/judger_senders": adjacency[:, :, n].float().sum(-1).mean(),
            "train/agents_run_share": torch.tensor(
                sum(r.agents_run for r in rows.rollouts) / max(len(rows.rollouts) * len(self.active), 1)),
            **self._rollout_metrics("train", rows, start, len(trajectory.batch)),
            **{f"train/{k}": v for k, v in trajectory.api_stats.items()},
        }
        metrics.update({f"train/{k}": v for k, v in losses.stats.items() if torch.is_tensor(v) and v.numel() == 1})
        with torch.no_grad():  # the judger's weight of each sender (value gates: averaged over layers), over questions
            judger_gates = self.fuser.sender_weights(logits[:, :n, n].T).mean(1)  # (N,)
        for role, gate in zip(self.roster.roles, judger_gates, strict=True):
            metrics[f"train/gate/{role.name}"] = gate
        metrics["train/gate_slope"] = self.fuser.slope.detach()
        return metrics

    def _on_every_rank(self, decision: bool) -> bool:
        """`decision` and-ed over DDP ranks (one collective; the decision itself without a trainer)."""
        trainer = self._trainer
        return decision if trainer is None else trainer.strategy.reduce_boolean_decision(decision, all=True)

    def fuser_loss(self, batch: list[Example], judger_inputs, logits: torch.Tensor) -> torch.Tensor:
        """Teacher-forced NLL of the reference answer given the judger prompt on its fused cache (of
        `judger_inputs`: the sampled rows', or the all-senders graph's). With the `realign` channel the
        direct senders' segments are recomputed from their starts with autograd through their latent
        steps (what they received stays fixed: the gradient stops at a sender's inputs)."""
        n = self.roster.num_agents
        per_q = self.loss_config.fuser_rows_per_question
        seen: dict[int, int] = {}
        fused, prompts, targets = [], [], []
        if not self.fuser_trains_policy:
            logits = logits.detach()  # the NLL trains the fuser only; the topology learns from reward
        realign = self.engine.agent_realignment() if self.fuser.realign is not None else None
        for inp in judger_inputs:
            if seen.get(inp.question_index, 0) >= per_q or not inp.sender_kvs:
                continue
            seen[inp.question_index] = seen.get(inp.question_index, 0) + 1
            s = logits[inp.source_question, inp.senders, n][:, None]  # (S, 1)
            senders = inp.sender_kvs
            if realign is not None:  # direct senders' latent steps again, with autograd
                senders = [self.engine.segment_with_grad(start, realign) if gated and start is not None else segment
                           for segment, gated, start in zip(senders, inp.gated, inp.sender_starts, strict=True)]
            fused.append(self.fuser.fuse(senders, s, self.llm.rotary, gated=inp.gated))
            prompts.append(inp.prompt)
            targets.append(self.task.target_text(batch[inp.question_index]))
        if not fused:
            return sum(p.sum() for p in self.fuser.parameters()) * 0.0
        return self.llm.answer_nll(fused, prompts, targets).mean().to(self.device)

    def _rollout_metrics(self, stage: str, rows, start: float, num_questions: int) -> dict[str, torch.Tensor]:
        rs = rows.rollouts
        k = max(len(rs), 1)
        return {
            f"{stage}/decoded_tokens": torch.tensor(sum(r.decoded_tokens for r in rs) / k),
            f"{stage}/prompt_tokens": torch.tensor(sum(r.prompt_tokens for r in rs) / k),
            f"{stage}/cache_bytes": torch.tensor(float(max(r.peak_cache_bytes for r in rs))) if rs else torch.tensor(0.0),
            f"{stage}/seconds_per_question": torch.tensor((time.perf_counter() - start) / max(num_questions, 1)),
            f"{stage}/prefill_share": torch.tensor(rows.prefills / max(rows.prefills_naive, 1)),
            # prompt tokens run through the model per question (shared agents and cached prefixes once)
            f"{stage}/prefill_tokens": torch.tensor(rows.prefill_tokens / max(num_questions, 1)),
        }

    @torch.no_grad()
    def evaluate_batch(self, batch: list[Example]) -> tuple[list[str], list[float | None], Any]:
        questions = [ex.question for ex in batch]
        logits = self.edge_logits(questions)
        if self.graphs == "oracle":
            adjacency = oracle_adjacency(batch, self.roster.num_agents)  # (B, N+1, N+1)
        else:
            adjacency = self.add_fixed_edges(deterministic_dag(logits, self.edge_mask))  # (B, N+1, N+1)
        rows = self.engine.run(
            questions, adjacency, list(range(len(batch))), answer_format=self.task.answer_format,
            active=self.active, agent_facts=[ex.agent_facts for ex in batch], edge_logits=logits,
        )
        answers, _ = self._answers(batch, rows)
        return answers, self.score(answers, batch), rows

    def _eval_step(self, stage: str, batch: list[Example]) -> None:
        start = time.perf_counter()
        comparison = self.test_comparison if stage == "test" else None
        if comparison is not None:  # the policy's agents, kept for the comparison's methods on this batch
            self.engine.memo = comparison.memo
        elif stage == "val" and not self.engine.trains_realignment:  # (a trained realignment changes agents)
            self.engine.memo = self.val_memo
        try:
            with self.api_part(stage):
                answers, rewards, rows = self.evaluate_batch(batch)
        finally:
            self.engine.memo = None
        if stage == "test":  # per-question predictions (test_predictions.jsonl): the records of comparison.jsonl
            api = self.generator_mode.item_usage() if self.generator_mode else [{}] * len(batch)
            seconds = (time.perf_counter() - start) / max(len(batch), 1)
            self.test_records += [
                {"id": ex.id, "method": "gcache", "question": ex.question, "reward": reward, "answer": answer,
                 "extracted": None if answer is None else self.task.extract_answer(answer),
                 "reference": ex.answer[:200], "oracle_edges": ex.oracle_edges or None,
                 "decoded_tokens": rollout.decoded_tokens, "prompt_tokens": rollout.prompt_tokens,
                 "seconds": seconds, "peak_cache_bytes": rollout.peak_cache_bytes,
                 "graph": self.graph_text(rollout.adjacency), "edges": int(rollout.adjacency.sum()),
                 "judger_senders": list(rollout.judger_senders),
                 "agents_run": rollout.agents_run, "handed_positions": rollout.handed_positions,
                 "handed_bytes": rollout.handed_bytes, **usage}
                for ex, answer, reward, rollout, usage in zip(batch, answers, rewards, rows.rollouts, api, strict=True)
            ]
        scored = [r for r in rewards if r is not None]
        acc = sum(scored) / len(scored) if scored else 0.0
        metrics = {f"{stage}/accuracy": torch.tensor(acc), **self._rollout_metrics(stage, rows, start, len(batch))}
        metrics[f"{stage}/judger_senders"] = torch.tensor(
            sum(len(r.judger_senders) for r in rows.rollouts) / max(len(rows.rollouts), 1))
        oracle = self.oracle_edge_probabilities(batch)
        if oracle is not None:
            metrics[f"{stage}/p_oracle"], metrics[f"{stage}/p_distractor"] = oracle
        if stage == "val":
            self.val_records += self.completion_records(batch, answers, rewards, rows)
            metrics.update(self.edge_probability_metrics(batch))
        # Under DDP each rank evaluates its shard; the epoch value is the mean over ranks.
        # at the steps completed before it (0: the untrained policy), as history.jsonl and completions/ say
        metrics["step"] = torch.tensor(float(self.global_step))
        self.log_dict(metrics, batch_size=len(batch), on_epoch=True, on_step=False, sync_dist=True)
        if comparison is not None:
            with self.api_part("compare"):
                comparison.run(batch)

    @torch.no_grad()
    def oracle_edge_probabilities(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For tasks with an oracle graph: the mean sampling probability of the oracle's sampled
        edges, and of the other agents' edges into the judger (distractors). None without oracles."""
        if self.graphs == "oracle" or not all(ex.oracle_edges for ex in batch):
            return None  # (under oracle graphs the policy is not trained: its probabilities mean nothing)
        n = self.roster.num_agents
        probs = edge_probabilities(self.edge_logits([ex.question for ex in batch]), self.edge_mask,
                                   self.policy.temperature).cpu()  # (B, N+1, N+1)
        mask = self.edge_mask.cpu()
        oracle, distractor = [], []
        for b, ex in enumerate(batch):
            edges = {(i, n if j == -1 else j) for i, j in ex.oracle_edges}
            oracle += [float(probs[b, i, j]) for i, j in edges if bool(mask[i, j])]
            senders = {i for i, j in edges if j == n}
            distractor += [float(probs[b, i, n]) for i in range(n) if bool(mask[i, n]) and i not in senders]
        if not oracle or not distractor:
            return None
        return torch.tensor(sum(oracle) / len(oracle)), torch.tensor(sum(distractor) / len(distractor))

    def edge_names(self) -> list[str]:
        """Node names: the agents, then the judger (node N)."""
        return [role.name for role in self.roster.roles] + [self.roster.judger.name]

    def graph_text(self, adjacency: torch.Tensor) -> str:
        """The graph that ran, (N+1, N+1) bool, as its edges by name ("(the judger alone)" without any)."""
        names = self.edge_names()
        return ", ".join(f"{names[i]} -> {names[j]}" for i, j in adjacency.nonzero().tolist()) or "(the judger alone)"

    def completion_records(self, batch: list[Example], answers: list[str | None], rewards: list[float | None],
                           rows) -> list[dict]:
        """One row per question for the completions table (TRL's `log_completions`): the graph that ran
        (agent -> agent and agent -> judger edges), the final answer (the judger's; the API model's in
        hybrid / api_hint mode), the answer extracted from it, the reference and the reward."""
        records = []
        for ex, answer, reward, rollout in zip(batch, answers, rewards, rows.rollouts, strict=True):
            records.append({
                "step": self.global_step, "id": ex.id, "question": ex.question,
                "graph": self.graph_text(rollout.adjacency), "answer": answer,
                "extracted": None if answer is None else self.task.extract_answer(answer),
                "reference": ex.answer, "reward": reward,
                # for the study's routing during training (`gcache.stats.routing_summary`)
                "judger_senders": list(rollout.judger_senders),
                "oracle_edges": ex.oracle_edges or None,  # JSON: [[sender, receiver], ...]
            })
        return records

    @torch.no_grad()
    def edge_probability_metrics(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        """`val/p_edge/<sender> -> <receiver>`: each sampled edge's probability, averaged over the batch."""
        probs = edge_probabilities(self.edge_logits([ex.question for ex in batch]), self.edge_mask,
                                   self.policy.temperature).cpu()  # (B, N+1, N+1)
        names = self.edge_names()
        return {f"val/p_edge/{names[i]} -> {names[j]}": probs[:, i, j].mean()
                for i, j in self.edge_mask.cpu().nonzero().tolist()}

    def on_validation_epoch_start(self) -> None:
        self.val_records = []

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: list[Example], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def configure_optimizers(self):
        return torch.optim.Adam(
            [
                {"params": self.policy.parameters(), "lr": self.policy_lr},
                {"params": self.fuser.gate_parameters(), "lr": self.fuser_lr},
                *([{"params": self.fuser.channel_parameters(), "lr": self.channel_lr}]
                  if self.fuser.channel != "gates" else []),
            ]
        )

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, except that a skipped step's gradients are set to None after the
        closure (training_step, backward and the DDP all-reduce) so that Adam skips every parameter."""

        def closure():
            loss = optimizer_closure()
            if self._skip_update:
                optimizer.zero_grad(set_to_none=True)
            return loss

        optimizer.step(closure=closure)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # lists of Examples (text); tensors are made on the right device later

    # ---- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["gcache_config"] = self.run_identity
        checkpoint["gcache_run"] = self.run_settings

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # DAG sampling needs no state (see the module doc); older checkpoints carried
        # "sample_generator_state", which is ignored.
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    @torch.no_grad()
    def learned_topology(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For a question: sampling probabilities of the edges (N+1, N+1) over the agents and the
        judger (node N; 1 for fixed judger edges) and the deterministic graph (N+1, N+1)."""
        logits = self.edge_logits([question])
        probs = edge_probabilities(logits, self.edge_mask, self.policy.temperature)[0].cpu()
        graph = self.add_fixed_edges(deterministic_dag(logits, self.edge_mask))[0]
        fixed = graph & ~self.edge_mask.cpu()
        return torch.where(fixed, torch.ones_like(probs), probs), graph

"""Evaluate methods side by side on the same questions, with the same model, roster and prompts.

    python -m gcache.evaluate task=lookup limit=40
    python -m gcache.evaluate task=lookup ckpt_path=outputs/…/last.ckpt methods=[single,fixed-full,oracle,gcache]

Every method uses the same model, questions, role prompts and decoding; each differs from
the others only in what its name says. The judger is told that other agents' work is in its
context only when it reads some (`gcache.prompts`).

Baselines:
- `single`: the judger alone (no communication).
- `single_budget`: the judger alone, thinking `N × latent_steps` latent steps before it
  answers: the latent compute of the multi-agent methods, in one agent.
- `text_mas`: agents exchange text along `baseline_topology`; the judger reads every agent.
- `latent_mas`: the LatentMAS chain along `baseline_topology` (full retention, no gates).
- `fixed-<topology>` (`fixed-full`, `fixed-chain`, `fixed-star`, `fixed-random`, …): an
  untrained fixed graph (every allowed edge i -> j with i < j, every agent -> judger), the
  run's retention, plain concatenation.
- `oracle`: the task's oracle graph (tasks that define one, e.g. `lookup`), plain
  concatenation (an untrained fuser: gates 1, channel the identity).
- `oracle-flat`: the oracle graph's agents all send to the judger directly, none reading another
  (on a two-hop chain: pointer and value keeper side by side) — whether the chain's agent -> agent
  edge itself is needed.
- `text-oracle`: the oracle graph's agents hand on text instead of caches, `latent_steps`
  tokens each: the latent channel's number of positions, as text (its records' `handed_bytes`
  are the UTF-8 bytes the judger read; a latent method's are the cache bytes).
Trained (need `ckpt_path`):
- `gcache`: the learned policy's deterministic graph and the learned fuser — exactly the
  training run's test evaluation (`GCacheModule.evaluate_batch`). A run trained with
  `policy.graphs=oracle` runs the oracle graph with its trained fuser (gates and channel).
- `gcache-policy-only`: the learned graph, the fuser off (plain concatenation); `gcache-fuser-only`:
  the fixed `topology` graph (every agent -> judger) with the learned fuser, each sender weighted
  by the policy's edge logit for its question; `gcache-fuser-other-question`: the same, each
  question's senders weighted by the logits of the next question of its batch (a control: a
  fuser that reads its question's signal falls to `fixed-<topology>` or below with another's).
Controls, applied to the *subject* (`gcache` with a checkpoint, else `fixed-<topology>`):
- `mismatched`: the judger reads the input built for another question of the batch;
- `zeroed`: the values of what it reads are zeroed; `shuffled`: each segment's slots permuted;
- `realign-identity`, `realign-random`: latent steps with the norm rescale only, or with a
  random matrix of the ridge matrix's spectrum, instead of the ridge realignment;
- `wrong-sender`: the judger reads agent (i + 1) mod N in place of each agent i it reads
  (`gcache.policy.topology.wrong_senders`): a trained channel on a keeper without the answer.
API baselines (with `mode=hybrid` or `api_hint`, which name the endpoint): `api_single`,
`api_text_mas` (every agent is the API model, text along `baseline_topology`). Under an API mode
every record carries the API tokens and cost of its question (`api_prompt_tokens`,
`api_completion_tokens`, `api_cost_usd`; None without a price), and the report their per-question
means and the cost per correct answer (`gcache.report.api_columns`).

A channel "carries information" only where `mismatched` and `zeroed` fall clearly below
the subject. Every record holds the method's `config` (graph, fuser, checkpoint, retention,
realignment, control), so a trained policy is never confused with an untrained graph.

Every (question, method) result is appended to `results.jsonl` as soon as its batch
finishes; a rerun with the same output directory skips finished pairs. At the end
`report.json`, `report.md` and `report.png` are written from `results.jsonl` alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from gcache.build import RUN_GROUPS, build_module, build_task, is_wandb, start_wandb_run, validate
from gcache.checkpoints import load_checkpoint, load_trained
from gcache.cli import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    config_errors,
    leaves,
    renamed_overrides,
    run_job,
)
from gcache.datamodule import eval_batch_size
from gcache.policy.sampling import deterministic_dag
from gcache.policy.topology import (
    TOPOLOGIES,
    fixed_adjacency,
    judger_senders_all,
    oracle_adjacency,
    wrong_senders,
)
from gcache.report import (
    API_HEADERS,
    api_cells,
    api_columns,
    repair_results,
    report_markdown,
    write_report,
)
from gcache.rollout import AgentMemo, RolloutBatch, RolloutConfig, RolloutEngine
from gcache.secrets import redacted_config
from gcache.stats import mcnemar_exact, wilson_interval

log = logging.getLogger(__name__)

FIXED_METHODS = tuple(f"fixed-{name}" for name in TOPOLOGIES if name != "direct")
ORACLE_METHODS = ("oracle", "oracle-flat", "text-oracle")  # need the task's oracle graphs
TRAINED_METHODS = ("gcache", "gcache-policy-only", "gcache-fuser-only", "gcache-fuser-other-question")
CONTROLS = ("mismatched", "zeroed", "shuffled", "realign-identity", "realign-random", "wrong-sender")
API_METHODS = ("api_single", "api_text_mas")
METHODS = ("single", "single_budget", "text_mas", "latent_mas", *FIXED_METHODS, *ORACLE_METHODS,
           *TRAINED_METHODS,
           *CONTROLS, *API_METHODS)


# ---- running methods -----------------------------------------------------------------------


def _record(example, method: str, answer: str, detail: dict, config: dict, **costs) -> dict:
    """One line of results.jsonl: the answer, its score, what it cost and what ran."""
    return {
        "id": example.id,
        "method": method,
        "question": example.question,
        "reward": detail["reward"],
        "answer": answer,
        "extracted": detail.get("extracted"),
        "reference": example.answer[:200],
        # The task's oracle graph ((sender, receiver), -1 = the judger), for the study's routing table.
        "oracle_edges": example.oracle_edges or None,  # JSON: [[sender, receiver], ...]
        **costs,  # decoded_tokens, prompt_tokens, seconds, peak_cache_bytes, edges, judger_senders, agents_run
        "config": config,
    }


class Evaluator:
    """Runs the methods on batches of examples with one module's LM, roster, task and prompts."""

    def __init__(self, module, *, baseline_topology: str = "chain", ckpt_path: str | None = None) -> None:
        self.module = module
        self.baseline_topology = baseline_topology
        self.ckpt_path = ckpt_path
        self.memo = AgentMemo()  # agents shared between the methods run on one batch (cleared per batch)

    @property
    def subject(self) -> str:
        """What the controls are applied to."""
        return "gcache" if self.ckpt_path else f"fixed-{self.module.topology}"

    def describe(self, method: str) -> dict:
        """What `method` runs: the graph, the fuser, the checkpoint and the rollout settings."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
        base = self.module.rollout_config
        config = {"graph": None, "fuser": "none", "checkpoint": None, "method": "latent",
                  "retention": base.retention, "latent_steps": base.latent_steps, "realign": base.realign,
                  "judger_cache": "fused", "judger_latent_steps": 0, "judger_edges": "all"}
        subject = method
        if method in CONTROLS:
            subject = self.subject
            if method.startswith("realign-"):
                config["realign"] = method.removeprefix("realign-")
            elif method != "wrong-sender":
                config["judger_cache"] = method
        if subject in TRAINED_METHODS and not self.ckpt_path:
            raise ValueError(f"method {method!r} evaluates a trained policy: give ckpt_path=… "
                             f"(an untrained fixed graph is `fixed-{self.module.topology}`)")
        if subject in ("single", "single_budget", "api_single"):
            config.update(graph="none", retention=None, latent_steps=None, realign=None, judger_edges=None)
            if subject == "single_budget":
                config["judger_latent_steps"] = self.module.roster.num_agents * base.latent_steps
        elif subject in ("text_mas", "api_text_mas"):
            config.update(graph=self.baseline_topology, method="text", retention=None, latent_steps=None, realign=None)
        elif subject == "latent_mas":
            config.update(graph=self.baseline_topology, retention="full")
        elif subject.startswith("fixed-"):
            config["graph"] = subject.removeprefix("fixed-")
        elif subject in ("oracle", "oracle-flat"):
            config["graph"] = subject
        elif subject == "text-oracle":
            config.update(graph="oracle", method="text", retention=None, realign=None,
                          agent_max_new_tokens=base.latent_steps)
        elif subject in ("gcache-fuser-only", "gcache-fuser-other-question"):
            config.update(graph=self.module.topology, fuser="trained", checkpoint=self.ckpt_path)
            if subject == "gcache-fuser-other-question":
                config["fuser_signal"] = "other-question"
        elif subject in TRAINED_METHODS:
            graph = "oracle" if self.module.graphs == "oracle" else "learned"  # policy.graphs of the run
            config.update(graph=graph, judger_edges=self.module.judger_edges, checkpoint=self.ckpt_path,
                          fuser="none" if subject == "gcache-policy-only" else "trained")
            if method == "gcache":  # runs the module's own evaluation, under its training config
                config["judger_cache"] = base.judger_cache
        if method in CONTROLS:
            config["subject"] = subject
        if method == "wrong-sender":
            config["judger_reads"] = "wrong-sender"
        return config

    def _graph(self, config: dict, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, N+1, N+1) graphs and the policy's logits (learned graphs) for a method's config."""
        adjacency, logits = self._subject_graph(config, batch)
        if config.get("judger_reads") == "wrong-sender":
            adjacency = wrong_senders(adjacency)
        return adjacency, logits

    def _subject_graph(self, config: dict, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.module.roster.num_agents
        if config["graph"] == "none":
            return torch.zeros(len(batch), n + 1, n + 1, dtype=torch.bool), None
        if config["graph"] in ("oracle", "oracle-flat"):
            return oracle_adjacency(batch, n, flat=config["graph"] == "oracle-flat"), None
        if config["graph"] == "learned":
            with torch.no_grad():
                logits = self.module.edge_logits([ex.question for ex in batch])
            return self.module.add_fixed_edges(deterministic_dag(logits, self.module.edge_mask)), logits
        adjacency = fixed_adjacency(config["graph"], n).expand(len(batch), -1, -1)
        active = self.module.active if config["graph"] == self.module.topology else None
        return judger_senders_all(adjacency, active), None

    def rollout_config(self, config: dict) -> RolloutConfig:
        """The rollout settings of a method's config (`describe`): the run's, with the method's changes."""
        base = self.module.rollout_config
        return RolloutConfig(**{
            **base.__dict__, "method": config["method"], "retention": config["retention"] or base.retention,
            "latent_steps": base.latent_steps if config["latent_steps"] is None else config["latent_steps"],
            "realign": config["realign"] or base.realign,
            "judger_cache": config["judger_cache"], "judger_latent_steps": config["judger_latent_steps"],
            "agent_max_new_tokens": config.get("agent_max_new_tokens") or base.agent_max_new_tokens,
        })

    def engine_key(self, method: str) -> tuple | None:
        """What decides the engine a method runs on: its rollout settings, its fuser and the logits that
        weight it. Methods with the same key run as one batch of rows (`run_methods`); None: a method that
        runs alone (`gcache`: the module's own evaluation; the API methods)."""
        if method == "gcache" or method in API_METHODS:
            return None
        config = self.describe(method)
        return self.rollout_config(config), config["fuser"], config.get("fuser_signal")

    def groups(self, methods: list[str], *, together: bool = True) -> list[list[str]]:
        """`methods` as `run_methods` runs them: with `together`, those with one `engine_key` in one call."""
        groups: dict[Any, list[str]] = {}
        for method in methods:
            key = self.engine_key(method) if together else None
            groups.setdefault(("alone", method) if key is None else key, []).append(method)
        return list(groups.values())

    def rows_per_question(self, methods: list[str], *, together: bool = True) -> int:
        """The rows one question adds to the largest engine call of `run_methods` (one per method that
        shares the call): what sizes an evaluation's batches by rows (`gcache.datamodule.eval_batch_size`)."""
        return max(map(len, self.groups(methods, together=together)), default=1)

    def run(self, method: str, batch) -> list[dict]:
        """`method` on a batch of examples: one record per example."""
        return self.run_methods([method], batch)[method]

    def run_methods(self, methods: list[str], batch, *, together: bool = True) -> dict[str, list[dict]]:
        """Every method of `methods` on a batch of examples: method -> one record per example. With
        `together`, methods whose engines agree (`engine_key`: e.g. `single`, `fixed-full` and `oracle`)
        run as one batch of rows, one engine call: identical agents computed once, every judger in the
        same decoding batches (`rollout.max_batch` rows each); the others run alone. Each method's agents
        are also shared with the other methods of the batch through the memo (`AgentMemo`; the caller
        clears it between batches). Each record is what the method gives when it runs alone; its
        `seconds` are its rows' share of the engine call's time (by the tokens they ran)."""
        records: dict[str, list[dict]] = {}
        for members in sorted(self.groups(methods, together=together), key=lambda group: group != ["gcache"]):
            # (gcache first: the others may read its agents)
            start = time.perf_counter()
            if members == ["gcache"]:  # exactly what the training run's validation and test run
                engine = self.module.engine
                engine.memo = self.memo
                try:
                    answers, _, rows = self.module.evaluate_batch(batch)
                finally:
                    engine.memo = None
                records["gcache"] = self._records("gcache", batch, answers, rows.rollouts, start)
            elif members[0] in API_METHODS:
                records[members[0]] = self._run_api(members[0], batch, start, self.describe(members[0]))
            else:
                records.update(self._run_group(members, batch, start))
        return {method: records[method] for method in methods}

    def _run_group(self, methods: list[str], batch, start: float) -> dict[str, list[dict]]:
        """Methods with one engine (`engine_key`) on a batch: their rows (method by method, B each) in one
        engine call."""
        configs = {method: self.describe(method) for method in methods}
        config = configs[methods[0]]
        fuser = self.module.fuser if config["fuser"] == "trained" else None
        engine = RolloutEngine(self.module.llm, self.module.roster, self.rollout_config(config), fuser=fuser)
        engine.memo = self.memo
        graphs = [self._graph(configs[method], batch)[0] for method in methods]  # (B, N+1, N+1) each
        logits = None
        if fuser is not None:
            with torch.no_grad():
                logits = self.module.edge_logits([ex.question for ex in batch])  # (B, N+1, N+1)
        if config.get("fuser_signal") == "other-question":
            if len({ex.question for ex in batch}) < 2:
                raise ValueError(f"method {methods[0]!r} needs batches of at least two different questions")
            logits = logits.roll(-1, dims=0)  # question i weighted by question i + 1's logits
        b = len(batch)
        rows = engine.run(
            [ex.question for ex in batch], torch.cat(graphs), list(range(b)) * len(methods),
            answer_format=self.module.task.answer_format, agent_facts=[ex.agent_facts for ex in batch],
            edge_logits=logits,
        )
        # the call's time, spread over its rows by the tokens each ran (prompts, latent steps, decoding)
        elapsed = time.perf_counter() - start
        work = [r.prompt_tokens + r.decoded_tokens + engine.config.latent_steps * r.agents_run for r in rows.rollouts]
        shares = [elapsed * w / max(sum(work), 1) for w in work]
        records = {}
        for m, method in enumerate(methods):
            own = rows.rollouts[m * b : (m + 1) * b]
            answers, _ = self.module._answers(batch, RolloutBatch(own, [], prefills=0, prefills_naive=0))
            records[method] = self._records(method, batch, answers, own, time.perf_counter(),
                                            seconds=shares[m * b : (m + 1) * b], config=configs[method])
        return records

    def _records(self, method: str, batch, answers: list[str | None], rollouts, start: float, *,
                 seconds: list[float] | None = None, config: dict | None = None) -> list[dict]:
        """The records of `method` on `batch` from its rollouts: scored (code tasks' programs run once; an
        answer that never came, a failed API request, is unscored) and timed (`seconds`: each question's
        time before scoring; default none: the time since `start`, spread evenly)."""
        config = self.describe(method) if config is None else config
        mode = self.module.generator_mode
        api = mode.item_usage() if mode is not None else [{}] * len(batch)
        details = self.module.task.score_details(["" if a is None else a for a in answers], list(batch))
        details = [{**d, "reward": None} if a is None else d for a, d in zip(answers, details, strict=True)]
        scoring = (time.perf_counter() - start) / len(batch)  # (all of it without `seconds`)
        seconds = [scoring + s for s in seconds] if seconds is not None else [scoring] * len(batch)
        return [
            _record(ex, method, answer, detail, config, decoded_tokens=rollout.decoded_tokens,
                    prompt_tokens=rollout.prompt_tokens, seconds=secs,
                    peak_cache_bytes=rollout.peak_cache_bytes, graph=self.module.graph_text(rollout.adjacency),
                    edges=int(rollout.adjacency.sum()),
                    judger_senders=rollout.judger_senders, agents_run=rollout.agents_run,
                    handed_positions=rollout.handed_positions, handed_bytes=rollout.handed_bytes, **usage)
            for ex, rollout, answer, detail, usage, secs in zip(batch, rollouts, answers, details, api, seconds,
                                                                 strict=True)
        ]

    def _run_api(self, method: str, batch, start: float, config: dict) -> list[dict]:
        """`api_single` / `api_text_mas`: the graph of `single` / `text_mas` (`_graph`), every agent
        and the judger played by the API model (`gcache.rollout.api_text_mas`)."""
        from gcache.rollout import api_text_mas

        if self.module.generator_mode is None:
            raise ValueError(f"method {method!r} needs an API endpoint: use mode=hybrid or mode=api_hint")
        adjacency, _ = self._graph(config, batch)  # (R, N+1, N+1); no edges for api_single
        results = api_text_mas(
            self.module.generator_mode.client, self.module.roster, [ex.question for ex in batch], adjacency,
            list(range(len(batch))), self.module.task.answer_format,
            agent_facts=[ex.agent_facts for ex in batch],
        )
        details = self.module.task.score_details([r["answer"] for r in results], list(batch))
        seconds = (time.perf_counter() - start) / len(batch)
        client = self.module.generator_mode.client
        return [
            _record(ex, method, r["answer"], d, config, decoded_tokens=r["completion_tokens"],
                    prompt_tokens=r["prompt_tokens"], seconds=seconds, peak_cache_bytes=0,
                    graph=self.module.graph_text(adjacency[row]), edges=int(adjacency[row].sum()), judger_senders=r["judger_senders"], agents_run=0,
                    api_prompt_tokens=r["prompt_tokens"], api_completion_tokens=r["completion_tokens"],
                    api_cost_usd=client.cost_usd(r["prompt_tokens"], r["completion_tokens"])
                    if client.priced else None)
            for row, (ex, r, d) in enumerate(zip(batch, results, details, strict=True))
        ]


def check_methods(methods, key: str) -> None:
    """Refuse (ConfigError) a method name that is not one of `METHODS`, naming the closest one."""
    import difflib

    for method in methods:
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}: unknown method {method!r}; {hint}allowed: {', '.join(METHODS)}")


def run_settings_of(ckpt_path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The config groups (`RUN_GROUPS`) a checkpoint's run was built with, and where they were read:
    the checkpoint (`gcache_run`), or for older checkpoints the run's `.hydra/config.yaml` beside its
    `checkpoints/` directory; (None, reason) when neither has them."""
    state = load_checkpoint(ckpt_path, mmap=True)
    if state.get("gcache_run"):
        return state["gcache_run"], f"checkpoint {ckpt_path}"
    saved = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None, f"neither {ckpt_path} nor {saved} records the run's settings"
    run_cfg = OmegaConf.load(saved)
    return {g: OmegaConf.to_container(run_cfg[g], resolve=True) for g in RUN_GROUPS if g in run_cfg}, str(saved)


def adopt_run_settings(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The evaluation of a trained checkpoint runs what its run ran: each group of `RUN_GROUPS` (task,
    agents, topology, policy, rollout, mode) is the run's, except where the command line (`overrides`)
    chose the group or set one of its keys; those are applied and reported when they differ from the
    run's. Returns the config and {"source", "given" (key -> {"given", "run"}), "adopted" (key -> {"default",
    "run"}: this command's defaults the run's values replaced)}."""
    run, source = run_settings_of(cfg.ckpt_path)
    settings: dict[str, Any] = {"source": source, "given": {}, "adopted": {}}
    if run is None:
        log.warning("%s: evaluating with this command's settings", source)
        return cfg, settings
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for group in RUN_GROUPS:
            if group not in run or group not in cfg:
                continue
            now = dict(leaves(OmegaConf.to_container(cfg[group], resolve=True), f"{group}."))
            ran = dict(leaves(run[group], f"{group}."))
            if group in given:  # another option of the group was chosen: the checkpoint check judges it
                settings["given"].update({k: {"given": now.get(k), "run": v} for k, v in ran.items() if now.get(k) != v})
                continue
            chosen = {k: v for k, v in now.items() if k in given}
            merged = OmegaConf.create(run[group])
            for key, value in chosen.items():
                OmegaConf.update(merged, key.split(".", 1)[1], value, force_add=True)
                if ran.get(key) != value:
                    settings["given"][key] = {"given": value, "run": ran.get(key)}
            settings["adopted"].update({k: {"default": now.get(k), "run": v} for k, v in ran.items()
                                        if k not in chosen and now.get(k) != v})
            cfg[group] = merged
    if settings["given"]:
        log.warning("evaluating %s with settings given on the command line that differ from its run: %s", cfg.ckpt_path,
                    ", ".join(f"{k}={v['given']!r} (run: {v['run']!r})" for k, v in settings["given"].items()))
    adopted = ", ".join(f"{key}={value['run']!r}" for key, value in settings["adopted"].items())
    log.info("the run's settings (%s)%s", source, f"; in place of this command's defaults: {adopted}" if adopted else "")
    return cfg, settings


def evaluate(cfg: DictConfig, *, module=None, overrides: list[str] | None = None) -> dict:
    """Run every method on the split's first `limit` questions; resumable; returns the report.

    With `ckpt_path` (and no `module`), the run's settings are adopted (`adopt_run_settings`);
    `overrides` are the command line's (default: Hydra's, none when composed in-process)."""
    from tqdm.auto import tqdm

    validate(cfg)  # methods included (check_methods)
    settings = None
    if cfg.ckpt_path and module is None:
        if overrides is None:
            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg, settings = adopt_run_settings(cfg, overrides)
        validate(cfg)
    methods = list(cfg.methods)
    if cfg.ckpt_path is None and (wants := [m for m in methods if m in TRAINED_METHODS]):
        raise ValueError(f"methods {wants} evaluate a trained policy: give ckpt_path=… (an untrained fixed "
                         f"graph is `fixed-{cfg.topology.name}`)")
    if "mismatched" in methods and cfg.eval_batch_size is not None and cfg.eval_batch_size < 2:
        raise ValueError("the mismatched control needs eval_batch_size >= 2 (it swaps caches between questions)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = module.task if module is not None else build_task(cfg)
    examples = task.splits()[cfg.split]
    limit = cfg.get(f"limit_{cfg.split}")  # limit_test (limit_val with split=val), as in gcache.train
    if limit:
        examples = examples[:limit]
    if module is None:
        module = build_module(cfg, task=task)
    ckpt_path = load_trained(cfg.ckpt_path, module) if cfg.ckpt_path else None
    module.eval()
    evaluator = Evaluator(module, baseline_topology=cfg.baseline_topology, ckpt_path=ckpt_path)
    results = out / "results.jsonl"
    done = {(r["id"], r["method"]) for r in repair_results(results)}
    todo = [(m, ex) for m in methods for ex in examples if (ex.id, m) not in done]
    log.info("%d of %d (question, method) pairs to run (%d done)", len(todo), len(methods) * len(examples), len(done))
    together = cfg.get("share_methods", True)
    size = cfg.eval_batch_size or eval_batch_size(len(examples), evaluator.rows_per_question(methods, together=together),
                                                  module.rollout_config.max_batch)
    with tqdm(total=len(todo), desc="evaluate", disable=not todo) as bar:
        # a batch of questions at a time, every method on it: the methods share its agents (`AgentMemo`) and
        # run as one batch of rows where their engines agree (`Evaluator.run_methods`)
        for start in range(0, len(examples), size):
            evaluator.memo.clear()
            pending: dict[tuple, tuple[list, list[str]]] = {}  # the questions not done yet -> (them, the methods)
            for method in methods:
                batch = [ex for ex in examples[start : start + size] if (ex.id, method) not in done]
                if batch and method == "mismatched" and len(batch) < 2:
                    batch = [*batch, *[ex for ex in examples if ex.id != batch[0].id][:1]]
                if batch:
                    pending.setdefault(tuple(ex.id for ex in batch), (batch, []))[1].append(method)
            for batch, group in pending.values():
                for method, rows in evaluator.run_methods(group, batch, together=together).items():
                    records = [r for r in rows if (r["id"], method) not in done]
                    with results.open("a") as fh:
                        for record in records:
                            fh.write(json.dumps(record) + "\n")
                            done.add((record["id"], method))
                        fh.flush()
                        os.fsync(fh.fileno())
                    bar.update(len(records))
    evaluator.memo.clear()
    if evaluator.memo.computed:
        log.info("agents computed %d times, shared between methods %d times", evaluator.memo.computed,
                 evaluator.memo.shared)
    title = f"{task.name}: {len(examples)} questions, model {module.llm.name}"
    report = write_report(out, title=title, settings=settings)
    log.info("report: %s (on stdout)", out / "report.md")
    print(report_markdown(report, title), flush=True)  # results on stdout, logs on stderr
    return report


class TestComparison:
    """Baseline methods run on every test batch of a training run next to its trained policy (`gcache.train`
    sets `GCacheModule.test_comparison`; `GCacheModule.test_step` calls `run` after the policy's own
    evaluation of the batch): the methods share the policy's agents through the memo (the policy's
    routed keeper is `oracle`'s) and each other's (`Evaluator.run_methods`), and under DDP every rank
    runs its own shard. `records`: method -> this rank's records, in test order."""

    def __init__(self, module, methods: list[str], *, ckpt_path: str, together: bool = True) -> None:
        self.evaluator = Evaluator(module, ckpt_path=ckpt_path)
        self.methods = list(methods)
        self.together = together
        self.records: dict[str, list[dict]] = {method: [] for method in methods}

    @property
    def memo(self) -> AgentMemo:
        return self.evaluator.memo

    def run(self, batch) -> None:
        """The methods on one test batch, after the policy's evaluation of it filled the memo; clears it."""
        try:
            for method, rows in self.evaluator.run_methods(self.methods, batch, together=self.together).items():
                self.records[method] += rows  # question included
        finally:
            self.memo.clear()


def comparison_methods(methods: list[str], examples: list) -> list[str]:
    """`methods` that can run on `examples`: `oracle` and its kin only for tasks with oracle graphs."""
    return [m for m in methods if m not in ORACLE_METHODS or all(ex.oracle_edges for ex in examples)]


def write_comparison(trained: list[dict], rows_of: dict[str, list[dict]], out: Path) -> dict:
    """A training run's trained policy (its test predictions, `trained`, each with its `config`) next to the
    baseline methods' records on the same test questions (`rows_of`: method -> records, in test order), with
    paired exact McNemar tests (and under an API mode API tokens, USD per question and per correct answer).
    `out/comparison.jsonl` gets every method's records, the trained policy's first (method "gcache"), each
    with the question (docs/outputs.md). Returns the comparison (accuracy, CI, McNemar p per method)."""
    rows_of = {"gcache": trained, **rows_of}
    for method, rows in rows_of.items():
        if [r["id"] for r in rows] != [r["id"] for r in trained]:
            raise ValueError(f"comparison: method {method!r} has records of other questions than the test's")
    rewards = {method: [r["reward"] for r in rows] for method, rows in rows_of.items()}
    tmp = out / "comparison.jsonl.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for rows in rows_of.values() for r in rows)
    tmp.replace(out / "comparison.jsonl")
    result = {"questions": len(trained), "methods": {}}
    for method, values in rewards.items():
        scored = [v for v in values if v is not None]
        entry = {"accuracy": sum(scored) / max(len(scored), 1), "ci95": list(wilson_interval(sum(scored), len(scored)))}
        if method != "gcache":
            pairs = [(a, b) for a, b in zip(rewards["gcache"], values, strict=True) if a is not None and b is not None]
            entry["mcnemar_p_vs_gcache"] = mcnemar_exact([a > 0.5 for a, _ in pairs], [b > 0.5 for _, b in pairs])[
                "p_value"]
        entry.update(api_columns(rows_of[method]))
        result["methods"][method] = entry
    return result


def comparison_table(comparison: dict) -> str:
    """The comparison as a markdown table (with the API columns where a method has them)."""
    with_api = any("api_prompt_tokens_per_question" in e for e in comparison["methods"].values())
    headers = ["method", "accuracy", "95% CI", "McNemar p vs gcache", *(API_HEADERS if with_api else [])]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, entry in comparison["methods"].items():
        p = entry.get("mcnemar_p_vs_gcache")
        cells = [method, f"{entry['accuracy']:.3f}", f"{entry['ci95'][0]:.2f}–{entry['ci95'][1]:.2f}",
                 "—" if p is None else f"{p:.3g}", *(api_cells(entry) if with_api else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _evaluate_command(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        cfg.output_dir = cfg.get("output_dir") or os.getcwd()
    with config_errors():
        report = evaluate(cfg)
    if is_wandb(cfg.logger):
        import wandb

        run = start_wandb_run(cfg.logger, directory=cfg.output_dir, job_type="evaluate", config=redacted_config(cfg))
        columns = ["method", *next(iter(report["methods"].values())).keys()]
        table = wandb.Table(columns=columns)
        for name, stats in report["methods"].items():
            table.add_data(name, *[json.dumps(v) if isinstance(v, (list, dict)) else v for v in stats.values()])
        run.log({"evaluation": table})
        run.finish()
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(_evaluate_command, cfg)


if __name__ == "__main__":
    import sys

    sys.argv[1:] = renamed_overrides(sys.argv[1:], "evaluate")
    check_command_line(sys.argv[1:], "evaluate")
    main()

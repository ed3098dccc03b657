"""Speed benchmarks, each a ratio of two variants measured in one run (noise-robust on shared CPUs).

    python scripts/benchmark.py                       # embedded model, 2 threads
    python scripts/benchmark.py --arith 20 --gsm8k 10 --threads 2 --out outputs/benchmark

Rows of the printed table (also written to <out>/benchmark.json and benchmark.md):

1. batched: judger-decode-heavy rollouts of B=8 questions in one batch vs one at a
   time; throughput ratio (target >= 3x).
2. reuse: agent prefills computed vs naive when G=4 graphs are sampled per question on
   the full mask from the untrained policy (target <= 60%).
3. latent_vs_text: `python -m gcache.evaluate` methods latent_mas vs text_mas on the same
   questions: speed-up (target >= 4x), decoded-token share (target <= 20%) and accuracy.
4. update_share: the policy + fuser update's share of a training step (target <= 5%).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache.build import build_module
from gcache.evaluate import CONF_DIR, evaluate
from gcache.policy.topology import fixed_adjacency, judger_senders_all
from gcache.rollout import RolloutConfig, RolloutEngine

log = logging.getLogger("benchmark")


def _cfg(name: str, overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def bench_batched(module, examples, batch: int, max_new_tokens: int, *, decode_only: bool) -> dict:
    """Same rows, max_batch=B vs max_batch=1. `decode_only`: the judger alone decodes
    `max_new_tokens` (decode-heavy); otherwise full latent rollouts on a chain."""
    questions = [ex.question for ex in examples[:batch]]
    n = module.roster.num_agents
    adjacency = judger_senders_all(fixed_adjacency("chain", n).expand(len(questions), -1, -1))
    active = [] if decode_only else None
    times, tokens = {}, {}
    for size in (1, batch):
        config = RolloutConfig(latent_steps=module.rollout_config.latent_steps, max_new_tokens=max_new_tokens,
                               max_batch=size, retention="role_latent")
        engine = RolloutEngine(module.llm, module.roster, config)
        start = time.perf_counter()
        rows = engine.run(questions, adjacency, list(range(len(questions))), answer_format=module.task.answer_format,
                          active=active)
        times[size] = time.perf_counter() - start
        tokens[size] = sum(r.decoded_tokens for r in rows.rollouts)
        log.info("max_batch=%d: %.1f s, %d decoded tokens", size, times[size], tokens[size])
    # Rows decode until all of a batch has ended, so compare decoded tokens per second.
    ratio = (tokens[batch] / times[batch]) / (tokens[1] / times[1])
    return {"B=1 s": times[1], f"B={batch} s": times[batch], "tokens": tokens[1], "throughput ratio": ratio}


def bench_reuse(module, examples, graphs: int) -> dict:
    """Agent prefills and judger decodes computed vs naive for G sampled graphs per question:
    with the untrained policy (p near 0.5, graphs rarely repeat) and with its logits scaled
    by 4 and by 10 (stand-ins for a more and a fully confident trained policy, whose
    samples coincide more often)."""
    from gcache.policy.sampling import sample_dags

    questions = [ex.question for ex in examples]
    n = module.roster.num_agents
    with torch.no_grad():
        logits = module.edge_logits(questions)
    mask = module.edge_mask  # agents and the judger (node N)
    config = RolloutConfig(**{**module.rollout_config.__dict__, "max_new_tokens": 8})
    engine = RolloutEngine(module.llm, module.roster, config, fuser=module.fuser)
    result = {}
    for label, scale in (("untrained", 1.0), ("confident x4", 4.0), ("converged x10", 10.0)):
        sample = sample_dags(scale * logits, mask, graphs, generator=torch.Generator().manual_seed(0))
        index = [q for q in range(len(questions)) for _ in range(graphs)]
        adjacency = module.add_fixed_edges(sample.adjacency.reshape(-1, n + 1, n + 1))
        rows = engine.run(questions, adjacency, index, answer_format=module.task.answer_format)
        result[f"{label} prefill share"] = rows.prefills / rows.prefills_naive
        result[f"{label} judger share"] = rows.judger_decodes / len(rows.rollouts)
    return result


def bench_update_share(module, examples, steps: int) -> dict:
    optimizer = module.configure_optimizers()
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    rollout_s = update_s = 0.0
    for step in range(steps):
        batch = examples[step * 2 : step * 2 + 2]
        loss = module.training_step(batch, step)
        timings = module.last_step_timings
        start = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_s += timings["update_forward_s"] + (time.perf_counter() - start)
        rollout_s += timings["rollout_s"]
    total = rollout_s + update_s
    return {"rollout s": rollout_s, "update s": update_s, "update share": update_s / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--arith", type=int, default=20)
    parser.add_argument("--gsm8k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--out", default="outputs/benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"machine": {"threads": torch.get_num_threads()}}

    cfg = _cfg("train", [f"model={args.model}", "task=arith", "topology=full", f"rollout.latent_steps={args.latent_steps}",
                         "policy.graphs_per_question=4", "logger=none", "batch_size=2"], out)
    module = build_module(cfg)
    train = module.task.splits()["train"]
    results["batched (judger decode, 96 tokens)"] = bench_batched(module, train, 8, 96, decode_only=True)
    results["batched (latent rollout, chain)"] = bench_batched(module, train, 8, 32, decode_only=False)
    results["reuse"] = bench_reuse(module, train[:8], graphs=4)
    results["update_share"] = bench_update_share(module, train[10:], steps=3)

    for task, limit in (("arith", args.arith), ("gsm8k", args.gsm8k)):
        if limit <= 0:
            continue
        eval_cfg = _cfg("evaluate", [f"model={args.model}", f"task={task}", f"limit={limit}",
                                     f"rollout.latent_steps={args.latent_steps}", "methods=[text_mas,latent_mas]",
                                     "rollout.max_new_tokens=256", "rollout.agent_max_new_tokens=256", "batch_size=4", "topology=full",
                                     "logger=none"], out / f"eval-{task}")
        report = evaluate(eval_cfg, module=build_module(eval_cfg, llm=module.llm))["methods"]
        text, latent = report["text_mas"], report["latent_mas"]
        results[f"latent_vs_text ({task}, {limit} q)"] = {
            "speed-up": latent["speedup_vs_text_mas"],
            "decoded token share": latent["decoded_tokens_vs_text_mas"],
            "latent acc": latent["accuracy"], "latent ci95": latent["ci95"],
            "text acc": text["accuracy"], "text ci95": text["ci95"],
        }

    lines = ["| benchmark | measurement |", "|---|---|"]
    for name, values in results.items():
        shown = ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items())
        lines.append(f"| {name} | {shown} |")
    table = "\n".join(lines)
    print(table)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

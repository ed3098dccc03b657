"""What a trained fuser does to each sender on the graph where several are read (`gcache-fuser-only`):

    python scripts/fuser_weights.py outputs/lookup/runs/<run> [--limit 40] [--split test]

Loads the run's config (.hydra/config.yaml) and its tested checkpoint (summary.json, else
checkpoints/last.ckpt), computes the policy's edge logits sender -> judger for the split's first
`--limit` questions, and prints what the fuser gives each sender on the run's topology with every
agent -> judger: the value gate per layer (`policy.fusion=values`) or the attention weight
(`attention`), averaged over the senders that hold the answer and over the others (tasks with oracle
graphs, e.g. `lookup`; else over all senders). With the run's comparison.jsonl, the judger's answers
of `gcache-fuser-only` next to `fixed-<topology>` for the first questions.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gcache.build import build_module
from gcache.checkpoints import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--split", default="test")
    parser.add_argument("--answers", type=int, default=6, help="questions whose answers are printed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    summary = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").exists() else {}
    ckpt = summary.get("checkpoint") or str(args.run / "checkpoints" / "last.ckpt")
    module = build_module(cfg)
    load_trained(ckpt, module)
    examples = module.task.splits()[args.split][: args.limit]
    n = module.roster.num_agents
    fuser = module.fuser
    with torch.no_grad():
        s = module.edge_logits([ex.question for ex in examples])[:, :n, n].T  # (N, Q) sender -> judger
        if fuser.fusion == "values":
            per_layer = fuser.gates(s)  # (N, L, Q)
        else:
            per_layer = fuser.sender_weights(s)[:, None, :]  # (N, 1, Q): one weight for every layer
    relevant = torch.zeros(n, len(examples), dtype=torch.bool)  # (N, Q)
    for q, ex in enumerate(examples):
        for sender, receiver in ex.oracle_edges or []:
            if receiver == -1:
                relevant[sender, q] = True
    groups = {"holds the answer": relevant, "others": ~relevant} if bool(relevant.any()) else {"all": ~relevant}
    print(f"# {args.run}: fusion={fuser.fusion}, slope b={float(fuser.slope):.3f}, {len(examples)} {args.split} questions")
    print("edge logit sender -> judger: " + ", ".join(
        f"{name} {float(s[mask].mean()):+.2f} (min {float(s[mask].min()):+.2f}, max {float(s[mask].max()):+.2f})"
        for name, mask in groups.items()))
    label = "layer" if fuser.fusion == "values" else "all layers"
    print(f"| {label} | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for layer in range(per_layer.shape[1]):
        row = [f"{float(per_layer[:, layer][mask].mean()):.3f}" for mask in groups.values()]
        print(f"| {layer if fuser.fusion == 'values' else 'weight'} | " + " | ".join(row) + " |")
    if fuser.fusion == "values":
        print("| mean | " + " | ".join(f"{float(per_layer.mean(1)[mask].mean()):.3f}" for mask in groups.values()) + " |")
    comparison = args.run / "comparison.jsonl"
    if comparison.exists() and args.answers:
        rows = [json.loads(line) for line in comparison.read_text().splitlines() if line]
        fixed = f"fixed-{module.topology}"
        by = {(r["method"], r["id"]): r for r in rows}
        print(f"\n| question | reference | gcache-fuser-only | {fixed} |\n|---|---|---|---|")
        for ex in examples[: args.answers]:
            cells = [repr((by.get((m, ex.id)) or {}).get("answer", "—"))[:60] for m in ("gcache-fuser-only", fixed)]
            print(f"| {ex.id} | {ex.answer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

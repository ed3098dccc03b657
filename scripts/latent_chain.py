"""Run the LatentMAS chain (planner -> critic -> refiner -> judger) on a few questions.

    python scripts/latent_chain.py --task gsm8k --limit 2 --latent-steps 10

Prints each question's answer, whether it is correct, decoded tokens and seconds. The
chain is `gcache.rollout.run_latent_chain`: the rollout engine on a chain graph with
full cache retention.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from gcache.agents import build_roster
from gcache.llm.local import LocalLM
from gcache.rollout import run_latent_chain
from gcache.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--model", default="embedded", help="embedded, tiny-random, a hub id or a directory")
    parser.add_argument("--roster", default="latentmas")
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    task = build_task(args.task)
    examples = task.splits()[args.split][: args.limit]
    llm = LocalLM.load(args.model)
    roster = build_roster(args.roster)
    start = time.perf_counter()
    batch = run_latent_chain(
        llm, roster, [ex.question for ex in examples], answer_format=task.answer_format,
        latent_steps=args.latent_steps, max_new_tokens=args.max_new_tokens,
    )
    seconds = time.perf_counter() - start
    rewards = task.reward([r.answer for r in batch.rollouts], examples)
    for ex, rollout, reward in zip(examples, batch.rollouts, rewards, strict=True):
        print(f"== {ex.id} (reference {ex.answer}) reward={reward}")
        print(f"answer: {rollout.answer}")
        print(
            f"decoded tokens: {rollout.decoded_tokens}  prompt tokens: {rollout.prompt_tokens}  "
            f"judger cache: {rollout.judger_cache_length} positions  peak KV: {rollout.peak_cache_bytes / 2**20:.1f} MB"
        )
    print(f"{len(examples)} questions in {seconds:.1f} s ({seconds / len(examples):.1f} s/question, "
          f"{torch.get_num_threads()} threads, batched)")


if __name__ == "__main__":
    main()

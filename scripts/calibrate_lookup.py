"""Calibrate the lookup task: does the answer reach the judger through keeper caches alone?

    OMP_NUM_THREADS=1 python scripts/calibrate_lookup.py --limit 20 --threads 1

For each test question, every keeper prefills its role prompt, its facts and the question
(its *segment*); the judger prefills its prompt and the bare question on the concatenation
of the chosen senders' segments (`gcache.kv.concat`) and decodes greedily. Conditions: no
senders; the relevant keeper alone (0 and `--latent-steps` latent steps); relevant + 1 and
+ 3 distractor keepers (the relevant one at a random place). `--hops 2`: the value keeper
alone and with 2 distractors; pointer and value keeper side by side; the oracle chain
(value keeper prefilled on the pointer keeper's segment) alone and with 2 distractors. Prints accuracy per condition.
`--prompts gcache` uses `gcache.prompts` (the rollout's messages) instead of the fixed ones.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

import torch

from gcache import kv
from gcache.agents import build_roster
from gcache.llm.local import LocalLM
from gcache.tasks import build_task

AGENT_INSTRUCTION = "Think about the question in your role."


def agent_messages(role, facts: str, question: str, prompts: str) -> list[dict]:
    if prompts == "gcache":
        from gcache.prompts import agent_messages as gcache_agent_messages

        return gcache_agent_messages(role, question, facts=facts)
    user = f"{facts}\n\nQuestion:\n{question}\n\n{AGENT_INSTRUCTION}"
    return [{"role": "system", "content": role.prompt}, {"role": "user", "content": user}]


def judger_messages(
    role, question: str, answer_format: str, senders: int, prompts: str
) -> list[dict]:
    if prompts == "gcache":
        from gcache.prompts import judger_messages as gcache_judger_messages

        return gcache_judger_messages(role, question, answer_format, reads_others=senders > 0)
    user = f"Question:\n{question}\n\n{answer_format}"
    return [{"role": "system", "content": role.prompt}, {"role": "user", "content": user}]


@torch.no_grad()
def segment(llm: LocalLM, messages: list[dict], latent_steps: int) -> kv.KV:
    """An agent's cache: its prompt prefilled alone, then `latent_steps` latent steps."""
    ids, mask = llm.encode([llm.chat_text(messages)])
    step = kv.prefill(llm.model, ids, mask)
    if latent_steps:
        step = kv.latent_steps(llm.model, step, latent_steps, llm.realignment("ridge")).step
    return step.kv


@torch.no_grad()
def judge(llm: LocalLM, senders: list[kv.KV], messages: list[dict], max_new_tokens: int) -> str:
    past = kv.concat(senders, llm.rotary) if senders else None
    return llm.generate([llm.chat_text(messages)], past=past, max_new_tokens=max_new_tokens).texts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--latent-steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-agents", type=int, default=4)
    parser.add_argument("--facts-per-agent", type=int, default=1)
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--prompts", default="fixed", choices=["fixed", "gcache"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print every reply")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    task = build_task(
        "lookup", num_agents=args.num_agents, facts_per_agent=args.facts_per_agent, hops=args.hops
    )
    examples = task.splits()["test"][: args.limit]
    roster = build_roster("keepers", args.num_agents)
    llm = LocalLM.load(args.model)
    rng = random.Random(0)
    correct: dict[str, int] = {}
    start = time.perf_counter()
    for ex in examples:
        holder = ex.oracle_edges[-1][0]  # the keeper that sends the value to the judger
        others = [i for i in range(args.num_agents) if i not in {src for src, _ in ex.oracle_edges}]
        messages = [
            agent_messages(role, facts, ex.question, args.prompts)
            for role, facts in zip(roster.roles, ex.agent_facts, strict=True)
        ]
        segs = [segment(llm, m, 0) for m in messages]
        distractors = [segs[i] for i in others]

        def with_distractors(senders: list[kv.KV], k: int, pool=distractors) -> list[kv.KV]:
            chosen = [*senders, *rng.sample(pool, min(k, len(pool)))]
            rng.shuffle(chosen)  # the relevant sender at a random place
            return chosen

        picks = {"none": []}
        if args.hops == 1:
            picks["relevant"] = [segs[holder]]
            picks[f"relevant, {args.latent_steps} latent"] = [
                segment(llm, messages[holder], args.latent_steps)
            ]
            picks["relevant+1"] = with_distractors([segs[holder]], 1)
            picks["relevant+3"] = with_distractors([segs[holder]], 3)
        else:
            pointer = ex.oracle_edges[0][0]
            # The oracle chain: the value keeper prefills on the pointer keeper's segment, and
            # the judger reads that cache (both segments, once each).
            ids, mask = llm.encode([llm.chat_text(messages[holder])])
            chain = kv.prefill(llm.model, ids, mask, past=segs[pointer]).kv
            picks["value keeper"] = [segs[holder]]
            picks["value+2"] = with_distractors([segs[holder]], 2)
            picks["pointer, value"] = [segs[pointer], segs[holder]]
            picks["chain"] = [chain]
            picks["chain+2"] = with_distractors([chain], 2)
        for name, senders in picks.items():
            judger = judger_messages(
                roster.judger, ex.question, task.answer_format, len(senders), args.prompts
            )
            reply = judge(llm, senders, judger, args.max_new_tokens)
            ok = task.score_one(reply, ex)["correct"]
            correct[name] = correct.get(name, 0) + int(ok)
            if args.verbose:
                print(f"{ex.id} {name:>18} ref={ex.answer} ok={int(ok)} reply={reply!r}")
    seconds = time.perf_counter() - start
    print(
        f"{len(examples)} questions, {args.num_agents} keepers x {args.facts_per_agent} facts, "
        f"hops={args.hops}, prompts={args.prompts}, {seconds:.0f} s"
    )
    for name, count in correct.items():
        print(f"{name:>20}: {count}/{len(examples)}")


if __name__ == "__main__":
    main()

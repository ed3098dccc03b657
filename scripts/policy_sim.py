"""Compare graph-policy settings on the policy-only lookup routing simulation.

    python scripts/policy_sim.py                       # 8 seeds, 300 steps, ~2 min on one core
    python scripts/policy_sim.py --seeds 3 --steps 150

Each setting trains a fresh policy per seed with simulated rewards
(`gcache.policy.simulate`) and reports, per seed, the first evaluated step at which the
held-out mean p(relevant -> judger) > 0.9 and mean p(distractor -> judger) < 0.1 ("-":
never within --steps), how many seeds got there and their median, and the two
probabilities after the last step, averaged over seeds.
Settings: the previous defaults (no query-role affinity, lr 3e-3), the same network at
the new lr and at 3e-2, and src/gcache/conf/policy/default.yaml (plus its network at two other rates).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from hydra.utils import instantiate

from gcache.policy.simulate import config_settings, load_policy_config, lookup_data, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    cfg = load_policy_config()
    default = config_settings(cfg)
    old_net = {**cfg.net, "affinity_scale": 0.0}

    def old_policy():
        return instantiate(old_net)

    settings = [
        ("no affinity (previous defaults)", {**default, "policy_factory": old_policy, "lr": 3e-3}),
        ("no affinity", {**default, "policy_factory": old_policy}),
        ("gcache/conf/policy/default.yaml", default),
        ("default network", {**default, "lr": 3e-3}),
        ("default network", {**default, "lr": 3e-2}),
        ("no affinity", {**default, "policy_factory": old_policy, "lr": 3e-2}),
    ]
    data = lookup_data()
    print(
        f"questions from {data.source}: {len(data.train_relevant)} train, "
        f"{len(data.heldout_relevant)} held out; B=4 questions x G=4 graphs per step"
    )
    print(
        f"{'setting':32} {'lr':>6}  {'steps to p_rel>0.9 & p_dis<0.1, per seed':42} "
        f"{'reached':>7} {'median':>6}  {'final p_rel':>11} {'p_dis':>5}"
    )
    for name, kwargs in settings:
        start = time.perf_counter()
        reached, final_rel, final_dis = [], [], []
        for seed in range(args.seeds):
            history = simulate(
                data=data, steps=args.steps, seed=seed, eval_every=args.eval_every, **kwargs
            )
            reached.append(history.steps_to(p_rel=0.9, p_dis=0.1))
            final_rel.append(history.p_rel[-1])
            final_dis.append(history.p_dis[-1])
        done = [r for r in reached if r is not None]
        median = f"{statistics.median(done):g}" if done else "-"  # of the seeds that got there
        per_seed = " ".join("-" if r is None else str(r) for r in reached)
        print(
            f"{name:32} {kwargs['lr']:>6g}  {per_seed:42} {len(done):>3}/{len(reached):<3} {median:>6}  "
            f"{statistics.mean(final_rel):11.2f} {statistics.mean(final_dis):5.2f}"
        )
        logging.info("%s lr %g: %.1f s", name, kwargs["lr"], time.perf_counter() - start)


if __name__ == "__main__":
    main()

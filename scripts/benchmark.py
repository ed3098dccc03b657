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

Speed rows at the hardware's pace (`--speed-only`; the GPU check of the rollout-speed issue):

    python scripts/benchmark.py --speed-only --device cuda --random-shape llama-1b
    python scripts/benchmark.py --speed-only --compare-ref 970f151     # the same rows with a git ref

5. decode B=1 / B=32 (CPU: 1 / 8): gcache's decoding (prefill + `kv.decode`, every row decodes
   all its tokens) vs transformers `generate` with a dynamic and a static cache on the same model
   and prompts, tok/s (target on a GPU: gcache >= 0.8x the static cache).
6. latent rollout: rows/s of a chain of 4 agents (8 latent steps, judger 32 tokens) at max_batch
   1 / 8 / 32, peak GPU memory.
7. syncs per row: CUDA's sync-debug warnings on a GPU; on CPU the tensor -> host conversions
   (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, `.nonzero()`), host tensors included (an upper bound).

The quickstart's phases (`--quickstart`): `python -m gcache.train logger=csv` in fresh processes,
alternating between this checkout and a worktree of `--compare-ref` (default: the commit before the
work-sharing changes), `--rounds` of each:

    python scripts/benchmark.py --quickstart --compare-ref 3fe0b27 --rounds 1

8. quickstart: wall time of startup (to the end of the first validation), training (24 steps and
   their validations), test and comparison (one phase: the comparison now runs on the test batches)
   and the whole run; prompt tokens run through the model per question of training, validation and
   test + comparison (counted in the process, `TOKEN_COUNTER`, at either commit) and the test table.

`--random-shape {smollm2-135m,llama-1b,qwen3-0.6b,qwen3-4b,qwen3-8b}` builds random weights of
that config offline (speed and memory only); `--compare-ref REF` runs rows 5-7 in fresh processes
alternating between this checkout and a worktree of REF and reports this / REF for every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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


# ---- speed at the hardware's pace: gcache's token loops against transformers on the same model ----

# Configs of real models (random weights, built offline): speed and memory only, never accuracy.
RANDOM_SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "llama-1b": ("llama", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                               tie_word_embeddings=True)),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                                 tie_word_embeddings=True)),
    "qwen3-4b": ("qwen3", dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                               tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                               tie_word_embeddings=False)),
}


def random_shape_llm(shape: str, device: str, dtype: str):
    """A LocalLM with random weights of a real model's config and the embedded tokenizer (offline)."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from gcache.llm.local import LocalLM, ensure_embedded_model_dir, resolve_device, resolve_dtype

    family, sizes = RANDOM_SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model_dir())
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=32768)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(dev):
            model = model_cls(config_cls(**sizes, **ids))
    finally:
        torch.set_default_dtype(previous)
    return LocalLM(model, tokenizer, name=f"random-{shape}")


PROMPT = "What is the code of the green door? Think step by step, then give the code."


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one warm-up call (capture, compilation, caches)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def loop_pool(llm, cuda_graphs: str):
    """The token loops a rollout with `rollout.cuda_graphs=cuda_graphs` runs: None (eager) or the pool."""
    from gcache.rollout import RolloutConfig

    config = RolloutConfig(cuda_graphs=cuda_graphs)
    loops = config.loops(llm.device)
    return None if loops == "eager" else llm.loop_pool(capture=loops == "graphs", memory=config.workspace_memory)


def bench_decode(llm, batch: int, tokens: int, cuda_graphs: str = "auto") -> dict:
    """Decoded tokens/s of the same prompts at batch B: gcache's decoding (prefill + `kv.decode` on the
    loops of `cuda_graphs`, every row decodes all `tokens`) vs transformers `generate` with a dynamic
    and with a static cache."""
    from gcache import kv

    ids, mask = llm.encode([PROMPT] * batch)
    device = ids.device
    pool = loop_pool(llm, cuda_graphs)

    def ours():
        step = kv.prefill(llm.model, ids, mask)
        kv.decode(llm.model, step.kv, step.logits, max_new_tokens=tokens, eos_token_ids=[-1],
                  pad_token_id=llm.tokenizer.pad_token_id, pool=pool, check_every=8 if pool else 1)

    def generate(cache: str | None):
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                      pad_token_id=llm.tokenizer.pad_token_id)
        if cache:
            kwargs["cache_implementation"] = cache
        return lambda: llm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    result = {}
    with torch.no_grad():
        for name, fn in (("gcache", ours), ("hf dynamic", generate(None)), ("hf static", generate("static"))):
            result[f"{name} tok/s"] = batch * tokens / _timed(device, fn)
    result["gcache / hf static"] = result["gcache tok/s"] / result["hf static tok/s"]
    return result


def bench_rollouts(llm, batches: list[int], rows: int, latent_steps: int, tokens: int,
                   cuda_graphs: str = "auto") -> dict:
    """Latent rollout rows/s on a chain of the math roster (4 agents x `latent_steps` latent steps, full
    retention, judger `tokens` tokens) at max_batch B, and peak GPU memory."""
    from gcache.agents import build_roster
    from gcache.policy.topology import fixed_adjacency, judger_senders_all
    from gcache.rollout import RolloutConfig, RolloutEngine

    roster = build_roster("math")
    questions = [f"Tom has {a} apples and buys {a + 7} more. How many apples does he have now?" for a in range(rows)]
    adjacency = judger_senders_all(fixed_adjacency("chain", roster.num_agents).expand(rows, -1, -1))
    device = llm.device
    result = {}
    for size in batches:
        engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=latent_steps, max_new_tokens=tokens,
                                                          max_batch=size, retention="full", cuda_graphs=cuda_graphs))
        n = min(rows, max(size, 2))

        def run(engine=engine, n=n):
            engine.run(questions[:n], adjacency[:n], list(range(n)), answer_format=FORMAT)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result[f"rows/s B={size}"] = n / _timed(device, run)
        if device.type == "cuda":
            result[f"peak GiB B={size}"] = torch.cuda.max_memory_allocated() / 2**30
    return result


FORMAT = "Give the final answer as \\boxed{number}."


def count_syncs(llm, latent_steps: int, tokens: int, cuda_graphs: str = "auto") -> dict:
    """Host-device synchronisations of one latent rollout row: CUDA's sync-debug warnings on a GPU,
    else the tensor -> host conversions (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, ...) that
    would synchronise there."""
    import warnings

    from gcache.agents import build_roster
    from gcache.policy.topology import fixed_adjacency, judger_senders_all
    from gcache.rollout import RolloutConfig, RolloutEngine

    roster = build_roster("math")
    adjacency = judger_senders_all(fixed_adjacency("chain", roster.num_agents).expand(1, -1, -1))
    engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=latent_steps, max_new_tokens=tokens, max_batch=1,
                                                      cuda_graphs=cuda_graphs))

    def row():
        engine.run(["What is 2 + 3?"], adjacency, [0], answer_format=FORMAT)

    row()
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                row()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return {"syncs per row": len(caught), "counted by": "torch.cuda sync-debug mode"}
    count = [0]
    names = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        row()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return {"syncs per row": count[0], "counted by": "tensor -> host conversions (CPU)"}


def speed(llm, args) -> dict:
    """The speed rows of one model, in one process."""
    results = {"model": {"name": llm.name, "device": str(llm.device), "dtype": str(next(llm.model.parameters()).dtype),
                         "params M": sum(p.numel() for p in llm.model.parameters()) / 1e6}}
    loops = args.cuda_graphs
    for batch in args.decode_batches:
        results[f"decode B={batch} ({args.decode_tokens} tokens)"] = bench_decode(llm, batch, args.decode_tokens, loops)
    results["latent rollout (chain of 4, 8 latent steps, judger 32 tokens)"] = bench_rollouts(
        llm, args.rollout_batches, args.rollout_rows, latent_steps=8, tokens=32, cuda_graphs=loops)
    results["syncs"] = count_syncs(llm, latent_steps=8, tokens=32, cuda_graphs=loops)
    results["token loops"] = {"rollout.cuda_graphs": loops, **{f"{kind} {key}": value
                              for kind, stats in llm.loop_stats().items() for key, value in stats.items()
                              if key != "shapes"}}
    return results


def compare_with_ref(ref: str, argv: list[str], rounds: int) -> dict:
    """Run the speed rows with this checkout and with git `ref` (a worktree), alternating in fresh processes
    (`rounds` times each, best of each kept), and report the ratio of every figure (this / ref)."""
    import os
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    base = Path(tempfile.mkdtemp(prefix="gcache-ref-")) / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(base), ref], check=True,
                   capture_output=True)
    try:
        best: dict[str, dict] = {"this": {}, "ref": {}}
        for _ in range(rounds):
            for label, tree in (("this", root), ("ref", base)):  # each tree runs its own benchmark script
                out = Path(tempfile.mkdtemp()) / "speed.json"
                env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                subprocess.run([sys.executable, str(tree / "scripts" / "benchmark.py"), "--speed-only", "--speed-json",
                                str(out), *argv], check=True, env=env)
                for row, values in json.loads(out.read_text()).items():
                    for key, value in values.items():
                        if isinstance(value, float) and "/s" in key:  # throughput: higher is better
                            best[label].setdefault(row, {})[key] = max(best[label].get(row, {}).get(key, 0.0), value)
                        elif key == "syncs per row":
                            best[label].setdefault(row, {})[key] = value
        ratios = {row: {key: value / best["ref"][row][key] for key, value in values.items()
                        if best["ref"].get(row, {}).get(key)} for row, values in best["this"].items()}
        return {"this": best["this"], "ref": best["ref"], "this / ref": ratios, "ref commit": ref}
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(base)], capture_output=True)


# Run in the quickstart's process (`python -c`): counts the prompt tokens run through the model (every
# `kv.prefill`: agents, judgers, cached prefixes; the fuser's teacher-forced `kv.answer_nll`: prompt and
# target) by the phase whose Lightning hook (or the comparison of commits before it ran in the test) called
# them, and writes them to <run dir>/prefill_tokens.json at exit. Works on any commit that has these names.
TOKEN_COUNTER = """
import atexit, inspect, json, runpy, sys
import gcache.kv as kv
counts = {}
PHASES = {"training_step": "training", "validation_step": "validation", "test_step": "test + comparison",
          "compare_on_test": "test + comparison"}
def phase():
    frame = inspect.currentframe()
    while frame is not None:
        name = PHASES.get(frame.f_code.co_name)
        if name:
            return name
        frame = frame.f_back
    return "other"
def counted(original, tokens):
    def wrapper(*args, **kwargs):
        key = phase()
        counts[key] = counts.get(key, 0) + int(tokens(*args, **kwargs))
        return original(*args, **kwargs)
    return wrapper
kv.prefill = counted(kv.prefill, lambda model, ids, mask, **kw: mask.sum())
kv.answer_nll = counted(kv.answer_nll, lambda model, cache, pids, pmask, tids, tmask: pmask.sum() + tmask.sum())
run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir="))
atexit.register(lambda: open(run_dir + "/prefill_tokens.json", "w").write(json.dumps(counts)))
sys.argv[0] = "gcache.train"
runpy.run_module("gcache.train", run_name="__main__")
"""


def quickstart_phases(run_dir: Path, launched: float, ended: float) -> dict:
    """Seconds per phase of a `gcache.train` run, from its train.log's timestamps (local time) and the
    process's launch and end (`time.time()`); prompt tokens run through the model per question of each phase
    (`TOKEN_COUNTER`: training over its 96 questions, validation over its 5 x 16, test + comparison over 40)
    and the test table from summary.json."""
    import datetime
    import re

    stamps = []
    for line in (run_dir / "train.log").read_text().splitlines():
        match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^]]*\]\[\w+\] - (.*)", line)
        if match:
            moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps.append((moment, match.group(2)))

    def last(prefix: str) -> float:
        return [t for t, text in stamps if text.startswith(prefix)][-1]

    start_val = next(t for t, text in stamps if text.startswith("topology picture") and "step000000" in text)
    trained = last("topology picture")
    summary = json.loads((run_dir / "summary.json").read_text())
    comparison = summary.get("comparison") or {}
    tokens = json.loads((run_dir / "prefill_tokens.json").read_text())
    questions = {"training": 96, "validation": 5 * 16, "test + comparison": 40}
    per_question = {f"{phase} prompt tokens/q": tokens.get(phase, 0) / n for phase, n in questions.items()}
    return {
        "startup + first validation s": start_val - launched,
        "training s (24 steps, 4 validations)": trained - start_val,
        "test + comparison s": last("summary:") - trained,
        "total s": ended - launched,
        **per_question,
        "training + test + comparison prompt tokens": tokens.get("training", 0) + tokens.get("test + comparison", 0),
        "table": " / ".join(f"{m['accuracy']:.3f}" for m in comparison.get("methods", {}).values()),
    }


def compare_quickstart(ref: str, rounds: int) -> dict:
    """The quickstart with this checkout and with git `ref` (a worktree), alternating fresh processes;
    the faster of each kept, with this / ref for every time and token count."""
    import os
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    base = Path(tempfile.mkdtemp(prefix="gcache-ref-")) / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(base), ref], check=True,
                   capture_output=True)
    try:
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for label, tree in (("this", root), ("ref", base)):
                run_dir = Path(tempfile.mkdtemp(prefix=f"quickstart-{label}-"))
                # the caller's environment, as a user's run has it (OMP_WAIT_POLICY=PASSIVE, for processes that
                # share cores, makes every small op wait for its threads to wake)
                env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                launched = time.time()
                subprocess.run([sys.executable, "-c", TOKEN_COUNTER, "logger=csv", f"hydra.run.dir={run_dir}"],
                               check=True, env=env, cwd=tree, capture_output=True)
                phases = quickstart_phases(run_dir, launched, time.time())
                if label not in best or phases["total s"] < best[label]["total s"]:
                    best[label] = phases
        ratio = {key: value / best["ref"][key] for key, value in best["this"].items()
                 if not isinstance(value, str) and best["ref"].get(key)}
        return {"this": best["this"], "ref": best["ref"], "this / ref": ratio, "ref commit": ref}
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(base)], capture_output=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _table(results: dict) -> str:
    lines = ["| benchmark | measurement |", "|---|---|"]
    for name, values in results.items():
        shown = ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items()
                          if not isinstance(v, dict))
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--arith", type=int, default=20)
    parser.add_argument("--gsm8k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--out", default="outputs/benchmark")
    speed_args = parser.add_argument_group("speed rows (gcache vs transformers on one model, in one process)")
    speed_args.add_argument("--speed-only", action="store_true", help="only the speed rows")
    speed_args.add_argument("--device", default="auto", help="auto | cpu | cuda")
    speed_args.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    speed_args.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "static", "off"],
                            help="gcache's token loops, as rollout.cuda_graphs (static: a GPU's loops without capture)")
    speed_args.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                            help="random weights of this model's config, built offline (speed and memory only)")
    speed_args.add_argument("--decode-batches", type=_ints, default=None, help="default 1,8 on CPU, 1,32 on CUDA")
    speed_args.add_argument("--decode-tokens", type=int, default=64)
    speed_args.add_argument("--rollout-batches", type=_ints, default=None, help="default 1,8 on CPU, 1,8,32 on CUDA")
    speed_args.add_argument("--rollout-rows", type=int, default=None, help="rows per measurement (default 8 on CPU, 32 on CUDA)")
    speed_args.add_argument("--compare-ref", default=None,
                            help="a git ref: run the speed rows with it and with this checkout, alternating, and report ratios")
    speed_args.add_argument("--rounds", type=int, default=2, help="with --compare-ref: runs of each")
    speed_args.add_argument("--speed-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quickstart", action="store_true",
                        help="the quickstart's phases, this checkout against --compare-ref (default 3fe0b27)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.decode_batches = args.decode_batches or ([1, 32] if cuda else [1, 8])
    args.rollout_batches = args.rollout_batches or ([1, 8, 32] if cuda else [1, 8])
    args.rollout_rows = args.rollout_rows or (32 if cuda else 8)

    if args.quickstart:
        compared = compare_quickstart(args.compare_ref or "3fe0b27", args.rounds)
        table = "\n".join(f"| {key} | {compared['this'].get(key)} | {compared['ref'].get(key)} | "
                          f"{compared['this / ref'].get(key, '—')} |" for key in compared["this"])
        table = f"| phase | this | ref {compared['ref commit']} | this / ref |\n|---|---|---|---|\n{table}"
        print(table)
        (out / "quickstart.md").write_text(table + "\n")
        (out / "quickstart.json").write_text(json.dumps(compared, indent=2))
        return

    if args.compare_ref:
        child = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                 *(["--cuda-graphs", args.cuda_graphs] if args.cuda_graphs != "auto" else []),
                 "--decode-batches", ",".join(map(str, args.decode_batches)), "--decode-tokens", str(args.decode_tokens),
                 "--rollout-batches", ",".join(map(str, args.rollout_batches)),
                 "--rollout-rows", str(args.rollout_rows), "--model", args.model]
        if args.random_shape:
            child += ["--random-shape", args.random_shape]
        compared = compare_with_ref(args.compare_ref, child, args.rounds)
        table = "\n\n".join(f"{label}:\n" + _table(compared[label]) for label in ("this", "ref", "this / ref"))
        print(table)
        (out / "speed_vs_ref.md").write_text(f"ref: {args.compare_ref}\n\n{table}\n")
        (out / "speed_vs_ref.json").write_text(json.dumps(compared, indent=2))
        return

    if args.speed_only:
        from gcache.llm.local import LocalLM

        if args.random_shape:
            llm = random_shape_llm(args.random_shape, args.device, args.dtype)
        elif args.model == "smollm2-135m":
            llm = LocalLM.embedded(device=args.device, dtype=args.dtype)
        else:
            llm = LocalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        results = speed(llm, args)
        if args.speed_json:
            Path(args.speed_json).write_text(json.dumps(results, indent=2))
        table = _table(results)
        print(table)
        (out / "speed.md").write_text(table + "\n")
        return

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
        eval_cfg = _cfg("evaluate", [f"model={args.model}", f"task={task}", f"limit_test={limit}",
                                     f"rollout.latent_steps={args.latent_steps}", "methods=[text_mas,latent_mas]",
                                     "rollout.max_new_tokens=256", "rollout.agent_max_new_tokens=256", "eval_batch_size=4", "topology=full",
                                     "logger=none"], out / f"eval-{task}")
        report = evaluate(eval_cfg, module=build_module(eval_cfg, llm=module.llm))["methods"]
        text, latent = report["text_mas"], report["latent_mas"]
        results[f"latent_vs_text ({task}, {limit} q)"] = {
            "speed-up": latent["speedup_vs_text_mas"],
            "decoded token share": latent["decoded_tokens_vs_text_mas"],
            "latent acc": latent["accuracy"], "latent ci95": latent["ci95"],
            "text acc": text["accuracy"], "text ci95": text["ci95"],
        }

    table = _table(results)
    print(table)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

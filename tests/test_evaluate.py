"""Evaluation: every method and control runs, the report is what results.jsonl says, resume is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache.cli import CONF_DIR
from gcache.evaluate import evaluate
from gcache.report import read_results, summarize
from gcache.stats import wilson_interval

# Untrained methods and controls (trained ones: test_trained_checkpoint_…; API ones: tests/test_modes.py).
METHODS = ["single", "single_budget", "text_mas", "latent_mas", "fixed-full", "fixed-star", "mismatched", "zeroed",
           "shuffled", "realign-identity", "realign-random"]
TINY = ["model=tiny-random", "task=gsm8k", "topology=full", "limit_test=3", "eval_batch_size=3", "rollout.latent_steps=2", "rollout.max_new_tokens=4",
        "rollout.agent_max_new_tokens=4"]


def _cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*TINY, f"methods=[{','.join(METHODS)}]", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


def _without_time(report):
    return {m: {k: v for k, v in s.items() if "seconds" not in k and "speedup" not in k}
            for m, s in report["methods"].items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(_cfg(out))


def test_all_methods_and_both_controls_complete(full_run):
    out, report = full_run
    assert list(report["methods"]) == list(METHODS)
    records = read_results(out / "results.jsonl")
    assert len(records) == 3 * len(METHODS)
    assert {(r["method"]) for r in records} == set(METHODS)
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file()
    by = report["methods"]
    assert by["single"]["peak_cache_bytes"] < by["latent_mas"]["peak_cache_bytes"]
    assert by["text_mas"]["decoded_tokens_per_question"] > by["latent_mas"]["decoded_tokens_per_question"]


def test_report_numbers_equal_those_recomputed_from_results(full_run):
    out, report = full_run
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    written = json.loads((out / "report.json").read_text())
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        rewards = [r["reward"] for r in rows if r["reward"] is not None]
        stats = written["methods"][method]
        assert stats["accuracy"] == pytest.approx(sum(rewards) / len(rewards))
        assert stats["decoded_tokens_per_question"] == pytest.approx(sum(r["decoded_tokens"] for r in rows) / len(rows))
        assert stats["prompt_tokens_per_question"] == pytest.approx(sum(r["prompt_tokens"] for r in rows) / len(rows))
        assert stats["seconds_per_question"] == pytest.approx(sum(r["seconds"] for r in rows) / len(rows))
        assert stats["peak_cache_bytes"] == max(r["peak_cache_bytes"] for r in rows)
        text = written["methods"]["text_mas"]
        assert stats["speedup_vs_text_mas"] == pytest.approx(text["seconds_per_question"] / stats["seconds_per_question"])
    assert "| fixed-full |" in (out / "report.md").read_text()
    assert "nan" not in (out / "report.md").read_text()


def test_resume_after_an_interrupted_run_gives_the_same_report(full_run, tmp_path):
    out, report = full_run
    lines = (out / "results.jsonl").read_text().splitlines()
    # An interrupted run: the first 7 records, then a line torn mid-write.
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:25])
    resumed = evaluate(_cfg(tmp_path))
    records = read_results(tmp_path / "results.jsonl")
    assert len(records) == len(lines)
    assert sorted((r["id"], r["method"]) for r in records) == sorted(
        (json.loads(line)["id"], json.loads(line)["method"]) for line in lines
    )
    assert _without_time(resumed) == _without_time(report)


def test_a_finished_run_is_not_recomputed(full_run, tmp_path):
    out, _ = full_run
    (tmp_path / "results.jsonl").write_text((out / "results.jsonl").read_text())
    before = (tmp_path / "results.jsonl").read_text()
    evaluate(_cfg(tmp_path))
    assert (tmp_path / "results.jsonl").read_text() == before


def test_methods_share_agents_on_a_batch_and_their_records_are_those_of_methods_run_alone(full_run, tmp_path,
                                                                                         monkeypatch, caplog):
    """The full run shared agents between methods (fixed-full and its controls read the same agents;
    latent_mas's first agent is fixed-full's) and ran the methods with one engine (single, latent_mas,
    fixed-full, fixed-star: the same rollout settings, no fuser) as one batch of rows; each method alone,
    without any sharing, gives every record the same."""
    from gcache.rollout import RolloutEngine

    out, _ = full_run
    shared = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    computed = {"shared": 0, "alone": 0}
    calls = {"shared": [], "alone": []}
    real_run = RolloutEngine.run

    def counting(self, questions, adjacency, *args, **kwargs):
        batch = real_run(self, questions, adjacency, *args, **kwargs)
        computed[mode] += batch.prefills
        calls[mode].append(adjacency.shape[0] // len(questions))  # rows per question: the methods of the call
        return batch

    monkeypatch.setattr(RolloutEngine, "run", counting)
    mode = "shared"
    evaluate(_cfg(tmp_path / "shared"))
    mode = "alone"
    monkeypatch.setattr(RolloutEngine, "_memo_key", lambda self, *args: object())  # never the same key: no sharing
    with caplog.at_level("INFO", logger="gcache.evaluate"):
        evaluate(_cfg(tmp_path / "alone", "share_methods=false"))
    alone = [json.loads(line) for line in (tmp_path / "alone" / "results.jsonl").read_text().splitlines()]

    def key(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    assert sorted(map(json.dumps, map(key, alone))) == sorted(map(json.dumps, map(key, shared)))
    # agent computations run: fixed-full's four agents once per batch for it and its four controls
    # (mismatched, zeroed, shuffled share them; the realign controls think otherwise), latent_mas's first
    assert computed["shared"] < computed["alone"]
    # one engine call per method alone; shared, one call runs single, latent_mas, fixed-full and fixed-star
    assert calls["alone"] == [1] * len(METHODS)
    assert sorted(calls["shared"]) == [1] * (len(METHODS) - 4) + [4]
    print(f"agent computations: {computed['alone']} alone, {computed['shared']} shared")


def test_evaluation_batches_are_sized_by_rows():
    """Questions per batch: `max_batch` rows, a row per question for every method of the largest engine
    call, and the questions split into equal batches."""
    from gcache.datamodule import eval_batch_size

    assert eval_batch_size(40, 1, 32) == 20  # two batches of 20, not 32 + 8
    assert eval_batch_size(16, 1, 32) == 16
    assert eval_batch_size(40, 3, 32) == 10  # 3 methods in one call: 30 rows a batch
    assert eval_batch_size(41, 1, 32) == 21
    assert eval_batch_size(5, 40, 32) == 1  # more methods than rows: a question at a time
    assert eval_batch_size(0, 1, 32) == 1


def test_wilson_interval_and_unknown_method(tmp_path):
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and math.isclose(low + high, 1.0, abs_tol=1e-9)
    with pytest.raises(ValueError, match="methods: unknown method 'no_handoff'; allowed: single, "):
        evaluate(_cfg(tmp_path, "methods=[no_handoff]"))
    with pytest.raises(ValueError, match="trained policy: give ckpt_path"):
        evaluate(_cfg(tmp_path, "methods=[gcache]"))
    assert summarize([]) == {"methods": {}}


def test_every_record_says_what_ran(full_run):
    out, _ = full_run
    configs = {r["method"]: r["config"] for r in read_results(out / "results.jsonl")}
    assert configs["fixed-full"]["graph"] == "full" and configs["fixed-full"]["fuser"] == "none"
    assert configs["fixed-full"]["checkpoint"] is None
    assert configs["single"]["graph"] == "none" and configs["single"]["judger_latent_steps"] == 0
    assert configs["single_budget"]["judger_latent_steps"] == 4 * 2  # N agents x latent_steps
    assert configs["latent_mas"]["graph"] == "chain" and configs["latent_mas"]["retention"] == "full"
    assert configs["text_mas"]["method"] == "text"
    for control in ("mismatched", "zeroed", "shuffled"):
        assert configs[control]["subject"] == "fixed-full" and configs[control]["judger_cache"] == control
    assert configs["realign-random"]["realign"] == "random" and configs["realign-identity"]["realign"] == "identity"
    records = read_results(out / "results.jsonl")
    single = [r for r in records if r["method"] == "single"]
    assert all(r["judger_senders"] == [] for r in single)
    assert all(r["judger_senders"] == [0, 1, 2, 3] for r in records if r["method"] == "fixed-full")


def _train_cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=tiny-random", "logger=csv", "task=gsm8k", "topology=full", "limit_train=4", "limit_val=2", "limit_test=3",
            "batch_size=2", "policy.graphs_per_question=2", "rollout.latent_steps=2", "rollout.max_new_tokens=4", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


def test_trained_checkpoint_evaluates_to_the_training_runs_own_test_predictions(tmp_path):
    from gcache.train import run

    summary = run(_train_cfg(tmp_path / "train"))
    trained = [json.loads(line) for line in (tmp_path / "train" / "test_predictions.jsonl").read_text().splitlines()]
    ckpt = summary["checkpoint"]
    report = evaluate(_cfg(tmp_path / "eval", f"ckpt_path={ckpt}",
                           "methods=[gcache,gcache-policy-only,gcache-fuser-only,fixed-full,mismatched]"))
    records = read_results(tmp_path / "eval" / "results.jsonl")
    mine = {r["id"]: r for r in records if r["method"] == "gcache"}
    assert [mine[t["id"]]["answer"] for t in trained] == [t["answer"] for t in trained]
    assert [mine[t["id"]]["judger_senders"] for t in trained] == [t["judger_senders"] for t in trained]
    assert report["methods"]["gcache"]["accuracy"] == pytest.approx(summary["test_accuracy"])
    config = mine[trained[0]["id"]]["config"]
    assert config["graph"] == "learned" and config["fuser"] == "trained" and config["checkpoint"].endswith("last.ckpt")
    assert report["methods"]["mismatched"]["config"]["subject"] == "gcache"
    assert report["methods"]["gcache-policy-only"]["config"]["fuser"] == "none"
    assert report["methods"]["gcache-fuser-only"]["config"]["graph"] == "full"


def test_the_other_question_control_weights_each_questions_senders_by_the_next_questions_logits(tmp_path, monkeypatch):
    from gcache.rollout import RolloutEngine
    from gcache.train import run

    summary = run(_train_cfg(tmp_path / "train"))
    seen = {}
    real_run = RolloutEngine.run

    def spy(self, questions, adjacency, question_index, **kwargs):
        if self.fuser is not None:  # the two fuser methods' rollouts: what their judgers were weighted by
            seen[len(seen)] = (list(questions), adjacency.clone(), kwargs["edge_logits"].clone())
        return real_run(self, questions, adjacency, question_index, **kwargs)

    monkeypatch.setattr(RolloutEngine, "run", spy)
    report = evaluate(_cfg(tmp_path / "eval", f"ckpt_path={summary['checkpoint']}",
                           "methods=[gcache-fuser-only,gcache-fuser-other-question]"))
    (q_own, a_own, own), (q_other, a_other, other) = seen[0], seen[1]
    assert q_own == q_other and torch.equal(a_own, a_other) and len(q_own) == 3  # the same questions and graph
    assert torch.equal(other, own.roll(-1, dims=0)) and not torch.equal(other, own)  # question i: question i+1's
    config = report["methods"]["gcache-fuser-other-question"]["config"]
    assert config["fuser_signal"] == "other-question" and config["fuser"] == "trained" and config["graph"] == "full"
    with pytest.raises(ValueError, match="needs batches of at least two different questions"):
        evaluate(_cfg(tmp_path / "eval1", f"ckpt_path={summary['checkpoint']}", "limit_test=1",
                      "methods=[gcache-fuser-other-question]"))


def test_a_checkpoint_is_evaluated_with_its_runs_settings_and_the_command_line_differences_are_named(tmp_path):
    # Trained with latent_steps=1, max_new_tokens=3 and topology=chain; evaluated from the defaults
    # (4 latent steps, 16 tokens, topology=debate, task lookup): the run's settings are applied.
    from gcache.train import run

    summary = run(_train_cfg(tmp_path / "train", "rollout.latent_steps=1", "rollout.max_new_tokens=3",
                             "topology=chain"))
    trained = [json.loads(line) for line in (tmp_path / "train" / "test_predictions.jsonl").read_text().splitlines()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model=tiny-random", f"ckpt_path={summary['checkpoint']}",
                                                         "methods=[gcache]", "limit_test=3"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    report = evaluate(cfg, overrides=[])
    mine = {r["id"]: r["answer"] for r in read_results(tmp_path / "eval" / "results.jsonl")}
    assert [mine[t["id"]] for t in trained] == [t["answer"] for t in trained]  # the run's own test answers
    adopted = report["settings"]["adopted"]
    assert adopted["rollout.latent_steps"] == {"default": 4, "run": 1} and adopted["task.name"]["run"] == "gsm8k"
    assert report["settings"]["given"] == {} and report["settings"]["source"].startswith("checkpoint ")
    # A setting given on the command line that differs from the run's is applied and named.
    given = ["rollout.max_new_tokens=5"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model=tiny-random", f"ckpt_path={summary['checkpoint']}",
                                                         "methods=[gcache]", "limit_test=3", *given])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval5")
    report = evaluate(cfg, overrides=given)
    assert report["settings"]["given"] == {"rollout.max_new_tokens": {"given": 5, "run": 3}}
    assert "`rollout.max_new_tokens=5` (run: `3`)" in (tmp_path / "eval5" / "report.md").read_text()
    assert report["methods"]["gcache"]["decoded_tokens_per_question"] <= 5


def test_a_checkpoint_from_before_the_attention_fusion_is_evaluated_with_the_value_gates_it_trained(tmp_path):
    # A run from before `policy.fusion` and `policy.fuser_graph`: value gates trained on the sampled graphs. Its
    # checkpoint's settings lack both keys (simulated by removing them); evaluated from today's defaults
    # (attention, all), it runs what it trained.
    from gcache.checkpoints import load_checkpoint
    from gcache.train import run

    summary = run(_train_cfg(tmp_path / "train", "policy.fusion=values", "policy.fuser_graph=sampled",
                             "policy.fuser_lr=0.5"))
    trained = [json.loads(line) for line in (tmp_path / "train" / "test_predictions.jsonl").read_text().splitlines()]
    state = load_checkpoint(summary["checkpoint"])
    assert float(state["state_dict"]["fuser.logit_slope"]) != 0.0  # trained gates: the check is not of an identity
    for key in ("fusion", "fuser_graph"):
        del state["gcache_run"]["policy"][key]
    assert "fusion" not in state["gcache_config"]  # the identity of a values run is that of older runs
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model=tiny-random", f"ckpt_path={old}", "methods=[gcache]",
                                                         "limit_test=3"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    report = evaluate(cfg, overrides=[])
    mine = {r["id"]: r["answer"] for r in read_results(tmp_path / "eval" / "results.jsonl")}
    assert [mine[t["id"]] for t in trained] == [t["answer"] for t in trained]
    assert report["settings"]["adopted"]["policy.fuser_lr"] == {"default": 0.05, "run": 0.5}


def test_a_channel_trained_on_oracle_graphs_is_evaluated_on_them_with_its_controls_and_a_text_baseline(tmp_path):
    """policy.graphs=oracle: `gcache` and its controls run the oracle graph with the trained channel;
    `wrong-sender` moves the judger to the next keeper; `text-oracle` hands on latent_steps tokens of text."""
    from gcache.train import run

    steps = 2
    summary = run(_train_cfg(tmp_path / "train", "task=lookup", "topology=debate", "policy.graphs=oracle",
                             "policy.channel=lowrank", "policy.channel_rank=2", "rollout.retention=latent_only",
                             f"rollout.latent_steps={steps}"))
    trained = [json.loads(line) for line in (tmp_path / "train" / "test_predictions.jsonl").read_text().splitlines()]
    methods = "[gcache,oracle,text-oracle,wrong-sender,zeroed,mismatched]"
    report = evaluate(_cfg(tmp_path / "eval", "task=lookup", "topology=debate", f"ckpt_path={summary['checkpoint']}",
                           f"methods={methods}", "limit_test=3", "policy.graphs=oracle", "policy.channel=lowrank",
                           "policy.channel_rank=2", "rollout.retention=latent_only", f"rollout.latent_steps={steps}"))
    records = read_results(tmp_path / "eval" / "results.jsonl")
    by = {m: {r["id"]: r for r in records if r["method"] == m} for m in report["methods"]}
    keeper = {t["id"]: t["judger_senders"] for t in trained}
    for question, senders in keeper.items():
        if question in by["gcache"]:
            assert by["gcache"][question]["judger_senders"] == senders  # the oracle keeper, as in training
            assert by["oracle"][question]["judger_senders"] == senders
            assert by["wrong-sender"][question]["judger_senders"] == [(senders[0] + 1) % 4]
    configs = {m: next(iter(rows.values()))["config"] for m, rows in by.items()}
    assert configs["gcache"]["graph"] == "oracle" and configs["gcache"]["fuser"] == "trained"
    assert configs["wrong-sender"]["subject"] == "gcache" and configs["wrong-sender"]["fuser"] == "trained"
    assert configs["zeroed"]["graph"] == "oracle" and configs["oracle"]["fuser"] == "none"
    assert configs["text-oracle"]["method"] == "text" and configs["text-oracle"]["agent_max_new_tokens"] == steps
    from gcache.llm.local import LocalLM

    tiny = LocalLM.tiny_random(seed=0)  # keys and values of every layer, float32
    bytes_per_position = 2 * tiny.num_layers * tiny.kv_dim * 4
    for r in by["gcache"].values():  # the judger read the keeper's latent positions, nothing else
        assert r["handed_positions"] == steps and r["handed_bytes"] == steps * bytes_per_position
    for r in by["text-oracle"].values():  # at most `steps` decoded tokens of text, counted in UTF-8 bytes
        assert 0 < r["handed_positions"] <= steps and 0 < r["handed_bytes"] < 100


def test_wrong_senders_shift_the_judgers_column_and_refuse_graphs_where_that_changes_nothing():
    from gcache.policy.topology import wrong_senders

    a = torch.zeros(2, 5, 5, dtype=torch.bool)
    a[0, 2, 4] = True  # the judger reads agent 2
    a[1, 0, 1], a[1, 1, 4], a[1, 3, 4] = True, True, True  # a chain 0 -> 1 and the judger reads 1 and 3
    b = wrong_senders(a)
    assert b[0, :4, 4].nonzero().flatten().tolist() == [3]
    assert b[1, :4, 4].nonzero().flatten().tolist() == [0, 2] and bool(b[1, 0, 1])  # agent edges kept
    full = torch.zeros(1, 5, 5, dtype=torch.bool)
    full[0, :4, 4] = True
    with pytest.raises(ValueError, match="reads some agents but not all"):
        wrong_senders(full)


def test_api_columns_per_question_and_per_correct_answer():
    from gcache.report import api_columns

    rows = [{"reward": 1.0, "api_prompt_tokens": 100, "api_completion_tokens": 10, "api_cost_usd": 0.3},
            {"reward": 0.0, "api_prompt_tokens": 50, "api_completion_tokens": 30, "api_cost_usd": 0.1},
            {"reward": None, "api_prompt_tokens": 0, "api_completion_tokens": 0, "api_cost_usd": 0.0}]
    assert api_columns(rows) == pytest.approx({
        "api_prompt_tokens_per_question": 50.0, "api_completion_tokens_per_question": 40 / 3,
        "api_cost_usd_per_question": 0.4 / 3, "api_cost_usd_per_correct": 0.4})
    unpriced = api_columns([{**r, "api_cost_usd": None} for r in rows])
    assert unpriced["api_cost_usd_per_question"] is None and unpriced["api_cost_usd_per_correct"] is None
    assert api_columns(rows[1:])["api_cost_usd_per_correct"] is None  # nothing correct
    assert api_columns([{"reward": 1.0}]) == {}  # a local method: no API columns


def test_oracle_flat_sends_the_chains_agents_to_the_judger_side_by_side(tmp_path):
    from types import SimpleNamespace

    from gcache.policy.topology import oracle_adjacency

    chain = SimpleNamespace(id="q", oracle_edges=((0, 2), (2, -1)))  # pointer 0 -> value keeper 2 -> judger
    flat, oracle = oracle_adjacency([chain], 4, flat=True)[0], oracle_adjacency([chain], 4)[0]
    assert oracle.nonzero().tolist() == [[0, 2], [2, 4]]
    assert flat.nonzero().tolist() == [[0, 4], [2, 4]]

    # Through evaluate, on two-hop lookup: under latent_only the oracle's judger reads the value keeper
    # (which read the pointer), oracle-flat's reads both, neither having read the other.
    cfg = _cfg(tmp_path, "task=lookup", "task.hops=2", "task.facts_per_agent=2", "task.partner=next",
               "rollout.retention=latent_only", "methods=[oracle,oracle-flat]")
    evaluate(cfg)
    records = read_results(tmp_path / "results.jsonl")
    for r in records:
        (pointer, value), _ = r["oracle_edges"]
        assert r["agents_run"] == 2
        if r["method"] == "oracle":
            assert r["judger_senders"] == [value] and r["config"]["graph"] == "oracle"
        else:
            assert sorted(r["judger_senders"]) == sorted([pointer, value]) and r["config"]["graph"] == "oracle-flat"
    assert {r["method"] for r in records} == {"oracle", "oracle-flat"} and len(records) == 6

"""hybrid and api_hint against a real OpenAI-compatible server (llama.cpp serving the embedded model);
the API-only baselines (`gcache.rollout.api_text_mas`) send what the local text method reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from servers import FaultServer, error, free_port, ok
from test_dashboards import _read_run

from gcache.agents import build_roster
from gcache.build import CONF_DIR, build_module
from gcache.evaluate import Evaluator
from gcache.llm.api import ApiError, ApiReply
from gcache.llm.local import LocalLM
from gcache.prompts import agent_messages, judger_messages
from gcache.rollout import RolloutConfig, RolloutEngine, api_text_mas, plan_rollouts
from gcache.tasks import build_task
from gcache.train import run

TINY = ["model=tiny-random", "task=arith", "logger=csv", "limit_train=2", "limit_val=2", "limit_test=2",
        "batch_size=2", "policy.graphs_per_question=2", "rollout.latent_steps=2", "rollout.max_new_tokens=4"]


def _cfg(mode: str, base_url: str, model: str, *extra: str, output_dir: str = "unused"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *TINY, f"mode={mode}", f"mode.api.base_url={base_url}", f"mode.api.model={model}",
            "mode.api.require_key=false", "mode.api.max_tokens=12", "mode.api.timeout_s=60", *extra,
        ])
    with open_dict(cfg):
        cfg.output_dir = output_dir
    return cfg


@pytest.fixture(scope="module")
def examples():
    return build_task("arith").splits()["val"][:2]


@pytest.mark.parametrize("mode", ["hybrid", "api_hint"])
def test_api_modes_return_the_api_models_answers(llama_server, examples, mode):
    tokens = "mode.hint_tokens=3" if mode == "api_hint" else "mode.draft_tokens=3"
    module = build_module(_cfg(mode, llama_server.base_url, llama_server.model, tokens))
    client = module.generator_mode.client
    before = client.usage.snapshot()  # the start-up check made one request already
    answers, rewards, rows = module.evaluate_batch(examples)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert client.usage.delta(before).requests == 2 and all(r in (0.0, 1.0) for r in rewards)
    # What the local judger decoded from its cache is in the request; the API's reply is the answer.
    local_outputs = [r.answer for r in rows.rollouts]
    requests = module.generator_mode.last_requests
    for request, local in zip(requests, local_outputs, strict=True):
        assert local in request[-1]["content"]
    assert module.rollout_config.max_new_tokens == 3
    assert all(r.decoded_tokens <= 3 for r in rows.rollouts)


def test_token_accounting_matches_the_servers_usage(llama_server, examples):
    module = build_module(_cfg("hybrid", llama_server.base_url, llama_server.model))
    client = module.generator_mode.client
    before = client.usage.snapshot()
    messages = module.generator_mode.requests([e.question for e in examples], ["draft one", "draft two"], "Reply.")
    replies = client.chat_many_sync(messages)
    delta = client.usage.delta(before)
    assert delta.prompt_tokens == sum(r.prompt_tokens for r in replies)
    assert delta.completion_tokens == sum(r.completion_tokens for r in replies)
    # The server counted the same prompt our tokenizer sees through the same chat template.
    for request, reply in zip(messages, replies, strict=True):
        ours = module.llm.count_tokens(module.llm.chat_text(request))
        assert abs(reply.prompt_tokens - ours) <= 2, (reply.prompt_tokens, ours)


def test_two_step_training_run_in_hybrid_mode(llama_server, tmp_path):
    summary = run(_cfg("hybrid", llama_server.base_url, llama_server.model, "run_test=false",
                       output_dir=str(tmp_path)))
    assert summary["steps"] == 1  # 2 questions, batch 2
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/api_requests" in metrics and "train/reward" in metrics


def test_the_fused_cache_changes_what_the_api_receives(examples):
    # Same questions, same graph: the judger reads its own fused cache or another question's.
    with FaultServer(model="fake") as server:
        module = build_module(_cfg("hybrid", server.base_url, "fake", "rollout.max_new_tokens=6"))
        checks = len(server.chat_requests())  # the start-up check
        module.evaluate_batch(examples)
        matched = [r.body["messages"] for r in server.chat_requests()][checks:]
        engine_cfg = module.rollout_config
        module.rollout_config = type(engine_cfg)(**{**engine_cfg.__dict__, "judger_cache": "mismatched"})
        module._engine = None
        module.evaluate_batch(examples)
        mismatched = [r.body["messages"] for r in server.chat_requests()][checks + len(matched):]
    assert len(matched) == len(mismatched) == 2
    for a, b in zip(matched, mismatched, strict=True):
        assert examples[0].question in a[-1]["content"] or examples[1].question in a[-1]["content"]
        assert a != b  # the draft decoded from the cache differs


def test_unreachable_endpoint_stops_before_training_and_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ApiError, match=url.replace(".", r"\.")):
        run(_cfg("hybrid", url, "any-model", output_dir=str(tmp_path)))
    assert not (tmp_path / "checkpoints").exists()


def test_api_mode_without_a_key_where_one_is_required(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FaultServer(model="fake") as server:
        cfg = _cfg("hybrid", server.base_url, "fake")
        with open_dict(cfg):
            cfg.mode.api.require_key = True
        with pytest.raises(ApiError, match="OPENAI_API_KEY"):
            build_module(cfg)
        assert server.chat_requests() == []


def test_local_mode_has_no_api_step(examples):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY)
    module = build_module(cfg)
    assert module.generator_mode is None
    answers, _, rows = module.evaluate_batch(examples)
    assert answers == [r.answer for r in rows.rollouts]
    assert torch.is_tensor(module.edge_logits([examples[0].question]))


def test_api_only_baselines_run_through_the_evaluator(llama_server, tmp_path):
    from gcache.evaluate import evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "model=tiny-random", "task=arith", "limit_test=2", "eval_batch_size=2", "mode=hybrid",
            f"mode.api.base_url={llama_server.base_url}", f"mode.api.model={llama_server.model}",
            "mode.api.require_key=false", "mode.api.max_tokens=8", "methods=[api_single,api_text_mas,single]",
            "mode.api.price_per_million_input=2", "mode.api.price_per_million_output=10",
        ])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    report = evaluate(cfg)["methods"]
    single, text = report["api_single"], report["api_text_mas"]
    assert single["questions"] == text["questions"] == 2
    # Four agents and a judger make five API calls per question against one for the single agent.
    assert text["prompt_tokens_per_question"] > 3 * single["prompt_tokens_per_question"]
    assert 0 < single["decoded_tokens_per_question"] <= 8
    # API tokens and USD per question and per correct answer, from each record's server-counted usage
    # (`single` under mode=hybrid: the local judger's draft, the API's final answer).
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    for method, stats in report.items():
        rows = [r for r in records if r["method"] == method]
        cost = sum(2 * r["api_prompt_tokens"] + 10 * r["api_completion_tokens"] for r in rows) / 1e6
        assert sum(r["api_cost_usd"] for r in rows) == pytest.approx(cost) and cost > 0
        assert stats["api_prompt_tokens_per_question"] == sum(r["api_prompt_tokens"] for r in rows) / 2
        assert stats["api_cost_usd_per_question"] == pytest.approx(cost / 2)
        correct = sum(r["reward"] > 0.5 for r in rows)
        assert stats["api_cost_usd_per_correct"] == (pytest.approx(cost / correct) if correct else None)
    assert text["api_prompt_tokens_per_question"] == text["prompt_tokens_per_question"]
    assert "| USD/q | USD/correct |" in (tmp_path / "report.md").read_text()


# ---- API-only baselines: the local text method's plan and prompts ------------------------------------

N = 4
KEEPER_QUESTIONS = ["What is the platform of the brown train?", "What is the code of the red door?"]
KEEPER_FACTS = [
    ("The code of the blue door is 540.", "The combination of the yellow locker is 635.",
     "The platform of the brown train is 612.", "The floor of the brown room is 342."),
    ("The code of the red door is 118.", "The combination of the red locker is 907.",
     "The platform of the green train is 455.", "The floor of the white room is 276."),
]


def _graph(edges, judger) -> torch.Tensor:
    """(N+1, N+1) from agent edges and the agents sending to the judger (node N)."""
    a = torch.zeros(N + 1, N + 1, dtype=torch.bool)
    for i, j in edges:
        a[i, j] = True
    for i in judger:
        a[i, N] = True
    return a


GRAPHS = {
    # Only the last agent reaches the judger directly: the judger reads it alone.
    "chain": _graph([(0, 1), (1, 2), (2, 3)], judger=[3]),
    "mesh": _graph([(i, j) for i in range(N) for j in range(N) if i < j], judger=range(N)),
    # Agent 3 reads agents 1 and 2, which are in different waves: 2 comes first (topological order).
    "skewed": _graph([(0, 1), (1, 3), (2, 3)], judger=range(N)),
    # Agent 2 reaches nobody: it is not run.
    "pruned": _graph([(0, 1), (2, 3)], judger=[1]),
}


class ScriptedClient:
    """Stands in for `gcache.llm.api.ApiClient`: records each `chat_many_sync` batch and answers with
    `reply(messages)`; usage: the prompt's and the reply's characters."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.batches: list[list[list[dict]]] = []

    def chat_many_sync(self, requests, **kwargs):
        self.batches.append([list(m) for m in requests])
        replies = []
        for messages in requests:
            text = self.reply(messages)
            replies.append(ApiReply(text, prompt_tokens=sum(len(m["content"]) for m in messages),
                                    completion_tokens=len(text), seconds=0.0, attempts=1))
        return replies


@pytest.fixture(scope="module")
def tiny_llm():
    return LocalLM.tiny_random(seed=0)


@torch.no_grad()
@pytest.mark.parametrize("name", list(GRAPHS))
def test_api_text_mas_sends_what_the_local_text_method_reads(tiny_llm, monkeypatch, name):
    roster = build_roster("keepers")
    adjacency = GRAPHS[name].expand(2, -1, -1)  # one row per question
    rendered: list[list[dict]] = []  # every prompt the local engine builds, in order
    chat_text = tiny_llm.chat_text
    monkeypatch.setattr(tiny_llm, "chat_text", lambda messages, **kw: rendered.append(messages) or chat_text(messages, **kw))
    config = RolloutConfig(method="text", agent_max_new_tokens=4, max_new_tokens=3)
    local = RolloutEngine(tiny_llm, roster, config).run(
        KEEPER_QUESTIONS, adjacency, [0, 1], answer_format="Reply with a number.", agent_facts=KEEPER_FACTS)

    # The API model answers each agent with the local agent's message: the same texts travel.
    agent_of = {role.prompt: i for i, role in enumerate(roster.roles)}

    def reply(messages):
        q = next(q for q, text in enumerate(KEEPER_QUESTIONS) if f"Question:\n{text}\n" in messages[1]["content"])
        agent = agent_of.get(messages[0]["content"])
        return f"answer {q}" if agent is None else local.rollouts[q].messages[agent]

    client = ScriptedClient(reply)
    results = api_text_mas(client, roster, KEEPER_QUESTIONS, adjacency, [0, 1], "Reply with a number.",
                           agent_facts=KEEPER_FACTS)
    # Exactly the local prompts, in the same order: one batch per level of the plan, then the judgers.
    plan = plan_rollouts(adjacency, [0, 1], reads="senders")
    assert [len(batch) for batch in client.batches] == [
        *[sum(node.level == level for node in plan.nodes) for level in range(plan.levels)], 2]
    assert [m for batch in client.batches for m in batch] == rendered
    for q, (result, rollout) in enumerate(zip(results, local.rollouts, strict=True)):
        assert result["answer"] == f"answer {q}"
        assert result["judger_senders"] == rollout.judger_senders
        # Usage: the row's agents' and judger's replies, summed.
        mine = [m for batch in client.batches for m in batch if KEEPER_QUESTIONS[q] in m[1]["content"]]
        assert len(mine) == rollout.agents_run + 1
        assert result["prompt_tokens"] == sum(len(x["content"]) for m in mine for x in m)
        assert result["completion_tokens"] == sum(len(reply(m)) for m in mine)


def test_api_single_sends_the_judger_alone():
    roster = build_roster("keepers")
    client = ScriptedClient(lambda messages: "612")
    results = api_text_mas(client, roster, KEEPER_QUESTIONS[:1], torch.zeros(1, N + 1, N + 1, dtype=torch.bool),
                           [0], "Fmt.", agent_facts=KEEPER_FACTS[:1])
    assert client.batches == [[judger_messages(roster.judger, KEEPER_QUESTIONS[0], "Fmt.", reads_others=False)]]
    assert results == [{"answer": "612", "prompt_tokens": sum(len(m["content"]) for m in client.batches[0][0]),
                        "completion_tokens": 3, "judger_senders": []}]
    with pytest.raises(ValueError, match=r"\(R, 5, 5\)"):
        api_text_mas(client, roster, KEEPER_QUESTIONS[:1], torch.zeros(1, N, N, dtype=torch.bool), [0], "Fmt.")


@pytest.mark.parametrize("method", ["api_text_mas", "api_single"])
def test_the_evaluators_api_baselines_send_the_text_methods_requests(examples, method):
    # Through a real HTTP client: on a chain every agent reads its predecessor's reply, the judger
    # reads all four; each row's usage is the sum of its requests' usage.
    with FaultServer(model="fake") as server:
        module = build_module(_cfg("hybrid", server.base_url, "fake"))
        checks = len(server.chat_requests())  # the start-up check
        records = Evaluator(module, baseline_topology="chain").run(method, examples)
        sent = [r.body["messages"] for r in server.chat_requests()][checks:]
    roster, answer_format = module.roster, module.task.answer_format
    n = roster.num_agents

    def echo(messages):  # what the fake server answers
        return f"echo: {messages[-1]['content']}"

    expected = []
    for ex in examples:
        received = []
        if method == "api_text_mas":
            for role in roster.roles:
                messages = agent_messages(role, ex.question, received=received[-1:])
                expected.append(messages)
                received.append((role.name, echo(messages)))
        expected.append(judger_messages(roster.judger, ex.question, answer_format, reads_others=bool(received),
                                        received=received))
    key = repr
    assert sorted(map(key, sent)) == sorted(map(key, expected))  # the levels' requests run concurrently
    calls = len(expected) // len(examples)
    for record in records:
        assert record["prompt_tokens"] == 11 * calls and record["decoded_tokens"] == 3 * calls  # ok()'s usage
        assert record["judger_senders"] == (list(range(n)) if method == "api_text_mas" else [])
        assert record["edges"] == (2 * n - 1 if method == "api_text_mas" else 0)  # chain + every agent -> judger
        assert record["answer"].startswith("echo: ")


def _hybrid_step(server, examples):
    module = build_module(_cfg("hybrid", server.base_url, "fake", "mode.api.max_retries=0"))
    logged = {}
    module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    module.log = lambda *args, **kwargs: None
    return module, module.training_step(examples, 0), logged


def test_one_failed_api_item_is_unscored_and_the_step_trains_on_the_others(examples):
    # The start-up check, then 4 answers (2 questions x 2 graphs), one of which fails for good.
    with FaultServer(model="fake").play(ok(), ok(), error(400, "bad request"), ok(), ok()) as server:
        module, loss, logged = _hybrid_step(server, examples)
    assert torch.isfinite(loss) and loss.requires_grad
    assert float(logged["train/api_failed_items"]) == 1.0
    assert float(logged["train/scorable_frac"]) == pytest.approx(0.75)  # the failed item left the baseline
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.ne(0).any()) for p in module.policy.parameters())


def test_every_api_item_failing_stops_with_the_api_error(examples):
    with FaultServer(model="fake").play(ok(), *[error(400, "bad request")] * 4) as server:
        with pytest.raises(ApiError, match="400|bad request"):
            _hybrid_step(server, examples)


# ---- the design card's command as a user runs it (issue 22) -----------------------------------------

def test_a_hybrid_run_keeps_the_console_quiet_and_reports_api_single_and_api_totals(llama_server, tmp_path):
    """`python -m gcache.train -m ... mode=hybrid` (a one-job sweep over the API model) against
    llama.cpp: no HTTP request lines, `api_single` beside the team with McNemar p and API costs, and
    API totals in summary.json that add up to the per-step usage and the server-counted records."""
    price_in, price_out = 1.5, 6.0
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gcache.train", "-m", "model=tiny-random", "task=arith", "limit_train=4",
         "limit_val=2", "limit_test=4", "batch_size=2", "val_every_n_steps=2", "policy.graphs_per_question=2",
         "rollout.latent_steps=2", "rollout.max_new_tokens=4", "logger=wandb", "mode=hybrid",
         f"mode.api.base_url={llama_server.base_url}", f"mode.api.model={llama_server.model}",
         "mode.api.require_key=false", "mode.api.max_tokens=8", f"mode.api.price_per_million_input={price_in}",
         f"mode.api.price_per_million_output={price_out}", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=job"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stderr + result.stdout  # logs, then the results
    assert "HTTP Request" not in console and "[httpx" not in console and "[openai" not in console, console
    assert "api_single" in console and "API model 'smollm2-135m-instruct'" in console, console
    out = tmp_path / "job"
    summary = json.loads((out / "summary.json").read_text())

    # api_single on the same questions: paired McNemar p, API tokens, USD per question and per correct.
    comparison = summary["comparison"]["methods"]
    assert list(comparison) == ["gcache", "single", "fixed-full", "api_single"]
    records = [json.loads(x) for x in (out / "comparison.jsonl").read_text().splitlines()]
    for method, entry in comparison.items():
        rows = ([json.loads(x) for x in (out / "test_predictions.jsonl").read_text().splitlines()]
                if method == "gcache" else [r for r in records if r["method"] == method])
        assert len(rows) == 4 and all(r["api_completion_tokens"] > 0 for r in rows), method
        cost = sum((r["api_prompt_tokens"] * price_in + r["api_completion_tokens"] * price_out) / 1e6 for r in rows)
        assert sum(r["api_cost_usd"] for r in rows) == pytest.approx(cost)
        assert entry["api_prompt_tokens_per_question"] == sum(r["api_prompt_tokens"] for r in rows) / 4
        assert entry["api_cost_usd_per_question"] == pytest.approx(cost / 4)
        correct = sum(r["reward"] > 0.5 for r in rows)
        assert entry["api_cost_usd_per_correct"] == (pytest.approx(cost / correct) if correct else None)
        if method != "gcache":
            assert 0.0 <= entry["mcnemar_p_vs_gcache"] <= 1.0
    single = [r for r in records if r["method"] == "api_single"]
    assert all(r["api_prompt_tokens"] == r["prompt_tokens"] for r in single)  # the API model alone

    # Run totals: the parts add up to the total (plus the start-up check), training to its steps.
    api = summary["api"]
    assert list(api) == ["train", "val", "test", "compare", "total"]
    assert summary["api_model"] == llama_server.model  # what a sweep over API models varies
    keys = ("requests", "prompt_tokens", "completion_tokens", "retries", "failed_items")
    parts = {k: sum(api[p][k] for p in ("train", "val", "test", "compare")) for k in keys}
    assert api["total"]["requests"] == parts["requests"] + 1 and api["total"]["failed_items"] == 0
    assert api["train"]["requests"] == 8  # 2 steps x 2 questions x 2 graphs
    # The records' tokens are the server's `usage` of each reply: the test and compare parts are their sums.
    # (comparison.jsonl opens with the trained policy's test predictions: part "test")
    for part, rows in (("test", [json.loads(x) for x in (out / "test_predictions.jsonl").read_text().splitlines()]),
                       ("compare", [r for r in records if r["method"] != "gcache"])):
        assert api[part]["prompt_tokens"] == sum(r["api_prompt_tokens"] for r in rows)
        assert api[part]["completion_tokens"] == sum(r["api_completion_tokens"] for r in rows)
        assert api[part]["cost_usd"] == pytest.approx(sum(r["api_cost_usd"] for r in rows))

    # W&B: each training step's usage sums to the train totals; the summary holds totals and comparison.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history, final = _read_run(run_dir)
    steps = [row for row in history if "train/api_requests" in row]
    assert len(steps) == 2
    for key, field in (("requests", "requests"), ("prompt_tokens", "prompt_tokens"),
                       ("completion_tokens", "completion_tokens"), ("retries", "retries"),
                       ("failures", "failed_items")):
        assert sum(row[f"train/api_{key}"] for row in steps) == api["train"][field], key
    assert sum(row["train/api_cost_usd"] for row in steps) == pytest.approx(api["train"]["cost_usd"])
    for part, fields in api.items():
        for key, value in fields.items():
            assert final[f"api/{part}/{key}"] == pytest.approx(value), (part, key)
    assert final["comparison"]["methods"]["api_single"] == comparison["api_single"]
    assert final["compare/api_single/mcnemar_p"] == comparison["api_single"]["mcnemar_p_vs_gcache"]
    assert final["compare/api_single/api_cost_usd_per_question"] == pytest.approx(
        comparison["api_single"]["api_cost_usd_per_question"])
    (table_file,) = (run_dir / "files" / "media" / "table" / "compare").glob("table_*.table.json")
    table = json.loads(table_file.read_text())
    assert "api_cost_usd_per_correct" in table["columns"] and [r[0] for r in table["data"]][-1] == "api_single"


def test_run_totals_count_retries_and_failed_items_and_say_so(examples, caplog):
    from gcache.train import api_totals, log_api_totals

    # The start-up check; then 4 answers of a training step: one 503 (retried), one 400 (fails for good).
    with FaultServer(model="fake").play(ok(), error(503), ok(), ok(), error(400, "bad request"), ok()) as server:
        module = build_module(_cfg("hybrid", server.base_url, "fake", "mode.api.max_retries=1"))
        logged = {}
        module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
        module.log = lambda *args, **kwargs: None
        with caplog.at_level("INFO"):
            module.training_step(examples, 0)
            api = api_totals(module)
            log_api_totals([], api, "fake")
    train = api["train"]
    assert (train["requests"], train["retries"], train["failed_items"]) == (3, 1, 1)
    assert train["cost_usd"] is None  # "fake" has no price
    assert api["total"]["requests"] == 4 and set(api) == {"train", "total"}
    assert train["prompt_tokens"] == float(logged["train/api_prompt_tokens"]) == 3 * 11
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("attempt 1 of 2" in m for m in warnings)  # the retry, as it happens
    assert any("1 of 4 API requests failed" in m for m in warnings)  # the failed item
    assert any("1 retries, 1 failed items" in m and "cost unknown" in m for m in warnings)  # the run's totals

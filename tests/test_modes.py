"""hybrid and api_hint against a real OpenAI-compatible server (llama.cpp serving the embedded model);
the API-only baselines (`gcache.rollout.api_text_mas`) send what the local text method reads."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from servers import FaultServer, error, free_port, ok

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
            "model=tiny-random", "task=arith", "limit=2", "batch_size=2", "mode=hybrid",
            f"mode.api.base_url={llama_server.base_url}", f"mode.api.model={llama_server.model}",
            "mode.api.require_key=false", "mode.api.max_tokens=8", "methods=[api_single,api_text_mas]",
        ])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    report = evaluate(cfg)["methods"]
    single, text = report["api_single"], report["api_text_mas"]
    assert single["questions"] == text["questions"] == 2
    # Four agents and a judger make five API calls per question against one for the single agent.
    assert text["prompt_tokens_per_question"] > 3 * single["prompt_tokens_per_question"]
    assert 0 < single["decoded_tokens_per_question"] <= 8


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

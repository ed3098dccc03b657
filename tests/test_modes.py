"""hybrid and api_hint against a real OpenAI-compatible server (llama.cpp serving the embedded model)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from servers import FaultServer, error, free_port, ok

from gcache.llm.api import ApiError
from gcache.tasks import build_task
from gcache.train import CONF_DIR, build_module, run

TINY = ["model=tiny-random", "task=arith", "logger=csv", "limit_train=2", "limit_val=2", "limit_test=2",
        "batch_size=2", "graphs_per_question=2", "latent_steps=2", "max_new_tokens=4"]


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
        module = build_module(_cfg("hybrid", server.base_url, "fake", "max_new_tokens=6"))
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

"""gcache.llm.api against a real llama.cpp server (embedded SmolLM2) and a fault-injecting fake."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid

import pytest
from servers import FaultServer, Scripted, error, free_port, hang, llama_cpp_server, ok, post_json  # noqa: E402

from gcache.llm.api import PRICES_PER_MILLION, ApiClient, ApiConfig, ApiError
from gcache.secrets import SecretFilter, redact


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def fast_config(base_url: str, **kw) -> ApiConfig:
    """Tiny backoff so fault tests take milliseconds unless a test asks for more."""
    defaults = dict(base_url=base_url, model="fake-model", require_key=False, timeout_s=5.0, max_retries=3,
                    backoff_base_s=0.001, backoff_max_s=0.05)
    return ApiConfig(**{**defaults, **kw})


@pytest.fixture
def make_client():
    clients: list[ApiClient] = []

    def make(config: ApiConfig) -> ApiClient:
        clients.append(ApiClient(config))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


# ---- the real server ----------------------------------------------------------------------------
def real_config(server, **kw) -> ApiConfig:
    return ApiConfig(base_url=server.base_url, model=server.model, require_key=False, max_tokens=8,
                     timeout_s=60.0, **kw)


def test_real_chat_returns_text(llama_server, make_client):
    client = make_client(real_config(llama_server))
    reply = client.chat_sync(user("What is the capital of France?"))
    assert reply.text.strip()
    assert reply.prompt_tokens > 0
    assert 1 <= reply.completion_tokens <= 8
    assert reply.attempts == 1


def test_real_chat_many_keeps_order_and_counts_the_servers_tokens(llama_server, make_client):
    client = make_client(real_config(llama_server, max_concurrency=2))
    # Prompts of strictly increasing length: the server's prompt_tokens reveal the reply order.
    prompts = [user("Say hi." + " Please" * (3 * i)) for i in range(4)]
    replies = client.chat_many_sync(prompts, max_tokens=4)

    assert len(replies) == 4
    assert all(r.text.strip() for r in replies)
    prompt_tokens = [r.prompt_tokens for r in replies]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 4
    totals = client.usage.snapshot()
    assert totals.requests == 4
    assert totals.prompt_tokens == sum(prompt_tokens)
    assert totals.completion_tokens == sum(r.completion_tokens for r in replies)
    # The counts are the server's own: ask it directly, without the SDK, for the last prompt.
    raw = post_json(f"{llama_server.base_url}/chat/completions",
                    {"model": llama_server.model, "messages": prompts[-1], "max_tokens": 1})
    assert raw["usage"]["prompt_tokens"] == replies[-1].prompt_tokens


def test_real_check_passes_and_names_a_model_the_server_lacks(llama_server, make_client):
    make_client(real_config(llama_server)).check_sync()
    with pytest.raises(ApiError) as caught:
        make_client(ApiConfig(base_url=llama_server.base_url, model="no-such-model", require_key=False)).check_sync()
    message = str(caught.value)
    assert "does not serve model 'no-such-model'" in message
    assert llama_server.base_url in message and llama_server.model in message


@pytest.mark.slow
def test_real_server_refuses_a_wrong_key(make_client):
    good, bad = f"sk-good-{uuid.uuid4().hex}", f"sk-bad-{uuid.uuid4().hex}"
    with llama_cpp_server(api_key=good) as server:
        make_client(ApiConfig(base_url=server.base_url, model=server.model, api_key=good, max_tokens=1)).check_sync()
        with pytest.raises(ApiError) as caught:
            make_client(ApiConfig(base_url=server.base_url, model=server.model, api_key=bad)).check_sync()
    message = str(caught.value)
    assert caught.value.status == 401
    assert server.base_url in message and "API key was refused" in message
    assert bad not in message


# ---- retries ------------------------------------------------------------------------------------
def test_429_then_success_honours_retry_after(fault_server, make_client):
    fault_server.play(error(429, retry_after="0.2"), ok())
    client = make_client(fast_config(fault_server.base_url, backoff_max_s=1.0))
    reply = client.chat_sync(user("hello"))
    first, second = fault_server.chat_requests()
    assert reply.attempts == 2 and reply.text == "echo: hello"
    # backoff_base_s is 1 ms: only the header can explain a 0.2 s gap.
    assert second.time - first.time >= 0.2
    assert client.usage.snapshot().retries == 1


def test_429_without_retry_after_backs_off_and_succeeds(fault_server, make_client):
    fault_server.play(error(429), error(429), ok())
    reply = make_client(fast_config(fault_server.base_url)).chat_sync(user("x"))
    assert reply.attempts == 3
    assert len(fault_server.chat_requests()) == 3


def test_retry_after_ms_is_honoured(fault_server, make_client):
    # OpenAI's own header, in milliseconds
    fault_server.play(Scripted(status=429, body={"error": {"message": "slow down"}}, headers={"retry-after-ms": "200"}))
    make_client(fast_config(fault_server.base_url, backoff_max_s=1.0)).chat_sync(user("x"))
    first, second = fault_server.chat_requests()
    assert second.time - first.time >= 0.2


def test_retry_after_is_capped(fault_server, make_client):
    fault_server.play(error(429, retry_after="30"), ok())
    start = time.monotonic()
    reply = make_client(fast_config(fault_server.base_url, backoff_max_s=0.1)).chat_sync(user("x"))
    assert reply.attempts == 2
    assert time.monotonic() - start < 3


def test_500_then_success_is_retried(fault_server, make_client):
    fault_server.play(error(500), ok())
    reply = make_client(fast_config(fault_server.base_url)).chat_sync(user("x"))
    assert reply.attempts == 2
    assert len(fault_server.chat_requests()) == 2


def test_persistent_5xx_gives_up_after_max_retries(fault_server, make_client):
    fault_server.play(*[error(503, "overloaded")] * 10)
    client = make_client(fast_config(fault_server.base_url, max_retries=2))
    with pytest.raises(ApiError) as caught:
        client.chat_sync(user("x"))
    assert caught.value.status == 503 and caught.value.attempts == 3
    assert "503 from " + fault_server.base_url in str(caught.value) and "overloaded" in str(caught.value)
    assert len(fault_server.chat_requests()) == 3
    totals = client.usage.snapshot()
    assert (totals.failures, totals.retries, totals.requests) == (1, 2, 0)


def test_hanging_server_times_out_with_bounded_attempts(fault_server, make_client):
    fault_server.play(hang(), hang(), hang())
    client = make_client(fast_config(fault_server.base_url, timeout_s=0.5, max_retries=1))
    start = time.monotonic()
    with pytest.raises(ApiError) as caught:
        client.chat_sync(user("x"))
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 4.0  # 2 x 0.5 s plus ms of backoff; generous for a loaded machine
    assert caught.value.attempts == 2
    assert "timeout from " + fault_server.base_url in str(caught.value)
    assert "timeout_s=0.5" in str(caught.value)
    assert len(fault_server.chat_requests()) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_other_4xx_are_not_retried(fault_server, make_client, status):
    fault_server.play(error(status, "scripted refusal"))
    client = make_client(fast_config(fault_server.base_url))
    with pytest.raises(ApiError) as caught:
        client.chat_sync(user("x"))
    assert caught.value.status == status and caught.value.attempts == 1
    assert len(fault_server.chat_requests()) == 1
    assert f"{status} from {fault_server.base_url} for model 'fake-model'" in str(caught.value)


def test_401_names_the_key(make_client):
    with FaultServer(api_key="the-right-key") as server:
        client = make_client(fast_config(server.base_url, api_key="a-wrong-key"))
        with pytest.raises(ApiError) as caught:
            client.chat_sync(user("x"))
        assert len(server.chat_requests()) == 1
    message = str(caught.value)
    assert "API key was refused" in message and "OPENAI_API_KEY" in message and server.base_url in message


# ---- check --------------------------------------------------------------------------------------
def test_check_on_connection_refused_names_the_url_and_fails_fast(make_client):
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = make_client(fast_config(url, max_retries=4, backoff_base_s=1.0, backoff_max_s=10.0))
    start = time.monotonic()
    with pytest.raises(ApiError) as caught:
        client.check_sync()
    assert caught.value.attempts == 1  # check's first request is not retried
    assert time.monotonic() - start < 3.0
    assert url in str(caught.value) and "cannot connect" in str(caught.value)


def test_check_without_a_key_fails_before_any_request(fault_server, make_client, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = make_client(ApiConfig(base_url=fault_server.base_url, model="fake-model", require_key=True))
    with pytest.raises(ApiError, match="no API key.*set OPENAI_API_KEY in the environment or a .env file"):
        client.check_sync()
    with pytest.raises(ApiError, match="no API key"):
        client.chat_sync(user("x"))
    assert fault_server.requests == []


def test_check_without_an_endpoint_says_what_to_set(make_client, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ApiError, match="no endpoint: set mode.api.base_url or OPENAI_BASE_URL"):
        make_client(ApiConfig(model="m", require_key=False)).check_sync()


def test_check_passes_and_uses_env_settings(fault_server, make_client, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fault_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    make_client(ApiConfig(model="fake-model")).check_sync()
    paths = [r.path for r in fault_server.requests]
    assert paths == ["/v1/models", "/v1/chat/completions"]
    assert all(r.headers["authorization"] == "Bearer sk-from-env" for r in fault_server.requests)


# ---- secrets ------------------------------------------------------------------------------------
def test_key_never_appears_in_config_logs_or_errors(make_client, caplog):
    key = f"sk-test-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's debug logs included
    with FaultServer(api_key=key) as server:
        config = fast_config(server.base_url, api_key=key, require_key=True)
        client = make_client(config)
        # A run that logs requests, retries and a final error; the server even echoes the key.
        server.play(error(429, retry_after="0"), error(500), ok(), error(400, f"Incorrect API key provided: {key}"))
        client.check_sync()
        with pytest.raises(ApiError) as caught:
            client.chat_sync(user("x"))
        assert server.requests[0].headers["authorization"] == f"Bearer {key}"  # the key was really used
    assert "429" in caplog.text and "500" in caplog.text  # the retries were logged
    for text in (repr(config), str(config), repr(client), str(config.public_dict()), str(caught.value), caplog.text):
        assert key not in text
    assert config.public_dict()["api_key"] == "***"
    assert config.api_key == key


def test_redact_and_secret_filter():
    assert redact("a SECRET and SECRET2", ["SECRET", "SECRET2", None, ""]) == "a *** and ***"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter(["hunter2-key"]))
    logger = logging.getLogger("gcache.test_secret_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("calling with key=%s", "hunter2-key")
        try:
            raise RuntimeError("refused key hunter2-key")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2-key" not in out
    assert "calling with key=***" in out and "refused key ***" in out


# ---- accounting ---------------------------------------------------------------------------------
def test_cost_is_tokens_times_price(fault_server, make_client):
    fault_server.play(ok(prompt_tokens=1000, completion_tokens=500))
    client = make_client(fast_config(fault_server.base_url, price_per_million_input=2.0, price_per_million_output=8.0))
    client.chat_sync(user("x"))
    assert client.usage.snapshot().cost_usd == pytest.approx(1000 * 2.0 / 1e6 + 500 * 8.0 / 1e6)


def test_cost_falls_back_to_the_price_table(make_client):
    with FaultServer(model="gpt-4o-mini") as server:
        server.play(ok(prompt_tokens=2000, completion_tokens=100), ok(prompt_tokens=2000, completion_tokens=100))
        table = make_client(fast_config(server.base_url, model="gpt-4o-mini"))
        table.chat_sync(user("x"))
        unknown = make_client(fast_config(server.base_url, model="some-local-model"))
        unknown.chat_sync(user("x"))
    price_in, price_out = PRICES_PER_MILLION["gpt-4o-mini"]
    assert table.usage.snapshot().cost_usd == pytest.approx((2000 * price_in + 100 * price_out) / 1e6)
    assert unknown.usage.snapshot().cost_usd == 0.0


def test_usage_delta_and_reset(fault_server, make_client):
    fault_server.play(ok(prompt_tokens=10, completion_tokens=1), error(500), ok(prompt_tokens=20, completion_tokens=2))
    client = make_client(fast_config(fault_server.base_url))
    client.chat_sync(user("a"))
    before = client.usage.snapshot()
    client.chat_sync(user("b"))
    step = client.usage.delta(before)
    assert (step.requests, step.prompt_tokens, step.completion_tokens, step.retries) == (1, 20, 2, 1)
    totals = client.usage.reset()
    assert (totals.requests, totals.prompt_tokens) == (2, 30)
    assert client.usage.snapshot().requests == 0


# ---- concurrency and event loops ----------------------------------------------------------------
def test_chat_many_bounds_concurrency_and_keeps_order(fault_server, make_client):
    fault_server.play(*[ok(delay_s=0.2)] * 6)
    client = make_client(fast_config(fault_server.base_url, max_concurrency=2))
    start = time.monotonic()
    replies = client.chat_many_sync([user(f"q{i}") for i in range(6)])
    assert [r.text for r in replies] == [f"echo: q{i}" for i in range(6)]
    assert fault_server.max_in_flight == 2
    assert time.monotonic() - start >= 0.55  # three waves of 0.2 s


def test_chat_many_stops_the_batch_at_the_first_final_error(fault_server, make_client):
    fault_server.play(error(401), *[ok(delay_s=0.1)] * 3)
    client = make_client(fast_config(fault_server.base_url, max_concurrency=1))
    with pytest.raises(ApiError, match="401"):
        client.chat_many_sync([user(f"q{i}") for i in range(4)])
    time.sleep(0.5)  # had the others not been cancelled, they would all arrive by now
    # The next queued call may take the freed slot before the cancellation lands; no more than that.
    assert len(fault_server.chat_requests()) <= 2


def test_sync_wrapper_works_inside_a_running_loop_and_async_across_loops(fault_server, make_client):
    client = make_client(fast_config(fault_server.base_url))

    async def from_async_code():
        # e.g. a notebook cell or a callback that runs inside an event loop
        return client.chat_many_sync([user("inside")])

    assert asyncio.run(from_async_code())[0].text == "echo: inside"
    # The async API from two successive event loops (each gets its own HTTP client).
    for i in range(2):
        assert asyncio.run(client.chat(user(f"loop{i}"))).text == f"echo: loop{i}"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"api.timeout_s=0 must be > 0"):
        ApiConfig(timeout_s=0)
    with pytest.raises(ValueError, match=r"api.max_retries=-1 must be >= 0"):
        ApiConfig(max_retries=-1)


def test_a_model_without_a_price_is_unpriced_and_a_ledger_splits_usage_into_parts(fault_server, make_client):
    from gcache.llm.api import UsageLedger

    assert ApiConfig(model="qwen-flash").priced("qwen-flash") and not ApiConfig().priced("local-model")
    assert ApiConfig(price_per_million_input=0.0, price_per_million_output=0.0).priced("local-model")
    fault_server.play(ok(prompt_tokens=10, completion_tokens=1), error(500), ok(prompt_tokens=20, completion_tokens=2),
                      error(400))
    client = make_client(fast_config(fault_server.base_url))
    ledger = UsageLedger(client.usage)
    with ledger.part("train"):
        client.chat_sync(user("a"))
    with ledger.part("val"):
        client.chat_sync(user("b"))
    with ledger.part("val"), pytest.raises(ApiError):
        client.chat_sync(user("c"))
    assert ledger.parts["train"].summary(priced=client.priced) == {
        "requests": 1, "prompt_tokens": 10, "completion_tokens": 1, "cost_usd": None, "retries": 0, "failed_items": 0}
    val = ledger.parts["val"]
    assert (val.requests, val.prompt_tokens, val.retries, val.failures) == (1, 20, 1, 1)
    assert ledger.parts["train"] + val == client.usage.snapshot()

"""Async client for any OpenAI-compatible chat endpoint (vLLM, DashScope, OpenAI, llama.cpp, ...).

    cfg = ApiConfig(base_url="http://127.0.0.1:8000/v1", model="qwen-flash", require_key=False)
    client = ApiClient(cfg)
    client.check_sync()                               # once, before training: fails fast
    before = client.usage.snapshot()
    replies = client.chat_many_sync([[{"role": "user", "content": "2+2?"}]])  # e.g. in training_step
    step = client.usage.delta(before)                 # requests, tokens, cost_usd, retries, failures
    client.close()

What it does:

- Retries. The SDK's own retries are off (`max_retries=0`), so this module's policy is the only
  one: exponential backoff with full jitter on 429, 408, 5xx, timeouts and connection errors;
  `Retry-After` / `retry-after-ms` is honoured when present, capped at `backoff_max_s`. Other 4xx
  are not retried. Every failure ends in an `ApiError` naming the URL, the model, the HTTP status
  and what to check.
- Timeouts. Each attempt is bounded by `timeout_s` (the SDK timeout plus `asyncio.wait_for` as a
  hard wall-clock limit, so a server that trickles bytes cannot stall it). A call therefore takes
  at most `timeout_s * (max_retries + 1) + max_retries * backoff_max_s`, plus any time it waits
  for a `max_concurrency` slot.
- Concurrency. `chat_many` runs requests concurrently, at most `max_concurrency` at a time per
  event loop, and returns the replies in input order.
- Sync use. `chat_many_sync` / `check_sync` run on a private event loop in a daemon helper thread
  owned by the client. The same path is used whether or not the calling thread already runs a
  loop (Jupyter, Lightning), so there is never a nested-loop error, and the HTTP connection pool
  survives from one training step to the next. After a fork the helper is recreated.
- Accounting. `ApiClient.usage` keeps running totals (requests, tokens from the server's `usage`,
  cost, retries, failures); `snapshot()` / `delta()` / `reset()` give per-step numbers, and a
  `UsageLedger` attributes them to parts of a run (train, val, test, ...). Cost is USD from the
  config's or `PRICES_PER_MILLION`'s prices; `ApiClient.priced` says whether the model has any.
- Secrets. The API key never appears in `repr(config)`, `config.public_dict()`, this module's log
  records or `ApiError` messages (via `redact` and `SecretFilter` from `gcache.secrets`, which
  also serve the app's own logs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from gcache.secrets import REDACTED, SecretFilter, redact

log = logging.getLogger(__name__)

T = TypeVar("T")

# USD per million tokens (input, output), used when the config sets no explicit price. Prices
# change: check current pricing, and set mode.api.price_per_million_input/output when it matters.
PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    # OpenAI, as published on 2024-07-18 (launch price); check current pricing.
    "gpt-4o-mini": (0.15, 0.60),
    # Alibaba Cloud Model Studio, international (Singapore) endpoint, lowest input-length tier,
    # non-thinking output, as published in 2025-09; check current pricing (the Beijing endpoint bills in CNY).
    "qwen-flash": (0.05, 0.40),
    "qwen-plus": (0.40, 1.20),
}

# Statuses worth another try: request timeout, rate limit, server errors.
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


# Every key an ApiClient uses is registered here, so this module's own records never carry one.
_SECRETS = SecretFilter()
log.addFilter(_SECRETS)


# ---- configuration ------------------------------------------------------------------------------
@dataclass(repr=False)
class ApiConfig:
    """Where and how to call an OpenAI-compatible endpoint.

    `base_url` and `api_key` fall back to `OPENAI_BASE_URL` / `OPENAI_API_KEY` when None. Local
    servers (vLLM, llama.cpp, `transformers serve`) usually need no key: set `require_key=False`.
    Prices of None mean "look the model up in PRICES_PER_MILLION, else 0".
    Never dump this with `dataclasses.asdict`: use `public_dict()`, which redacts the key.
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    require_key: bool = True
    timeout_s: float = 60.0  # per attempt
    max_retries: int = 4  # extra attempts after the first
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0  # also caps a server's Retry-After
    max_concurrency: int = 8
    max_tokens: int = 512
    temperature: float = 0.0
    price_per_million_input: float | None = None
    price_per_million_output: float | None = None

    def __post_init__(self) -> None:
        positive = {"timeout_s": self.timeout_s, "backoff_max_s": self.backoff_max_s,
                    "max_concurrency": self.max_concurrency, "max_tokens": self.max_tokens}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"api.{name}={value!r} must be > 0")
        non_negative = {"max_retries": self.max_retries, "backoff_base_s": self.backoff_base_s,
                        "temperature": self.temperature,
                        "price_per_million_input": self.price_per_million_input or 0,
                        "price_per_million_output": self.price_per_million_output or 0}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"api.{name}={value!r} must be >= 0")

    def resolved_base_url(self) -> str | None:
        url = self.base_url or os.environ.get("OPENAI_BASE_URL") or None
        return url.rstrip("/") if url else None

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("OPENAI_API_KEY") or None

    def priced(self, model: str | None) -> bool:
        """Whether `model` has a price (set in the config or in PRICES_PER_MILLION)."""
        explicit = self.price_per_million_input is not None and self.price_per_million_output is not None
        return explicit or (model or "") in PRICES_PER_MILLION

    def prices_for(self, model: str | None) -> tuple[float, float]:
        """USD per million (input, output) tokens for `model`."""
        table_in, table_out = PRICES_PER_MILLION.get(model or "", (0.0, 0.0))
        price_in = self.price_per_million_input
        price_out = self.price_per_million_output
        return (table_in if price_in is None else price_in, table_out if price_out is None else price_out)

    def public_dict(self) -> dict[str, Any]:
        """The fields, safe to log or dump: the key is replaced by `***` (None when no key is set)."""
        data = dataclasses.asdict(self)
        data["api_key"] = REDACTED if self.resolved_api_key() else None
        return data

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"ApiConfig({fields})"


# ---- results and errors -------------------------------------------------------------------------
@dataclass
class ApiReply:
    text: str
    prompt_tokens: int  # from the server's `usage` (0 if it sent none)
    completion_tokens: int
    seconds: float  # wall time of the whole call, retries and backoff included
    attempts: int
    finish_reason: str | None = None
    cost_usd: float = 0.0  # from the prices of `ApiConfig.prices_for` (0 for a model without one)


class ApiError(RuntimeError):
    """A call to the endpoint failed for good. The message says what to check."""

    def __init__(self, message: str, *, url: str | None = None, model: str | None = None,
                 status: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.url = url
        self.model = model
        self.status = status
        self.attempts = attempts


@dataclass(frozen=True)
class UsageTotals:
    requests: int = 0  # successful calls
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0  # attempts beyond the first, successful calls or not
    failures: int = 0  # calls that ended in ApiError

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return self._combine(other, 1)

    def __sub__(self, other: UsageTotals) -> UsageTotals:
        return self._combine(other, -1)

    def _combine(self, other: UsageTotals, sign: int) -> UsageTotals:
        names = [f.name for f in dataclasses.fields(self)]
        return UsageTotals(**{n: getattr(self, n) + sign * getattr(other, n) for n in names})

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def summary(self, *, priced: bool) -> dict[str, Any]:
        """For summaries: requests, tokens, cost (None without a price), retries, failed_items."""
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd if priced else None,
                "retries": self.retries, "failed_items": self.failures}


class Usage:
    """Thread-safe running totals of one client's calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = UsageTotals()

    def add(self, totals: UsageTotals) -> None:
        with self._lock:
            self._totals = self._totals + totals

    def snapshot(self) -> UsageTotals:
        with self._lock:
            return self._totals

    def delta(self, since: UsageTotals) -> UsageTotals:
        """What was used after the snapshot `since` was taken."""
        return self.snapshot() - since

    def reset(self) -> UsageTotals:
        """Zero the totals; return what they were."""
        with self._lock:
            totals, self._totals = self._totals, UsageTotals()
            return totals


class UsageLedger:
    """One `Usage` attributed to named parts of a run: `with ledger.part("train"): ...` adds what
    was used inside to `ledger.parts["train"]`."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self.parts: dict[str, UsageTotals] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        before = self.usage.snapshot()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, UsageTotals()) + self.usage.delta(before)


# ---- the client ---------------------------------------------------------------------------------
@dataclass
class _Failure:
    """One failed attempt, classified."""

    what: str  # e.g. "429 from http://host/v1 for model 'x'"
    hint: str
    status: int | None
    retryable: bool
    retry_after_s: float | None = None


@dataclass
class _LoopState:
    sdk: openai.AsyncOpenAI
    semaphore: asyncio.Semaphore


class _LoopThread:
    """A private event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gcache-api-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a *_sync method was called from inside the API client's own loop; await the async method"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: don't leave the call running
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class ApiClient:
    """Chat completions against one OpenAI-compatible endpoint, with retries and accounting.

    Constructing a client never touches the network or fails on missing settings; `check()` and
    the first call do. Close it with `close()` (or use it as a context manager).
    """

    def __init__(self, config: ApiConfig, *, usage: Usage | None = None) -> None:
        self.config = config
        self.base_url = config.resolved_base_url()
        self.model = config.model
        self.usage = usage if usage is not None else Usage()
        self._key = config.resolved_api_key()
        _SECRETS.add(self._key)
        # One SDK client per event loop: httpx connection pools cannot cross loops.
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]
        self._states = weakref.WeakKeyDictionary()
        self._runner: _LoopThread | None = None
        self._runner_lock = threading.Lock()
        self._warned_no_usage = False

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def priced(self) -> bool:
        """Whether this client's model has a price (else its cost is reported as None)."""
        return self.config.priced(self.model)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, model: str | None = None) -> float:
        """USD for these tokens of `model` (default: the client's), 0 without a price."""
        price_in, price_out = self.config.prices_for(model or self.model)
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6

    # ---- async API ------------------------------------------------------------------------------
    async def chat(self, messages: list[dict], **overrides: Any) -> ApiReply:
        """One chat completion. `overrides` go to `chat.completions.create` (max_tokens, stop, ...)."""
        params = {"model": self.model, "max_tokens": self.config.max_tokens,
                  "temperature": self.config.temperature, **overrides}
        model = params["model"]
        self._require_settings(model)
        state = self._state()
        start = time.monotonic()
        # The slot is kept while backing off, so a rate-limited endpoint is not hit harder.
        async with state.semaphore:
            attempt = 0
            while True:
                attempt += 1
                try:
                    completion = await asyncio.wait_for(
                        state.sdk.chat.completions.create(messages=messages, **params), self.config.timeout_s
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - classified below, re-raised as ApiError
                    failure = self._classify(exc, model)
                    if not failure.retryable or attempt > self.config.max_retries:
                        self.usage.add(UsageTotals(retries=attempt - 1, failures=1))
                        tries = f" after {attempt} attempts" if attempt > 1 else ""
                        raise ApiError(
                            redact(f"{failure.what}{tries}: {failure.hint}", [self._key]),
                            url=self.base_url, model=model, status=failure.status, attempts=attempt,
                        ) from exc
                    delay = self._backoff_s(attempt, failure.retry_after_s)
                    log.warning("%s (attempt %d of %d); retrying in %.2f s",
                                failure.what, attempt, self.config.max_retries + 1, delay)
                    await asyncio.sleep(delay)
        return self._reply(completion, model, attempt, time.monotonic() - start)

    async def chat_many(self, list_of_messages: list[list[dict]], *, per_item: bool = False,
                        **overrides: Any) -> list[ApiReply] | list[ApiReply | ApiError]:
        """`chat` for each conversation, at most `max_concurrency` at once; replies in input order.

        If one call fails for good, the others are cancelled and its ApiError is raised; with
        `per_item=True` every call runs to its end and a failed one's ApiError takes its place
        (other exceptions still propagate)."""
        tasks = [asyncio.ensure_future(self.chat(m, **overrides)) for m in list_of_messages]
        try:
            if not per_item:
                return list(await asyncio.gather(*tasks))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, ApiError):
                    raise result
            return list(results)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def check(self) -> None:
        """Fail fast, with a clear ApiError, if the endpoint cannot serve this config.

        Checks the settings (no network), then lists the models (one attempt, no retries: an
        unreachable server or a refused key fails at once) and asserts the model is among them when
        the server lists any, then sends a 1-token chat."""
        self._require_settings(self.model)
        state = self._state()
        try:
            page = await asyncio.wait_for(state.sdk.models.list(), self.config.timeout_s)
            served = [m.id for m in page.data]
        except Exception as exc:  # noqa: BLE001
            failure = self._classify(exc, self.model)
            if failure.status != 404:  # a server without /models is fine: the chat below decides
                self.usage.add(UsageTotals(failures=1))
                raise ApiError(redact(f"{failure.what}: {failure.hint}", [self._key]),
                               url=self.base_url, model=self.model, status=failure.status, attempts=1) from exc
            served = []
        if served and self.model not in served:
            shown = ", ".join(repr(m) for m in served[:10]) + (", ..." if len(served) > 10 else "")
            raise ApiError(
                f"{self.base_url} does not serve model {self.model!r}; it serves {shown}. "
                "Set api.model to one of these.",
                url=self.base_url, model=self.model,
            )
        reply = await self.chat([{"role": "user", "content": "Say OK."}], max_tokens=1)
        log.info("API endpoint %s serves model %r (check took %.2f s)", self.base_url, self.model, reply.seconds)

    async def aclose(self) -> None:
        """Close the HTTP client of the running loop."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.sdk.close()

    # ---- sync API -------------------------------------------------------------------------------
    def chat_sync(self, messages: list[dict], **overrides: Any) -> ApiReply:
        return self._run(self.chat(messages, **overrides))

    def chat_many_sync(self, list_of_messages: list[list[dict]], *, per_item: bool = False,
                       **overrides: Any) -> list[ApiReply] | list[ApiReply | ApiError]:
        """`chat_many` from synchronous code (e.g. a Lightning training_step); see the module doc."""
        return self._run(self.chat_many(list_of_messages, per_item=per_item, **overrides))

    def check_sync(self) -> None:
        self._run(self.check())

    def close(self) -> None:
        """Close the helper thread's HTTP client and stop the thread (if they were started)."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is not None and runner.pid == os.getpid():
            try:
                runner.run(self.aclose())
            finally:
                runner.stop()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- internals ------------------------------------------------------------------------------
    def _require_settings(self, model: str | None) -> None:
        """Raise, before any network traffic, when the config cannot work."""
        if not self.base_url:
            raise ApiError("no endpoint: set mode.api.base_url or OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ApiError(f"no model for {self.base_url}: set mode.api.model (e.g. qwen-flash)", url=self.base_url)
        if self.config.require_key and not self._key:
            raise ApiError(
                f"no API key for {self.base_url}: set OPENAI_API_KEY in the environment or a .env file "
                "(or mode.api.require_key=false for a local server that needs none)",
                url=self.base_url, model=self.model,
            )

    def _state(self) -> _LoopState:
        """The SDK client and semaphore of the running loop (httpx clients are bound to one loop)."""
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            sdk = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._key or "EMPTY",  # local servers ignore it; the SDK insists on one
                timeout=self.config.timeout_s,
                max_retries=0,  # our retry policy is the only one
            )
            state = _LoopState(sdk, asyncio.Semaphore(self.config.max_concurrency))
            self._states[loop] = state
        return state

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._runner_lock:
            if self._runner is None or self._runner.pid != os.getpid():
                self._runner = _LoopThread()
            runner = self._runner
        return runner.run(coro)

    def _reply(self, completion: Any, model: str, attempts: int, seconds: float) -> ApiReply:
        if not completion.choices:
            self.usage.add(UsageTotals(retries=attempts - 1, failures=1))
            raise ApiError(f"{self.base_url} returned no choices for model {model!r}",
                           url=self.base_url, model=model, attempts=attempts)
        choice = completion.choices[0]
        usage = completion.usage
        if usage is None and not self._warned_no_usage:
            self._warned_no_usage = True
            log.warning("%s sent no token usage for model %r; tokens and cost are counted as 0", self.base_url, model)
        prompt_tokens = int(usage.prompt_tokens or 0) if usage else 0
        completion_tokens = int(usage.completion_tokens or 0) if usage else 0
        cost = self.cost_usd(prompt_tokens, completion_tokens, model)
        self.usage.add(UsageTotals(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                   cost_usd=cost, retries=attempts - 1))
        log.debug("chat %s model %r: %d prompt + %d completion tokens in %.2f s (%d attempts)",
                  self.base_url, model, prompt_tokens, completion_tokens, seconds, attempts)
        return ApiReply(text=choice.message.content or "", prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens, seconds=seconds, attempts=attempts,
                        finish_reason=choice.finish_reason, cost_usd=cost)

    def _classify(self, exc: Exception, model: str | None) -> _Failure:
        url, cfg = self.base_url, self.config
        where = f"from {url} for model {model!r}"
        if isinstance(exc, (asyncio.TimeoutError, openai.APITimeoutError)):
            return _Failure(f"timeout {where}", f"no reply within api.timeout_s={cfg.timeout_s} s; "
                            "check that the server is healthy or raise api.timeout_s", None, True)
        if isinstance(exc, openai.APIConnectionError):
            return _Failure(f"connection error {where}", f"cannot connect ({_root_cause(exc)}); "
                            "check that the server is running and that mode.api.base_url is right", None, True)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            what = f"{status} {where}"
            detail = _server_message(exc)
            if status == 401:
                hint = "the API key was refused; set OPENAI_API_KEY to a valid key"
            elif status == 403:
                hint = f"access denied: the key may lack permission for this model ({detail})"
            elif status == 404:
                hint = (f"not found ({detail}); check that mode.api.base_url is the API root (usually ending "
                        "in /v1) and that the server serves this model")
            elif status == 429:
                hint = f"rate limited ({detail}); lower api.max_concurrency or raise api.max_retries"
            elif status >= 500:
                hint = f"server error ({detail}); the endpoint is failing, retry later"
            else:
                hint = f"the request was rejected ({detail}); check the model name and the request parameters"
            return _Failure(what, hint, status, status in RETRYABLE_STATUSES, _retry_after_s(exc.response.headers))
        return _Failure(f"unexpected {type(exc).__name__} {where}", str(exc), None, False)

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        cap = self.config.backoff_max_s
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), cap)
        return random.uniform(0.0, min(cap, self.config.backoff_base_s * 2 ** (attempt - 1)))


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, or `retry-after` (seconds or an HTTP date); None if absent."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's own error text, short."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message is None and isinstance(body, dict):
            message = body.get("detail") or body.get("message")
        if message:
            return str(message)[:300]
    return str(exc.message)[:300]


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__

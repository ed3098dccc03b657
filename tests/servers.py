"""OpenAI-compatible servers for tests: a real one (llama.cpp) and a fault-injecting fake.

- `llama_cpp_server()` starts `llama_cpp.server` on 127.0.0.1 and a free port, serving the
  embedded SmolLM2-135M-Instruct GGUF (about 1 s to start, ~60 tokens/s on 2 CPU cores), waits
  until `/v1/models` answers, and stops the process by its own PID (terminate, then kill).
- `FaultServer` is a stdlib HTTP server in a thread that speaks just enough of `/v1/models` and
  `/v1/chat/completions` to play a script: errors with or without `Retry-After`, hangs, slow or
  normal completions with a known `usage`. It records every request.

Fixtures `llama_server` (session-scoped: one server for the whole run) and `fault_server` wrap
them; a test module gets them with `pytest_plugins = ["servers"]` (registered once, however many
modules ask).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

# llama.cpp repacks weights into "extra buffer types" (AMX on recent Xeons) when it can; on this
# machine's AMX-capable CPUs that path segfaults in decode, and llama-cpp-python exposes no switch
# for it, so the server is started through this shim that turns `use_extra_bufts` off (plain CPU
# kernels: a little slower, same results).
_LLAMA_SERVER_SHIM = """
import faulthandler
import sys
import llama_cpp.llama_cpp as bindings
faulthandler.enable()
_default = bindings.llama_model_default_params
def _no_extra_buffers():
    params = _default()
    params.use_extra_bufts = False
    return params
bindings.llama_model_default_params = _no_extra_buffers
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str  # e.g. http://127.0.0.1:41234/v1
    model: str
    pid: int
    api_key: str | None
    log_path: Path
    startup_s: float


def post_json(url: str, body: dict, api_key: str | None = None, timeout_s: float = 60.0) -> dict:
    """POST `body` as JSON with the standard library (no SDK in the way); return the JSON reply."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def wait_until_serving(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float,
                       api_key: str | None = None) -> None:
    """Poll `GET {base_url}/models` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{base_url}/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server pid {proc.pid} exited with code {proc.returncode} before serving; "
                               f"log tail:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server pid {proc.pid} did not answer {base_url}/models within {timeout_s} s; "
                       f"log tail:\n{_tail(log_path)}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate `proc` (this exact PID), then kill it if it has not exited after `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
        proc.kill()
        proc.wait(timeout=timeout_s)


@contextmanager
def llama_cpp_server(model_path: str | Path | None = None, *, alias: str = "smollm2-135m-instruct",
                     api_key: str | None = None, n_ctx: int = 2048, n_threads: int = 1,
                     startup_timeout_s: float = 120.0) -> Iterator[RunningServer]:
    """Run `llama_cpp.server` on 127.0.0.1:<free port> serving `model_path` (default: the embedded
    SmolLM2 GGUF) under the name `alias`; stop it on exit.

    Tuned for a small shared CPU: one compute thread (an 8-token reply took ~0.2 s with 1 thread and
    ~0.5 s with 2 on 2 cores, where the server's HTTP loop and the tests need the other core), and
    idle OpenMP workers that sleep instead of spinning (spinning workers made an idle server slow
    everything else tenfold on a loaded machine). The first completion pays a one-off warm-up
    of ~1.5 s, so a 1-token request is sent before the server is handed out; `startup_s` includes it.
    """
    missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the llama.cpp server needs {missing}: pip install 'llama-cpp-python[server]'")
    if model_path is None:
        from gcache.llm.local import embedded_gguf_path

        model_path = embedded_gguf_path()
    port = free_port()
    base_url = f"http://{HOST}:{port}/v1"
    cmd = [sys.executable, "-c", _LLAMA_SERVER_SHIM, "--model", str(model_path), "--model_alias", alias,
           "--host", HOST, "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
           "--n_threads_batch", str(n_threads), "--verbose", "False"]
    if api_key:
        cmd += ["--api_key", api_key]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory(prefix="gcache-llama-server-") as log_dir:
        log_path = Path(log_dir) / "server.log"
        start = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env)
        try:
            wait_until_serving(base_url, proc, log_path, startup_timeout_s, api_key)
            warm_up = {"model": alias, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
            post_json(f"{base_url}/chat/completions", warm_up, api_key)
            startup_s = time.monotonic() - start
            log.info("llama.cpp server pid %d serves %s at %s (ready in %.1f s)", proc.pid, alias, base_url, startup_s)
            yield RunningServer(base_url, alias, proc.pid, api_key, log_path, startup_s)
        finally:
            stop_process(proc)


# ---- fault-injecting fake -----------------------------------------------------------------------
@dataclass
class Scripted:
    """One scripted answer to a chat request."""

    status: int = 200
    body: dict | None = None  # None + status 200: an echo completion
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (until the server stops)
    delay_s: float = 0.0  # answer after this long
    prompt_tokens: int = 11
    completion_tokens: int = 3


def ok(*, prompt_tokens: int = 11, completion_tokens: int = 3, delay_s: float = 0.0) -> Scripted:
    """A normal completion echoing the last user message, with this `usage`."""
    return Scripted(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, delay_s=delay_s)


def error(status: int, message: str = "scripted error", *, retry_after: str | None = None) -> Scripted:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return Scripted(status=status, body={"error": {"message": message, "type": "scripted", "code": status}},
                    headers=headers)


def hang() -> Scripted:
    return Scripted(hang=True)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict | None
    time: float  # time.monotonic() when it arrived


class FaultServer:
    """A fake OpenAI-compatible endpoint on 127.0.0.1 that answers chat requests from a script.

    Chat requests take the next scripted answer (`ok()` when the script is exhausted). With
    `api_key` set, any request without `Authorization: Bearer <api_key>` gets a 401, like a real
    server. `requests` records every request; `max_in_flight` the most chat requests served at once.
    """

    def __init__(self, *, model: str = "fake-model", api_key: str | None = None) -> None:
        self.model = model
        self.api_key = api_key
        self.script: deque[Scripted] = deque()
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.base_url = f"http://{HOST}:{self._httpd.server_address[1]}/v1"
        # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fault-server", daemon=True)

    def play(self, *answers: Scripted) -> FaultServer:
        self.script.extend(answers)
        return self

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # The stdlib server wants a handler class; this one hands every request to `_serve`.
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                log.debug("fault server: " + format, *args)

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                fault._serve(self, None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fault._serve(self, json.loads(raw) if raw else None)

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, body: dict | None) -> None:
        path = handler.path.split("?")[0]
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(RecordedRequest(handler.command, path, headers, body, time.monotonic()))
        if self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(handler, 401, {"error": {"message": "Incorrect API key provided", "code": 401}})
        if path.endswith("/models") and handler.command == "GET":
            return self._send(handler, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "test"}]})
        if not (path.endswith("/chat/completions") and handler.command == "POST"):
            return self._send(handler, 404, {"error": {"message": f"no route {handler.command} {path}"}})
        with self._lock:
            answer = self.script.popleft() if self.script else ok()
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if answer.hang:
                self._stopping.wait()
                return None
            if answer.delay_s:
                self._stopping.wait(answer.delay_s)
            if answer.status != 200 or answer.body is not None:
                return self._send(handler, answer.status, answer.body or {}, answer.headers)
            return self._send(handler, 200, self._completion(body or {}, answer))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _completion(self, request: dict, answer: Scripted) -> dict:
        users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
        return {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"echo: {users[-1] if users else ''}"}}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
        }

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: dict,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) first
            pass


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def llama_server() -> Iterator[RunningServer]:
    """The embedded model behind a real OpenAI-compatible server, started once per session."""
    with llama_cpp_server() as server:
        yield server


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

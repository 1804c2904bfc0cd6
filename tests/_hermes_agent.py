"""End-to-end harness: a real Hermes ``run_agent.AIAgent`` against a fake LLM on loopback.

The agent runs in a child process (``tests/_agent_runner.py``) because Hermes reads
``HERMES_HOME`` when ``run_agent``/``hermes_state`` are first imported; this module must
therefore never import them. The test process owns the fake OpenAI-compatible server
(:class:`FakeLLM`), so a test can watch requests and stall or release a turn while the
child is mid-flight.

Typical use::

    with FakeLLM() as llm:
        spec = AgentSpec(hermes_home=tmp_path / "home", llm_url=llm.base_url,
                         session_id="s1", turns=["[tools] hi", "bye"], mirror_url=url)
        result = run_agent(spec, tmp_path / "result.json")

Markers in a user message steer :class:`FakeLLM`: ``[tools]`` (two parallel
``read_file`` calls, then the answer), ``[compress]`` (the tool-call response reports
60,000 prompt tokens, so compression fires at ``model.context_length`` 64,000) and
``[hang]`` (the final-answer request blocks until :attr:`FakeLLM.release`) and
``[fail]`` (the final-answer request answers HTTP 500, every time: the turn fails
once Hermes' retries are spent).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

RUNNER = Path(__file__).with_name("_agent_runner.py")

TOOLS_MARKER = "[tools]"
COMPRESS_MARKER = "[compress]"
HANG_MARKER = "[hang]"
FAIL_MARKER = "[fail]"
# How Hermes' own auxiliary requests begin (agent/context_compressor.py and
# agent/background_review.py); they are answered without consulting the markers.
SUMMARY_PREFIX = "You are a summarization agent"
REVIEW_PREFIX = "Review the conversation above"
SUMMARY_TEXT = (
    "## Active Task\nNone\n\n## Completed Actions\n1. Read a.txt and b.txt (fake summary)"
)
TOOL_FILES = ("a.txt", "b.txt")  # created by the runner in the agent's TERMINAL_CWD
COMPRESS_PROMPT_TOKENS = 60_000
HANG_LIMIT = 60.0

RequestKind = Literal["chat", "compression", "review", "probe", "failed"]


def _text(content: Any) -> str:
    """The text of an OpenAI message ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class _Server(ThreadingHTTPServer):
    # Handler threads are daemons (the ThreadingHTTPServer default), so a request
    # still hanging when the test ends never blocks interpreter exit.
    llm: FakeLLM


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Answer the provider-detection probes Hermes sends before chatting."""
        self.server.llm.log({"kind": "probe", "path": self.path, "method": "GET"})
        # Only the OpenAI listing exists. A 200 on /api/v1/models (LM Studio),
        # /api/tags (Ollama), /props or /version (llama.cpp) would make Hermes
        # treat the server as that backend and change how it talks to it.
        if self.path.split("?", 1)[0].rstrip("/") == "/v1/models":
            model = {
                "id": "fake-model",
                "object": "model",
                "owned_by": "hermes-orm-tests",
                "context_length": 128_000,
            }
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        """Answer ``/v1/chat/completions`` (anything else is a 404 probe)."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.split("?", 1)[0].endswith("/chat/completions"):
            self.server.llm.log({"kind": "probe", "path": self.path, "method": "POST"})
            self._send_json(404, {"error": {"message": "not found"}})
            return
        body: dict[str, Any] = json.loads(raw or b"{}")
        payload = self.server.llm.complete(body, self.path)
        try:
            if payload is None:
                error = {"message": "the fake model fails", "type": "server_error"}
                self._send_json(500, {"error": error})
            elif body.get("stream"):
                self._send_sse(payload)
            else:
                self._send_json(200, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent process was killed while we were answering

    def _send_json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, payload: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in _sse_chunks(payload):
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        # No Content-Length: the end of the stream is the end of the connection.
        self.close_connection = True


def _sse_chunks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a complete ``chat.completion`` into OpenAI streaming chunks."""
    base = {"id": payload["id"], "created": payload["created"], "model": payload["model"]}
    base["object"] = "chat.completion.chunk"
    choice = payload["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        chunks.append(chunk({"content": message["content"]}))
    for index, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    chunks.append(chunk({}, choice["finish_reason"]))
    # stream_options.include_usage: a last chunk with no choices carries the usage.
    chunks.append({**base, "choices": [], "usage": payload["usage"]})
    return chunks


class FakeLLM:
    """A deterministic OpenAI-compatible chat server on 127.0.0.1, for one test.

    Replies depend only on the request: the last user message decides (see the
    module docstring for the markers), and ``Answer to: <user text>`` ends every
    turn. Tool-call ids are unique per response (a random per-server tag plus a
    counter), as with a real provider, so no two turns or runs share an id.

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1``, for :attr:`AgentSpec.llm_url`.
        requests: One dict per request received, in arrival order: ``kind``
            (``chat``, ``compression``, ``review`` or ``probe``) and ``path``, plus
            ``stream`` and ``reply`` (``tool_calls`` or ``text``) for completions.
        hung: Set when a ``[hang]`` turn's final-answer request has arrived.
        release: Set it to let a hanging request answer (also set on exit).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.hung = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(3)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the running server."""
        if self._server is None:
            raise RuntimeError("FakeLLM is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.llm = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release.set()  # never leave a handler thread parked on a hang
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def log(self, entry: dict[str, Any]) -> None:
        """Record one request (called from handler threads)."""
        with self._lock:
            self.requests.append(entry)

    def kinds(self) -> list[str]:
        """The ``kind`` of every request so far (probes included)."""
        with self._lock:
            return [r["kind"] for r in self.requests]

    def complete(self, body: dict[str, Any], path: str) -> dict[str, Any] | None:
        """The ``chat.completion`` answering ``body`` (may block on a ``[hang]`` turn).

        None: a ``[fail]`` turn's final answer, a server error.
        """
        messages: list[dict[str, Any]] = body.get("messages") or []
        last_user = max(
            (i for i, m in enumerate(messages) if m.get("role") == "user"), default=None
        )
        user_text = (
            _text(messages[last_user].get("content")).strip() if last_user is not None else ""
        )
        later = messages[last_user + 1 :] if last_user is not None else messages
        n = next(self._ids)
        kind: RequestKind = "chat"
        tool_calls: list[dict[str, Any]] | None = None
        prompt_tokens = 100
        if user_text.startswith(SUMMARY_PREFIX):
            kind = "compression"
            content = SUMMARY_TEXT
        elif user_text.startswith(REVIEW_PREFIX):
            kind = "review"
            content = "Nothing to save."
        elif TOOLS_MARKER in user_text and not any(m.get("role") == "tool" for m in later):
            content = ""
            tool_calls = [
                {
                    "id": f"call_{self._tag}{n:04d}{suffix}",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": json.dumps({"path": name})},
                }
                for suffix, name in zip("ab", TOOL_FILES, strict=True)
            ]
            if COMPRESS_MARKER in user_text:
                # Reported after the tool batch, this trips Hermes' post-response
                # should_compress() check against 0.75 * 64,000 tokens.
                prompt_tokens = COMPRESS_PROMPT_TOKENS
        elif FAIL_MARKER in user_text:
            self.log({"kind": "failed", "path": path, "stream": bool(body.get("stream"))})
            return None
        else:
            if HANG_MARKER in user_text:
                self.hung.set()
                self.release.wait(HANG_LIMIT)
            content = f"Answer to: {user_text}"
        self.log(
            {
                "kind": kind,
                "path": path,
                "stream": bool(body.get("stream")),
                "reply": "tool_calls" if tool_calls else "text",
            }
        )
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "id": f"chatcmpl-{self._tag}{n:04d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 20,
                "total_tokens": prompt_tokens + 20,
            },
        }


@dataclass
class AgentSpec:
    """What one agent process does; serialised to JSON for the runner.

    Attributes:
        hermes_home: The agent's ``HERMES_HOME`` (Hermes' own ``state.db`` lives there).
            The runner also uses ``<name>.work`` and ``<name>.tmp`` beside it.
        llm_url: The fake server's base URL (:attr:`FakeLLM.base_url`).
        session_id: The Hermes session id to start (or, with ``resume``, continue).
        turns: User messages, one ``run_conversation`` each.
        mirror_url: Exported to the child as ``HERMES_ORM_URL`` when given.
        mirror_admin_url: PostgreSQL only: a superuser URL used by ``mirror_down_turns``.
        plugin_enabled: Write ``plugins: {enabled: [hermes_orm]}`` into config.yaml.
        compression_in_place: ``compression.in_place``; None keeps Hermes' default (True).
        review: Background memory review after every turn (thread ``bg-review``).
        hermes_fault: ``{"turn": i, "when": "before"|"after", "target": T}``:
            ``SessionDB.append_message`` raises once for turn ``i``'s assistant row
            carrying the tool calls (T ``call``), its first tool-result row (``tool``)
            or its final assistant row (``final``), before or after committing it.
            With ``"times": n``, the first ``n`` appends of that row raise (each of
            Hermes' flushes that tries it again). With ``"locked": "turn"`` (or a
            number of seconds), a write failing before its commit leaves another
            connection holding the mirror database's write lock until the turn ends
            (or for those seconds).
        mirror_down_turns: Turn indices during which the mirror database is unavailable.
        mirror_down_at_exit: SQLite only: the mirror database is unavailable from
            the last turn on, until the process has exited (its lock goes with it).
        resume: Load the session's history from Hermes' SessionDB first, like
            ``hermes --resume``; a session rotated by compression continues at its tip.
        extra_config: Deep-merged into config.yaml last.
        close_persist: After the last turn, persist the live conversation once more,
            as Hermes' CLI does when it closes (``_persist_active_session_before_close``).
        gateway: Run the session as Hermes' gateway does: after the first turn, the
            ``session_meta`` row opening its transcript is appended, and every turn
            starts from the history loaded from the database, metadata rows left out.
        db_before_plugins: Open Hermes' SessionDB before the plugins load, as its
            TUI gateway does (store mode then copies the session, as the mirror does).
        undo_before_turns: Turn indices before which the last exchange is taken
            back as Hermes' CLI ``/undo`` does it (``HermesCLI.undo_last``).
        finalize: After the last turn, end the session as Hermes' CLI does at its
            exit (``on_session_finalize`` with this reason), before ``close()``.
    """

    hermes_home: Path
    llm_url: str
    session_id: str
    turns: list[str]
    mirror_url: str | None = None
    mirror_admin_url: str | None = None
    plugin_enabled: bool = True
    compression_in_place: bool | None = None
    review: bool = False
    hermes_fault: dict[str, Any] | None = None
    mirror_down_turns: list[int] = field(default_factory=list)
    mirror_down_at_exit: bool = False
    resume: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    close_persist: bool = False
    gateway: bool = False
    db_before_plugins: bool = False
    undo_before_turns: list[int] = field(default_factory=list)
    finalize: str | None = None

    def to_json(self) -> str:
        """The spec as JSON (paths as strings)."""
        data = asdict(self)
        data["hermes_home"] = str(self.hermes_home)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> AgentSpec:
        """Rebuild a spec written by :meth:`to_json`."""
        data = json.loads(text)
        data["hermes_home"] = Path(data["hermes_home"])
        return cls(**data)


def agent_log(out: Path) -> Path:
    """Where the child's stdout and stderr go for the result file ``out``."""
    return out.with_name(out.name + ".log")


def start_agent(spec: AgentSpec, out: Path) -> subprocess.Popen[bytes]:
    """Launch the runner for ``spec``; it writes its result to ``out`` after every turn.

    The child leads its own process group, so :func:`kill_agent` also reaches the
    shells Hermes' tools spawn.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a stale result must not pass for this run's
    spec_path = out.with_name(out.name + ".spec.json")
    spec_path.write_text(spec.to_json())
    cwd = spec.hermes_home.parent
    cwd.mkdir(parents=True, exist_ok=True)
    with agent_log(out).open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(RUNNER), str(spec_path), str(out)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def kill_agent(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and its process group (a crash: no cleanup, no atexit)."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def read_result(out: Path) -> dict[str, Any]:
    """The last result the runner wrote: after its last completed turn (``turns`` is
    empty if the agent was killed during the first one)."""
    result: dict[str, Any] = json.loads(Path(out).read_text())
    return result


def finish_agent(proc: subprocess.Popen[bytes], out: Path, timeout: float = 120) -> dict[str, Any]:
    """Wait for a child from :func:`start_agent` and return its result.

    Raises:
        RuntimeError: The child timed out (it is killed) or exited non-zero; the
            message ends with the tail of its output.
    """
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_agent(proc)
        raise RuntimeError(f"agent timed out after {timeout}s:\n{_tail(out)}") from None
    if code != 0:
        raise RuntimeError(f"agent exited with {code}:\n{_tail(out)}")
    return read_result(out)


def run_agent(spec: AgentSpec, out: Path, timeout: float = 120) -> dict[str, Any]:
    """Run ``spec`` to completion in a child process and return its result.

    The result is ``{"turns": [{"session_id", "messages", "seconds"}, ...],
    "sessions": [...], "faults": [...]}``: per completed turn the agent's session id
    after it, ``run_conversation``'s messages without ``_``-prefixed keys and its wall
    time; every session id the agent used, in order; the injected faults that fired.
    """
    return finish_agent(start_agent(spec, out), out, timeout)


def _tail(out: Path, lines: int = 40) -> str:
    path = agent_log(Path(out))
    if not path.exists():
        return "(no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

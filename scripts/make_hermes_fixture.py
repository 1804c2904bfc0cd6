"""Write the synthetic Hermes Agent state.db the tests and the benchmarks import.

    python scripts/make_hermes_fixture.py tests/fixtures/hermes-state.db

Every row is written by the installed hermes-agent (``hermes_state.SessionDB``
and its public methods), so the file has that release's schema (0.19: v22) and
its encodings: multimodal content JSON-prefixed, tool calls and reasoning
items as JSON, counters kept by Hermes. The conversations are synthetic, drawn
from a seeded generator, and every moment Hermes records is one chosen here:
two runs write the same rows.

The shape follows a real state.db: 40 sessions from several platforms, 877
messages (the benchmarks grow the file to about a million by cloning it),
tool calls (parallel ones too), reasoning in each provider's fields, CJK and
emoji, a few tool outputs over 20,000 characters, compression lineages,
a branch, archived (inactive) rows, per-model usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hermes_state
from hermes_state import SessionDB

SEED = 22
T0 = 1767603600.0  # 2026-01-05 09:00:00 UTC
MESSAGES = 877  # the benchmark sizes its clones on it: 877 x 1,141 = 1,000,657
TIP_ROOM = 20  # messages kept for the last session
MAX_TURN = 10  # the most messages a turn holds: a question, 2 rounds of 3 calls, the answer

Message = dict[str, Any]
Step = Callable[[SessionDB], Any]


@dataclass(frozen=True)
class Model:
    name: str
    provider: str
    base_url: str
    mode: str
    reasoning: str | None  # which fields its reasoning comes back in
    price: tuple[float, float]  # USD per million input, output tokens
    call_id: str  # how its tool call ids begin


MODELS = {
    "claude": Model(
        "anthropic/claude-sonnet-4", "openrouter", "https://openrouter.ai/api/v1",
        "official_models_api", "details", (3.0, 15.0), "toolu_01",
    ),
    "gpt5": Model(
        "gpt-5-codex", "openai-codex", "https://chatgpt.com/backend-api/codex",
        "subscription_included", "codex", (1.25, 10.0), "call_",
    ),
    "hermes": Model(
        "nous/hermes-4-405b", "nous", "https://inference-api.nousresearch.com/v1",
        "official_docs_snapshot", "think", (1.0, 3.0), "call_",
    ),
    "deepseek": Model(
        "deepseek/deepseek-r1", "openrouter", "https://openrouter.ai/api/v1",
        "official_models_api", "content", (0.55, 2.19), "call_",
    ),
    "kimi": Model(
        "moonshotai/kimi-k2", "openrouter", "https://openrouter.ai/api/v1",
        "official_models_api", None, (0.6, 2.5), "functions.",
    ),
}  # fmt: skip


@dataclass
class Spec:
    """One session: where it comes from, what it runs on, and what happens to it."""

    source: str
    model: str
    turns: int
    end: str | None = None  # its end_reason; None: still open
    title: str | None = None
    user: str | None = None
    lang: str = "en"
    parent: int | None = None  # index of the session it continues
    # "multimodal", "long", "compact", "rewind", "switch", "absolute", "aux",
    # "archive", "peer", "cwd", "handoff", "cooldown", "branch", "group"
    features: frozenset[str] = frozenset()


def spec(source: str, model: str, turns: int, *features: str, **kw: Any) -> Spec:
    return Spec(source, model, turns, features=frozenset(features), **kw)


TG, DC, SL, WA = "7318204455", "412975533018710016", "U07BQ3LK2M9", "4915112345678@s.whatsapp.net"
JA, ZH = "8041227930", "6627315018"

# In order of their start; a continuation follows its parent.
SPECS = [
    spec("cli", "claude", 7, "cwd", "aux", end="cli_close", title="Exactly-once flush design"),
    spec("telegram", "hermes", 6, "peer", "multimodal", end="idle_timeout", user=TG),
    spec("cli", "gpt5", 7, "cwd", "long", end="cli_close", title="Flaky retry test"),
    spec("discord", "kimi", 7, "peer", "group", end="session_reset", user=DC),
    spec("cron", "hermes", 3, end="cron_complete"),
    spec("telegram", "deepseek", 6, "peer", "absolute", user=ZH, lang="zh"),
    spec("cli", "claude", 8, "cwd", "compact", end="cli_close", title="Alembic 0007 review"),
    spec("slack", "gpt5", 6, "peer", "absolute", end="idle_timeout", user=SL),
    spec("cli", "deepseek", 7, "cwd", "rewind", end="tui_close"),
    spec("telegram", "hermes", 6, "peer", user=JA, lang="ja", title="セッションの検索 🔍"),
    spec("cron", "kimi", 3, end="cron_complete"),
    spec("discord", "claude", 7, "peer", end="branched", user=DC, title="Cursor rollback options"),
    spec("discord", "claude", 5, "peer", "branch", parent=11, end="idle_timeout", user=DC),
    spec("cli", "gpt5", 7, "cwd", "switch", end="cli_close", title="Postgres vs SQLite latency"),
    spec("whatsapp", "kimi", 4, "peer", "multimodal", end="idle_timeout", user=WA),
    spec("cli", "hermes", 6, "cwd", "handoff", end="new_session"),
    spec("telegram", "claude", 7, "peer", end="compression", user=TG, title="Nightly import"),
    spec("telegram", "claude", 6, "peer", "archive", parent=16, end="idle_timeout", user=TG),
    spec("cron", "deepseek", 3, end="cron_complete"),
    spec("cli", "claude", 6, "cwd", "long", end="cli_close", title="Reader process crash"),
    spec("discord", "hermes", 5, "peer", "group", "absolute", user=DC),
    spec("cli", "kimi", 6, "cwd", "multimodal", end="cli_close", title="Dashboard screenshot"),
    spec("telegram", "gpt5", 5, "peer", user=ZH, lang="zh", end="session_reset"),
    spec("cli", "claude", 6, "cwd", end="cli_close"),
    spec("cli", "hermes", 4, "cwd", end="cli_close", title="Background review"),
    spec("cli", "hermes", 5, parent=24, end="agent_close"),
    spec("slack", "deepseek", 5, "peer", user=SL, end="idle_timeout"),
    spec("cron", "gpt5", 3, "long", end="cron_complete"),
    spec("telegram", "kimi", 5, "peer", "absolute", user=JA, lang="ja"),
    spec("cli", "gpt5", 7, "cwd", "cooldown", end="compression", title="Search index upkeep"),
    spec("cli", "gpt5", 5, "cwd", parent=29, end="cli_close"),
    spec("discord", "deepseek", 6, "peer", "multimodal", user=DC, end="idle_timeout"),
    spec("cli", "claude", 5, "cwd", "switch", end="tui_close", title="Duplicates after a retry"),
    spec("cron", "claude", 3, end="cron_complete"),
    spec("telegram", "hermes", 5, "peer", user=TG, lang="mixed"),
    spec("whatsapp", "gpt5", 5, "peer", user=WA, end="idle_timeout"),
    spec("cli", "claude", 5, "cwd", end="tui_close"),
    spec("cli", "claude", 8, "cwd", "aux", end="compression", title="Cursor column migration"),
    spec("cli", "claude", 7, "cwd", parent=37, end="compression"),
    spec("cli", "claude", 0, "cwd", parent=38),  # the open tip: it gets the messages left
]  # fmt: skip

# -- words ---------------------------------------------------------------------------------

DBS = ["Postgres", "Postgres", "postgres", "SQLite", "sqlite", "PostgreSQL"]
THINGS = ["migration", "cursor", "session", "transcript", "flush", "message", "index", "lock"]
PATHS = [
    "app/db/session_store.py", "app/db/migrations/versions/0007_cursor.py", "tests/test_flush.py",
    "app/importer/reader.py", "app/search/fts.py", "alembic/env.py", "app/db/retry.py",
]  # fmt: skip

USER = [
    "Why does the {db} migration fail on the new {thing} column?",
    "Why does a session flush duplicate a message after a retry?",
    "The cursor skips the last flushed message on {db}. Why?",
    "How do I roll back a half-applied migration on {db}?",
    "Write a test that kills the writer mid-flush.",
    "Is it safe to retry the commit after a {db} serialization failure?",
    "Search the transcript for yesterday's rollback.",
    "Compare Postgres and SQLite flush latency at {n} messages.",
    "Please review the alembic migration in {path}.",
    "The nightly import stopped halfway. Can it resume from the cursor?",
    "What does 'database is locked' mean, should the agent retry?",
    "Rename the cursor column and keep a rollback path.",
    "Does the {thing} survive a crash before the cursor update?",
    "The search on {db} takes {n} ms on a big transcript.",
    "Add a retry around the flush, without a duplicate.",
    "Can {path} commit a partial transcript?",
    "Can the import run while Hermes writes the session?",
    "What changed in the {thing} handling since the migration?",
    "Why is the rollback slower on Postgres than on SQLite?",
    "Which alembic revision touches the cursor?",
]
PREFACE = [
    "Let me look at the migration first.",
    "Running the tests.",
    "Checking both backends.",
    "Searching for the retry path.",
    "First the {thing}, then {db}.",
    "Reading {path}.",
]
ANSWER = [
    "Messages and cursor commit together: a crash leaves a prefix.",
    "On {db} the retry is safe: the cursor check writes nothing twice.",
    "The alembic revision adds {thing} without a default; {db} rejects it.",
    "A rollback undoes the insert and the cursor together.",
    "Found the duplicate: the retry ran after the commit succeeded.",
    "The migration is reversible: downgrade restores the old cursor.",
    "Postgres holds the row lock until commit; a second writer waits.",
    "SQLite serialises writers; BEGIN IMMEDIATE takes the lock up front.",
    "Session {n} has every message once; the cursor matches the count.",
    "Exactly once: cursor and messages commit together or not at all.",
    "I changed {path}: the retry reads the cursor before it writes.",
    "A trigger updates the search index in the message's transaction.",
    "Both backends pass: {n} sessions, no duplicate, no gap.",
    "The import resumes from each session's cursor after a crash.",
    "That alembic migration needs a rollback test on Postgres and SQLite.",
    "The {thing} lock is held under a millisecond per flush on {db}.",
    "Keep the retry in the store: it knows whether the commit landed.",
    "Nothing in the transcript was lost; the last flush message was not committed yet.",
    "The agent's cursor is one turn ahead of the stored one.",
    "Run `alembic upgrade head` on a copy: the migration rewrites sessions.",
]
JA_USER = [
    "セッションの検索が遅いです。インデックスを確認してもらえますか？",
    "昨日のセッションで話したロールバックの件を検索してください。",
    "マイグレーションが途中で失敗しました 😢 どうすればいいですか？",
    "重複したメッセージを検索して削除したいです。",
]
JA_ANSWER = [
    "セッションの検索は全文検索インデックスを使うので、数ミリ秒で終わります。",
    "ロールバックすると、メッセージとカーソルが同時に元に戻ります ✅",
    "検索結果に重複はありません。カーソルはメッセージ数と一致しています。",
    "マイグレーションは再実行できます。まずバックアップを取ってください。",
]
ZH_USER = [
    "全文检索为什么找不到这个词？",
    "数据库迁移失败了，怎么回滚？",
    "帮我检索一下上周关于游标的对话 🙏",
    "会话太长了，能不能压缩一下？",
]
ZH_ANSWER = [
    "检索使用三元组索引，所以中文子串也能找到。",
    "回滚会同时撤销消息和游标，会话保持原样 👍",
    "迁移可以安全地重新执行，不会产生重复消息。",
    "我已经压缩了会话，之前的消息仍然保存在数据库里。",
]
CODE = [
    "def flush(self, session_id, messages):",
    "    with self.engine.begin() as conn:",
    "        cursor = self._cursor(conn, session_id)",
    "        conn.execute(insert(Message), rows[cursor:])",
    "    except OperationalError: retry(backoff)",
    "op.add_column('sessions', sa.Column('cursor'))",
    "op.drop_index('ix_messages_session')  # rollback",
    "if stored != expected: raise Duplicate(session_id)",
]
EMOJI = ["🚀", "✅", "🙂", "🔥", "👀", "🎉", "⚠️", "🐘", "🪶"]
TOOLS = ["terminal", "read_file", "search_files", "web_search", "patch", "session_search"]
RARE_TOOLS = ["execute_code", "memory", "todo", "delegate_task"]


def hermes(method: str, *args: Any, **kwargs: Any) -> Step:
    """A step: ``SessionDB.<method>(*args, **kwargs)``, its arguments bound now."""
    return lambda db: getattr(db, method)(*args, **kwargs)


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _b64(rng: random.Random, n: int) -> str:
    return base64.b64encode(rng.randbytes(n)).decode()


@dataclass
class Writer:
    """Plans every Hermes call at the moment it happens, then replays them in time order."""

    rng: random.Random
    steps: list[tuple[float, int, Step]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    histories: list[list[Message]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    titles: list[str | None] = field(default_factory=list)
    long_outputs: int = 0

    def at(self, when: float, step: Step) -> None:
        self.steps.append((when, len(self.steps), step))

    def fill(self, text: str) -> str:
        r = self.rng
        return text.format(
            db=r.choice(DBS), thing=r.choice(THINGS), path=r.choice(PATHS), n=r.randint(3, 20000)
        )

    def sentences(self, bank: list[str], k: int) -> str:
        text = " ".join(self.fill(s) for s in self.rng.sample(bank, k))
        return text + (" " + self.rng.choice(EMOJI) if self.rng.random() < 0.12 else "")

    # -- content ---------------------------------------------------------------------------

    def user_text(self, s: Spec) -> str:
        lang = s.lang if s.lang != "mixed" else self.rng.choice(["en", "ja", "zh"])
        if lang == "ja":
            return self.rng.choice(JA_USER)
        if lang == "zh":
            return self.rng.choice(ZH_USER)
        return self.sentences(USER, self.rng.choice([1, 1, 1, 2]))

    def answer_text(self, s: Spec) -> str:
        if s.lang == "ja" or (s.lang == "mixed" and self.rng.random() < 0.5):
            return self.rng.choice(JA_ANSWER) + " " + self.sentences(ANSWER, 1)
        if s.lang == "zh":
            return self.rng.choice(ZH_ANSWER) + " " + self.sentences(ANSWER, 1)
        text = self.sentences(ANSWER, self.rng.choice([1, 1, 2]))
        if self.rng.random() < 0.15:
            text += "\n\n```sql\nSELECT count(*) FROM messages WHERE session_id = ?;\n```"
        return text

    def reasoning(self, model: Model, content: str | None) -> Message:
        """The reasoning fields of an assistant message, as ``model``'s provider returns them."""
        if model.reasoning is None or self.rng.random() < 0.65:
            return {}
        thought = self.fill(self.rng.choice(ANSWER))
        if model.reasoning == "details":
            details = [
                {
                    "type": "reasoning.text",
                    "text": thought,
                    "signature": _b64(self.rng, 24),
                    "format": "anthropic-claude-v1",
                    "index": 0,
                }
            ]
            return {"reasoning": thought, "reasoning_details": details}
        if model.reasoning == "content":
            return {"reasoning": thought, "reasoning_content": thought}
        if model.reasoning == "codex":
            items = [
                {
                    "type": "reasoning",
                    "id": "rs_" + _hex(self.rng, 32),
                    "summary": [{"type": "summary_text", "text": thought}],
                    "encrypted_content": "gAAAAA" + _b64(self.rng, 30),
                }
            ]
            out: Message = {"reasoning": thought, "codex_reasoning_items": items}
            if content:
                out["codex_message_items"] = [
                    {
                        "type": "message",
                        "id": "msg_" + _hex(self.rng, 32),
                        "role": "assistant",
                        "status": "completed",
                        "phase": "final_answer",
                        "content": [{"type": "output_text", "text": content, "annotations": []}],
                    }
                ]
            return out
        return {"reasoning": thought}

    def call(self, model: Model, tool: str, index: int) -> Message:
        r = self.rng
        arguments: dict[str, Callable[[], dict[str, Any]]] = {
            "terminal": lambda: {
                "command": r.choice(
                    [
                        "pytest -q tests/test_flush.py -k retry",
                        "alembic history --verbose | head -40",
                        "psql -c 'SELECT count(*) FROM messages'",
                        "sqlite3 state.db 'PRAGMA integrity_check'",
                    ]
                )
            },
            "read_file": lambda: {"path": r.choice(PATHS)},
            "search_files": lambda: {"pattern": r.choice([*THINGS, "rollback", "retry"])},
            "web_search": lambda: {"query": self.fill("{db} {thing} migration rollback")},
            "patch": lambda: {
                "path": r.choice(PATHS),
                "old_string": "cursor = cursor + 1",
                "new_string": "cursor = stored + len(batch)",
            },
            "session_search": lambda: {"query": r.choice(["duplicate flush", "rollback", "検索"])},
            "execute_code": lambda: {"code": "print(sum(1 for _ in open('flush.log')))"},
            "memory": lambda: {"action": "add", "content": "prefers Postgres for production"},
            "todo": lambda: {"todos": [{"id": "1", "content": "migration test", "status": "done"}]},
            "delegate_task": lambda: {"goal": "run the rollback tests on both backends"},
            "vision_analyze": lambda: {"image_url": "screenshot.png", "question": "what fails?"},
        }
        args = arguments[tool]()
        if model.call_id == "functions.":  # Kimi numbers the calls of a message
            ident = f"functions.{tool}:{index}"
        else:
            ident = model.call_id + _hex(r, 22 if model.call_id == "toolu_01" else 24)
        entry: Message = {
            "id": ident,
            "type": "function",
            "function": {"name": tool, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        if model.reasoning == "codex":  # the Responses API's own ids ride along
            entry["call_id"] = ident
            entry["response_item_id"] = "fc_" + _hex(r, 32)
        return entry

    def tool_output(self, tool: str, long: bool) -> str:
        r = self.rng
        if long:  # a verbose test run: more than 20,000 characters
            self.long_outputs += 1
            lines = [
                f"tests/test_flush.py::test_retry_{i:04d}[{r.choice(['sqlite', 'postgres'])}] "
                + r.choice(["PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED"])
                + f" [{i * 100 // 330:3d}%]"
                for i in range(330)
            ]
            return json.dumps({"output": "\n".join(lines), "exit_code": 1, "error": None})
        outputs: dict[str, Callable[[], dict[str, Any]]] = {
            "terminal": lambda: {
                "output": f"{r.randint(1, 300)} passed, {r.randint(0, 3)} failed in "
                f"{r.uniform(0.5, 90):.2f}s",
                "exit_code": r.choice([0, 0, 1]),
                "error": None,
            },
            "read_file": lambda: {
                "content": "\n".join(
                    f"{n}|{line}" for n, line in enumerate(r.sample(CODE, r.randint(2, 4)), 40)
                ),
                "total_lines": r.randint(40, 900),
            },
            "search_files": lambda: {
                "total_count": 1,
                "matches": [
                    {"path": r.choice(PATHS), "line": r.randint(1, 400), "content": "retry()"}
                ],
            },
            "web_search": lambda: {
                "success": True,
                "data": {
                    "web": [
                        {
                            "title": self.fill("{db} {thing} docs"),
                            "url": f"https://example.org/docs/{r.randint(1, 99)}",
                            "description": self.fill(r.choice(ANSWER))[:80],
                        }
                    ]
                },
            },
            "patch": lambda: {"success": True, "diff": "-cursor = cursor + 1\n+cursor = stored"},
            "session_search": lambda: {
                "success": True,
                "results": [{"session_id": "20260105_0930", "snippet": "duplicate flush"}],
            },
            "execute_code": lambda: {"status": "success", "output": str(r.randint(1, 999))},
            "memory": lambda: {"success": True, "message": "Entry added"},
            "todo": lambda: {"todos": [{"id": "1", "status": "done"}], "summary": {"done": 1}},
            "delegate_task": lambda: {"results": [{"status": "completed", "summary": "ok"}]},
            "vision_analyze": lambda: {"success": True, "analysis": "a red error banner"},
        }
        out = outputs[tool]()
        return json.dumps(out, ensure_ascii=False)

    def turn(self, s: Spec, model: Model, t: float, long: bool = False) -> list[Message]:
        """A user message at ``t`` and what the agent did with it (a long test run if ``long``)."""
        r = self.rng
        content: Any = self.user_text(s)
        if "multimodal" in s.features and r.random() < 0.5:
            content = [
                {"type": "text", "text": content},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(r, 24)}},
            ]
        user: Message = {"role": "user", "content": content, "timestamp": t}
        if s.source not in ("cli", "cron"):
            user["platform_message_id"] = str(r.randint(10**5, 10**9))
        if "group" in s.features:
            user["observed"] = r.random() < 0.3
        if r.random() < 0.08:  # what went to the API: the message with recalled memory
            user["api_content"] = f"{content}\n\n<memory-context>prefers Postgres</memory-context>"
        out = [user]
        rounds = r.choice([0, 0, 0, 1, 1, 2]) if not long else 1
        for _ in range(rounds):
            t += r.uniform(2, 30)
            tools = [r.choice(TOOLS + RARE_TOOLS if r.random() < 0.2 else TOOLS)]
            if r.random() < 0.25:  # parallel calls
                tools += r.sample(TOOLS, r.choice([1, 2]))
            if "multimodal" in s.features and r.random() < 0.3:
                tools = ["vision_analyze"]
            if long:
                tools = ["terminal"]
            preface = self.fill(r.choice(PREFACE)) if r.random() < 0.4 else None
            calls = [self.call(model, tool, i) for i, tool in enumerate(tools)]
            out.append(
                {
                    "role": "assistant",
                    "content": preface,
                    "tool_calls": calls,
                    "finish_reason": "tool_calls",
                    "token_count": r.randint(40, 400),
                    "timestamp": t,
                    **self.reasoning(model, preface),
                }
            )
            for call in calls:
                t += r.uniform(0.2, 12)
                name = call["function"]["name"]
                result: Message = {
                    "role": "tool",
                    "content": self.tool_output(name, long),
                    "tool_call_id": call["id"],
                    "tool_name": name,
                    "timestamp": t,
                }
                if not long and r.random() < 0.03:
                    result["content"] = f"Error executing tool '{name}': timed out after 180.0s"
                    result["effect_disposition"] = "unknown"
                out.append(result)
        t += r.uniform(3, 40)
        answer = self.answer_text(s)
        finish = "length" if r.random() < 0.03 else "stop"
        out.append(
            {
                "role": "assistant",
                "content": answer,
                "finish_reason": finish,
                "token_count": len(answer) // 4 + r.randint(0, 200),
                "timestamp": t,
                **self.reasoning(model, answer),
            }
        )
        for m in out:
            m["timestamp"] = round(m["timestamp"], 3)
        return out

    # -- sessions --------------------------------------------------------------------------

    def session(self, s: Spec, start: float, room: int, exact: bool) -> None:
        """Plan a session from ``start`` of at most ``room`` messages (``exact``: of so many)."""
        r = self.rng
        model = MODELS[s.model]
        stamp = datetime.fromtimestamp(start, UTC).strftime("%Y%m%d_%H%M%S")
        sid = f"cron_{_hex(r, 8)}_{stamp}" if s.source == "cron" else f"{stamp}_{_hex(r, 6)}"
        parent = self.ids[s.parent] if s.parent is not None else None
        self.ids.append(sid)
        self.create(sid, s, model, start, parent)

        t = start + r.uniform(1, 20)
        messages: list[Message] = []
        if s.parent is not None and "branch" in s.features:  # /branch copies the history
            copied = self.histories[s.parent]
        elif s.parent is not None:  # a continuation opens with a summary, then the last turn
            summary = "[CONTEXT COMPACTION] Earlier turns were compacted. "
            copied = [{"role": "user", "content": summary + self.sentences(ANSWER, 3)}]
            copied += self.histories[s.parent][-2:]
        else:
            copied = []
        messages += [{**m, "timestamp": round(t + i * 0.001, 3)} for i, m in enumerate(copied)]
        usage = Usage(self, sid, model, "absolute" in s.features)
        usage.context = sum(len(str(m.get("content"))) // 4 for m in messages)

        def play(got: list[Message]) -> float:
            messages.extend(got)
            usage.add(got)
            return float(got[-1]["timestamp"])

        def fits() -> bool:  # another turn (and the compaction's) in the room left
            return room - len(messages) >= MAX_TURN * (2 if "compact" in s.features else 1) + 2

        half = max(s.turns // 2, 1) if s.turns else 0
        for i in range(half):
            if fits():
                long = "long" in s.features and i == 0
                t = play(self.turn(s, model, t + r.uniform(20, 900), long))
        if "switch" in s.features:  # /model halfway: what follows is the new model's usage
            model = usage.model = MODELS["kimi" if s.model != "kimi" else "claude"]
            self.at(t + 1, hermes("update_session_model", sid, model.name))
            route = {"provider": model.provider, "base_url": model.base_url}
            self.at(
                t + 1, hermes("update_session_billing_route", sid, **route, billing_mode=model.mode)
            )
        if "rewind" in s.features:  # /rewind to the last user message: its turn goes inactive
            target = max(i for i, m in enumerate(messages) if m["role"] == "user")
            self.at(t + 5, lambda db: db.rewind_to_message(sid, self.row_id(db, sid, target)))
        for _ in range(s.turns - half):
            if fits():
                t = play(self.turn(s, model, t + r.uniform(20, 900)))
        if exact:
            while fits():
                t = play(self.turn(s, model, t + r.uniform(20, 900)))
            while room - len(messages) >= 2:  # plain exchanges for the last few
                t = play(self.exchange(s, t + r.uniform(20, 300)))
            if room > len(messages):  # and the open session waits for an answer
                t += r.uniform(20, 300)
                messages.append({"role": "user", "content": self.user_text(s), "timestamp": t})
        for m in messages:
            self.at(m["timestamp"], hermes("append_message", sid, **m))
        if "compact" in s.features:  # in-place: the history stays on disk, inactive
            t += r.uniform(10, 60)
            compacted: list[Message] = [
                {"role": "user", "content": "[CONTEXT COMPACTION] " + self.sentences(ANSWER, 3)},
                {"role": "assistant", "content": "Understood, continuing from the summary."},
            ]
            compacted = [{**m, "timestamp": t + i * 0.5} for i, m in enumerate(compacted)]
            self.at(t, hermes("archive_and_compact", sid, compacted))
            messages += compacted
            more = self.turn(s, model, t + r.uniform(30, 300))
            for m in more:
                self.at(m["timestamp"], hermes("append_message", sid, **m))
            t = play(more)
        self.histories.append(messages)
        self.counts.append(len(messages))
        self.after(sid, s, start, messages, t)

    def create(self, sid: str, s: Spec, model: Model, start: float, parent: str | None) -> None:
        r = self.rng
        config: dict[str, Any] = {"max_tokens": 8192, "temperature": r.choice([0.2, 0.7, 1.0])}
        if "branch" in s.features:
            config["_branched_from"] = parent
        kwargs = {
            "model": model.name,
            "model_config": config,
            "system_prompt": (
                "You are Hermes Agent, an intelligent AI assistant created by Nous Research. "
                f"Platform: {s.source}. Model: {model.name}. Provider: {model.provider}. "
                f"Conversation started: {datetime.fromtimestamp(start, UTC):%A, %B %d, %Y}."
            ),
            "user_id": s.user,
            "parent_session_id": parent,
            "profile_name": "ops" if s.source == "cron" else None,
        }
        self.at(start, hermes("create_session", sid, s.source, **kwargs))
        if "cwd" in s.features:
            branch = r.choice(["main", "main", "feat/pg-cursor", "fix/retry-duplicate"])
            repo = "/home/dev/src/ledger"
            self.at(start, hermes("update_session_cwd", sid, repo, branch, repo))
        if "peer" in s.features:  # the gateway's routing for the chat it came from
            kind = "group" if "group" in s.features else "dm"
            chat = s.user if kind == "dm" else f"-100{r.randint(10**9, 10**10)}"
            thread = str(r.randint(10**17, 10**18)) if s.source == "discord" else None
            origin = {"platform": s.source, "chat_id": chat, "chat_type": kind, "user_id": s.user}
            peer = {
                "source": s.source,
                "user_id": s.user,
                "session_key": f"agent:main:{s.source}:{kind}:{chat}",
                "chat_id": chat,
                "chat_type": kind,
                "thread_id": thread,
                "display_name": f"{s.source} {kind} {chat}",
                "origin_json": json.dumps(origin),
            }
            self.at(start, hermes("record_gateway_session_peer", sid, **peer))

    def exchange(self, s: Spec, t: float) -> list[Message]:
        """A question and its answer, nothing else."""
        answer = {
            "role": "assistant",
            "content": self.answer_text(s),
            "finish_reason": "stop",
            "token_count": self.rng.randint(20, 300),
            "timestamp": t + self.rng.uniform(3, 30),
        }
        return [{"role": "user", "content": self.user_text(s), "timestamp": t}, answer]

    def after(self, sid: str, s: Spec, start: float, messages: list[Message], t: float) -> None:
        """Title, auxiliary usage, handoff, cooldown, end and archive of a planned session."""
        r = self.rng
        title = s.title
        lineage = s.parent is not None and SPECS[s.parent].end == "compression"
        root = self.titles[s.parent] if lineage and s.parent is not None else None
        if title:
            self.at(messages[1]["timestamp"] + 1, hermes("set_session_title", sid, title))
        elif root:  # a continuation is titled "<title> #N", as Hermes does it
            self.at(
                start + 0.5,
                lambda db: db.set_session_title(sid, db.get_next_title_in_lineage(root)),
            )
        self.titles.append(title or root)
        if "aux" in s.features:
            task = "compression" if s.end == "compression" else "title_generation"
            aux = {
                "model": "google/gemini-2.5-flash",
                "billing_provider": "openrouter",
                "billing_base_url": "https://openrouter.ai/api/v1",
                "input_tokens": 1800 + r.randint(0, 900),
                "output_tokens": r.randint(12, 400),
                "estimated_cost_usd": 0.000643,
            }
            self.at(t, hermes("record_auxiliary_usage", sid, task, **aux))
        if "handoff" in s.features:
            self.at(t + 2, hermes("request_handoff", sid, "telegram"))
            self.at(t + 3, hermes("fail_handoff", sid, "telegram: no home channel configured"))
        if "cooldown" in s.features:
            error = "summary model returned 429 Too Many Requests"
            self.at(t, hermes("record_compression_failure_cooldown", sid, t + 600, error))
            self.at(t, hermes("set_compression_fallback_streak", sid, 2))
        end = t + (r.uniform(3600, 7200) if s.end == "idle_timeout" else r.uniform(5, 120))
        if s.end:
            self.at(end, hermes("end_session", sid, s.end))
            if s.end == "idle_timeout":
                self.at(end, hermes("set_expiry_finalized", sid))
        if "archive" in s.features:  # archives the whole compression lineage
            self.at(end + 60, hermes("set_session_archived", sid, True))
        self.ends.append(end if s.end else t)

    @staticmethod
    def row_id(db: SessionDB, sid: str, index: int) -> int:
        return int(db.get_messages(sid, include_inactive=True)[index]["id"])

    def build(self) -> None:
        start = T0
        for k, s in enumerate(SPECS):
            if s.parent is not None:  # a continuation starts when its parent ends
                start = self.ends[s.parent] + 0.5
            else:
                start += self.rng.uniform(1.5, 9) * 3600
            # Sessions end early if need be: the open tip, last, fills what is left.
            last = k == len(SPECS) - 1
            room = MESSAGES - sum(self.counts) - (0 if last else TIP_ROOM)
            self.session(s, round(start, 3), room, exact=last)


@dataclass
class Usage:
    """Token accounting per API call, as the agent loop reports it (the gateway: running totals)."""

    w: Writer
    sid: str
    model: Model
    absolute: bool
    context: int = 0
    totals: dict[str, Any] = field(default_factory=dict)

    def add(self, messages: list[Message]) -> None:
        for m in messages:
            self.context += len(str(m.get("content"))) // 4 + 20
            if m["role"] == "assistant":
                self.w.at(m["timestamp"], self.call(m.get("token_count") or 50))

    def call(self, output: int) -> Step:
        r, model = self.w.rng, self.model
        prompt = 2400 + self.context + r.randint(0, 300)
        cached = prompt * 8 // 10 if model.provider in ("openrouter", "openai-codex") else 0
        delta: dict[str, Any] = {
            "input_tokens": prompt - cached,
            "output_tokens": output,
            "cache_read_tokens": cached,
            "reasoning_tokens": output // 3 if model.reasoning else 0,
            "estimated_cost_usd": round(
                (prompt * model.price[0] + output * model.price[1]) / 1e6, 6
            ),
            "api_call_count": 1,
        }
        if self.absolute:
            for key, value in delta.items():
                self.totals[key] = self.totals.get(key, 0) + value
            delta = {
                **self.totals,
                "estimated_cost_usd": round(self.totals["estimated_cost_usd"], 6),
            }
        route = {
            "model": model.name,
            "billing_provider": model.provider,
            "billing_base_url": model.base_url,
            "billing_mode": model.mode,
            "cost_status": "estimated",
            "cost_source": "official_docs_snapshot",
            "pricing_version": "2026-01",
            "absolute": self.absolute,
        }
        return hermes("update_token_counts", self.sid, **route, **delta)


class _Clock:
    """Stands in for ``time`` inside hermes_state: ``time()`` is the moment being replayed.

    Hermes stamps ``started_at``, ``ended_at`` and the usage rows' ``first_seen``
    and ``last_seen`` with ``time.time()``; under this clock they are the planned
    moments, so two runs write the same rows (``tests/test_fixture.py`` checks it).
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:  # sleep, monotonic: the real ones
        return getattr(time, name)


TABLES = ("sessions", "messages", "session_model_usage")


def write(out: Path) -> None:
    """Write the fixture to ``out`` (replacing it)."""
    for path in (out, out.with_name(out.name + "-wal"), out.with_name(out.name + "-shm")):
        path.unlink(missing_ok=True)
    plan = Writer(random.Random(SEED))
    plan.build()
    clock = _Clock(T0)
    real = hermes_state.time
    hermes_state.time = clock
    try:
        db = SessionDB(db_path=out)
        for when, _, step in sorted(plan.steps, key=lambda s: s[:2]):
            clock.now = when
            step(db)
        db.vacuum()  # merges the FTS segments first
        db.close()
    finally:
        hermes_state.time = real
    conn = sqlite3.connect(out)
    shape = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES]
    conn.close()
    print(f"{out}: " + ", ".join(f"{n} {t}" for n, t in zip(shape, TABLES, strict=True)))
    print(f"{out.stat().st_size:,} bytes, {plan.long_outputs} tool outputs over 20,000 characters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("out", type=Path, help="the state.db to write (replaced if it exists)")
    write(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

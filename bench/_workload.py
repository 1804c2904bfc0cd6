"""The agent workload every flush benchmark runs: turns of user, assistant+tool call, tool."""

from __future__ import annotations

import random
from typing import Any

_WORDS = (
    "session", "flush", "cursor", "commit", "sqlite", "postgres", "alembic", "migration",
    "index", "transcript", "message", "tool", "result", "agent", "gateway", "retry", "lock",
    "exactly", "once", "prefix", "digest",
)  # fmt: skip


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def turn(session: int, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """One turn: a user message, an assistant tool call, and the tool's result."""
    call = f"call_{session}_{n}"
    stamp = 1_760_000_000.0 + n
    return [
        {"role": "user", "content": _text(rng, 25), "timestamp": stamp},
        {
            "role": "assistant",
            "content": _text(rng, 12),
            "tool_calls": [
                {
                    "id": call,
                    "type": "function",
                    "function": {"name": "terminal", "arguments": f'{{"cmd": "{_text(rng, 4)}"}}'},
                }
            ],
            "finish_reason": "tool_calls",
            "reasoning": _text(rng, 30),
            "timestamp": stamp + 0.5,
        },
        {
            "role": "tool",
            "content": _text(rng, 120),
            "tool_call_id": call,
            "tool_name": "terminal",
            "timestamp": stamp + 0.7,
        },
    ]


def conversations(sessions: int, turns: int, seed: int = 7) -> list[list[list[dict[str, Any]]]]:
    """``[session][turn] -> the 3 messages of that turn``, deterministic."""
    rng = random.Random(seed)
    return [[turn(s, t, rng) for t in range(turns)] for s in range(sessions)]


def history(length: int, seed: int = 11) -> list[dict[str, Any]]:
    """A conversation of ``length`` messages (whole turns, trimmed)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    n = 0
    while len(out) < length:
        out.extend(turn(0, n, rng))
        n += 1
    return out[:length]

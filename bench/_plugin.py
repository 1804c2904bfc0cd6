"""What the Hermes plugin adds to a turn: its hook against a bare flush of the same turn."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hermes_orm
from bench._workload import conversations, history
from hermes_orm.integrations.hermes.mirror import Mirror, StatusFile, conversation
from hermes_orm.integrations.hermes.plugin import make_hooks


def _hermes_list(length: int) -> list[dict[str, Any]]:
    """A conversation as Hermes keeps it: every saved message stamped in place."""
    return [{**m, "_db_persisted": True} for m in history(length)]


def _rotations(names: list[str], rounds: int) -> Iterator[list[str]]:
    for r in range(rounds):
        yield names[r % len(names) :] + names[: r % len(names)]


def plugin_cost(copy: Any, lengths: tuple[int, ...], turns: int) -> dict[int, tuple[float, float]]:
    """Per length: median seconds of the plugin's hook for a turn, and of a bare flush of it.

    ``copy()`` gives the URL of a fresh migrated SQLite database. Both sides
    start from a session of ``length`` messages already stored, then take the
    same turns (user, assistant with a tool call, tool result) in rotating
    order. The hook is ``post_llm_call`` as Hermes calls it, with Hermes' live
    list; the bare side flushes the cleaned list with ``SessionStore.flush``.
    """
    extra = conversations(1, turns, seed=99)[0]
    hooks: dict[int, Any] = {}
    mirrors: list[Mirror] = []
    stores: dict[int, hermes_orm.SessionStore] = {}
    lists: dict[int, list[dict[str, Any]]] = {}
    bare: dict[int, list[dict[str, Any]]] = {}
    for length in lengths:
        mirror = Mirror(copy(), status=StatusFile(Path(copy()).with_suffix(".json")), wait=60)
        mirrors.append(mirror)
        hooks[length] = make_hooks(mirror)["post_llm_call"]
        lists[length] = _hermes_list(length)
        hooks[length](session_id="s", conversation_history=lists[length], model="m")
        store = stores[length] = hermes_orm.SessionStore(copy())
        store.create_session("s", source="bench")
        bare[length] = conversation(lists[length])
        store.flush("s", bare[length])
    samples: dict[str, list[float]] = {}
    sides = [f"{kind}:{length}" for length in lengths for kind in ("hook", "flush")]
    for turn, order in zip(extra, _rotations(sides, len(extra)), strict=True):
        for side in order:
            kind, length = side.split(":")
            n = int(length)
            if kind == "hook":
                lists[n].extend({**m, "_db_persisted": True} for m in turn)
                start = time.perf_counter()
                hooks[n](session_id="s", conversation_history=lists[n], model="m")
            else:
                bare[n].extend(conversation(turn))
                start = time.perf_counter()
                stores[n].flush("s", bare[n])
            samples.setdefault(side, []).append(time.perf_counter() - start)
    for mirror in mirrors:
        mirror.close()
    for store in stores.values():
        store.close()
    return {
        n: (statistics.median(samples[f"hook:{n}"]), statistics.median(samples[f"flush:{n}"]))
        for n in lengths
    }

"""Contention: several processes flushing the same sessions at once.

Every writer process (:func:`reliability._child.writer`) flushes the same
deterministic conversations, each at its own pace and length: a writer ahead
of the others writes the next turn, writers level with it race to write the
same one, and lagging writers (a shorter list, or one a few turns short on
purpose) must write nothing. ``DatabaseBusyError`` is a documented outcome
under heavy contention (the writer tries again later) and is counted; any
other error is a failure. Besides the check of every session, the messages
the writers say they wrote must add up to the messages stored: each written
exactly once.
"""

from __future__ import annotations

import random
import time

from reliability._common import (
    Database,
    Outcome,
    Reader,
    check,
    finish_writer,
    prepare,
    session_id,
    spawn,
)


def start_delay(processes: int) -> float:
    """Seconds writers get to start (imports, first connection) before they all begin."""
    return 1.0 + 0.3 * processes


def run(
    db: Database,
    *,
    processes: int,
    seconds: float,
    sessions: int = 3,
    cap_turns: int = 60,
    seed: int = 0,
) -> Outcome:
    """Run ``processes`` writers of the same sessions for ``seconds``; check the database.

    Args:
        db: A fresh database.
        processes: Writer processes.
        seconds: How long they all flush.
        sessions: Sessions flushed at once; each grows to ``cap_turns`` turns,
            after which the writers move on to a new session in its place
            (created by whichever writer gets there first).
        cap_turns: Turns of a session before it is replaced.
        seed: Seeds the writers' paces and choices.
    """
    outcome = Outcome("contention", db.backend)
    started = time.perf_counter()
    rng = random.Random(seed)
    prepare(db.url, [session_id(slot) for slot in range(sessions)])
    start_at = time.time() + start_delay(processes)
    writers = []
    for p in range(processes):
        args = {
            "url": db.url,
            "seed": seed * 100_003 + p,
            "slots": sessions,
            "cap_turns": cap_turns,
            "start_at": start_at,
            "until": start_at + seconds,
            # Writer 0 as fast as it goes, the others each at a pace of its own.
            "pace": 0.0 if p == 0 else rng.uniform(0.0005, 0.01),
            "grow": 1.0 if p == 0 else rng.uniform(0.3, 1.0),
            "lag": 0.0 if p == 0 else rng.uniform(0.0, 0.3),
            "recover": False,
        }
        process, stderr = spawn("writer", args)
        reader = Reader(process)
        reader.start()
        writers.append((process, stderr, reader))
    acked: dict[str, int] = {}
    written = idle = 0
    for n, (process, stderr, reader) in enumerate(writers):
        lines, summary = finish_writer(
            process,
            stderr,
            reader,
            name=f"writer {n}",
            timeout=max(0.0, start_at - time.time()) + seconds + 120,
            outcome=outcome,
            acked=acked,
            expected=("DatabaseBusyError",),
        )
        idle += sum(1 for line in lines if line.startswith("A ") and line.split(" ")[3] == "0")
        if summary is not None:
            written += summary["written"]
    outcome.work = {"processes": processes, "seconds": round(seconds)}
    check(db.url, acked, outcome)
    outcome.notes["flushes that wrote nothing (lagging, or beaten to it)"] = f"{idle:,}"
    outcome.notes["messages written (sum over writers)"] = f"{written:,}"
    if written != outcome.stored:
        outcome.problem(f"writers wrote {written} messages in all, {outcome.stored} are stored")
    outcome.seconds = time.perf_counter() - started
    return outcome

"""SIGKILL at random moments: a writer process killed again and again, mid-flush or not.

A writer process (:func:`reliability._child.kill_writer`) flushes a few
sessions a turn at a time and reports each acknowledged cursor the moment
``flush`` returns. The parent kills it with SIGKILL at a random moment, 0 to
``max_delay`` seconds after its first acknowledgement (every other kill is
aimed: after that delay, at a random point of the next flush call, which the
writer announces as it begins), and starts a new one, which reads each
cursor from the database and goes on. At the end every session must hold
exactly its conversation's first ``flushed_idx`` messages, whole turns only,
and at least every message ever acknowledged.
"""

from __future__ import annotations

import random
import signal
import time

from reliability._common import (
    Database,
    Lines,
    Outcome,
    check,
    note_acks,
    note_error,
    prepare,
    session_id,
    spawn,
    stderr_tail,
)

#: Seconds a writer may take to acknowledge its first flush (start-up included).
_STALL = 60.0


def run(
    db: Database,
    *,
    kills: int,
    sessions: int = 4,
    cap: int = 400,
    max_delay: float = 0.2,
    seed: int = 0,
) -> Outcome:
    """Kill ``kills`` writer processes of ``db``; check the database afterwards.

    Args:
        db: A fresh database.
        kills: Writers to kill (each one after its first acknowledged flush).
        sessions: Sessions each writer flushes, round-robin.
        cap: Messages a session grows to before writers move on to a new one.
        max_delay: A writer is killed 0 to this many seconds after its first
            acknowledgement (uniformly).
        seed: Seeds the delays and the writers.
    """
    outcome = Outcome("kill", db.backend)
    started = time.perf_counter()
    rng = random.Random(seed)
    prepare(db.url, [session_id(slot) for slot in range(sessions)])
    acked: dict[str, int] = {}
    in_flush = aimed_kills = 0
    for n in range(kills):
        args = {"url": db.url, "slots": sessions, "cap": cap, "seed": seed * 100_003 + n}
        process, stderr = spawn("kill", args)
        lines = Lines(process)
        aimed = n % 2 == 1
        aimed_kills += aimed
        got, first_ack = _until_the_moment(lines, rng, max_delay, aimed)
        died = process.poll()
        process.send_signal(signal.SIGKILL)
        process.wait()
        while not lines.eof:  # what it wrote before it died, up to its last whole line
            got += lines.read(1.0)
        lines.close()
        if died is not None:
            outcome.problem(f"writer {n} ended by itself ({died}): {stderr_tail(stderr)}")
        elif first_ack is None:
            outcome.problem(f"writer {n} acknowledged nothing in {_STALL:.0f}s (hung)")
        stderr.close()
        outcome.flushes += note_acks(got, acked)
        for line in got:
            if line.startswith("E "):
                note_error(line, outcome, expected=())
        calls = [line for line in got if line[:2] in ("F ", "A ", "E ")]
        if calls and calls[-1].startswith("F "):
            in_flush += 1
    outcome.work = {
        "kills": kills,
        "kills at a random moment": kills - aimed_kills,
        "kills aimed into a flush": aimed_kills,
        "kills that landed inside a flush call": in_flush,
    }
    check(db.url, acked, outcome)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _until_the_moment(
    lines: Lines, rng: random.Random, max_delay: float, aimed: bool
) -> tuple[list[str], float | None]:
    """Read the writer's lines until the moment to kill it; the lines and its first ack's time.

    The moment is 0 to ``max_delay`` seconds after its first acknowledgement;
    ``aimed``: then, once the next flush begins, 0 to the median time of its
    flushes so far (so the kill lands inside a flush call, anywhere in it).
    """
    got: list[str] = []
    first_ack: float | None = None
    deadline = time.monotonic() + _STALL
    while time.monotonic() < deadline and not lines.eof:
        got += lines.read(min(0.05, max(0.0, deadline - time.monotonic())))
        if first_ack is None and any(line.startswith("A ") for line in got):
            first_ack = time.monotonic()
            deadline = first_ack + rng.uniform(0, max_delay)
    if not aimed or first_ack is None:
        return got, first_ack
    micros = sorted(int(line.split(" ")[4]) for line in got if line.startswith("A "))
    seen = len(got)
    give_up = time.monotonic() + 5
    while not lines.eof and time.monotonic() < give_up:
        got += lines.read(0.05)
        if any(line.startswith("F ") for line in got[seen:]):
            time.sleep(rng.uniform(0, micros[len(micros) // 2] / 1e6))
            break
    return got, first_ack

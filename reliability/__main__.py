"""Run the reliability suite.

    python -m reliability                    # full run; writes docs/reliability.md
    python -m reliability --quick            # small counts, nothing written (CI)
    python -m reliability --only kill,disk   # some scenarios (repeatable), nothing written

Scenarios: kill, contention, connections (PostgreSQL), disk (SQLite), inputs;
each runs on SQLite and PostgreSQL unless marked. PostgreSQL is a throwaway
server started here (``HERMES_ORM_TEST_PG_URL`` names another one instead,
except for the connections scenario, which restarts a server of its own).
The run exits non-zero when a message was duplicated or lost, an untyped
error reached a caller, or any other check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from devtools.postgres import local_postgres, postgres_server
from reliability import connections, contention, disk, inputs, kill
from reliability._common import ROOT, Outcome, postgres_database, sqlite_database

DOCS = ROOT / "docs"
SCENARIOS = ("kill", "contention", "connections", "disk", "inputs")
#: Server settings of the PostgreSQL runs: a commit is in the WAL before it is acknowledged.
PG_SETTINGS = {"synchronous_commit": "on"}


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does."""

    kills: int
    contention_seconds: float
    contention_sqlite: int
    contention_postgresql: int
    terminations: int
    disk_episodes: int
    inputs: int


FULL = Sizes(
    kills=200,
    contention_seconds=60,
    contention_sqlite=8,
    contention_postgresql=16,
    terminations=100,
    disk_episodes=50,
    inputs=5000,
)
QUICK = Sizes(
    kills=6,
    contention_seconds=3,
    contention_sqlite=3,
    contention_postgresql=4,
    terminations=10,
    disk_episodes=3,
    inputs=300,
)


class Servers:
    """The PostgreSQL server of the run, started when first needed."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._url: str | None = None
        self.version = "not run"

    def url(self) -> str:
        """The server's URL (started now, if it is not yet)."""
        if self._url is None:
            self._url = self._stack.enter_context(postgres_server(PG_SETTINGS))
            self.version = server_version(self._url)
        return self._url


def server_version(url: str) -> str:
    """``SHOW server_version`` of the server at ``url``."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW server_version").scalar_one())
    finally:
        engine.dispose()


def run(
    sizes: Sizes,
    only: tuple[str, ...],
    progress: Callable[[str], None],
    done: Callable[[Outcome], None],
    seed: int = 0,
) -> str:
    """Run the scenarios ``only`` names, in the usual order; the PostgreSQL version.

    ``progress`` hears of each scenario as it starts; ``done`` gets its outcome.
    """
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        servers = Servers(stack)
        if "kill" in only:
            progress("kill on sqlite")
            done(kill.run(sqlite_database(work, "kill"), kills=sizes.kills, seed=seed))
            progress("kill on postgresql")
            with postgres_database(servers.url(), "kill") as db:
                done(kill.run(db, kills=sizes.kills, seed=seed))
        if "contention" in only:
            seconds = sizes.contention_seconds
            progress("contention on sqlite")
            db = sqlite_database(work, "contention")
            done(contention.run(db, processes=sizes.contention_sqlite, seconds=seconds, seed=seed))
            progress("contention on postgresql")
            with postgres_database(servers.url(), "contention") as db:
                processes = sizes.contention_postgresql
                done(contention.run(db, processes=processes, seconds=seconds, seed=seed))
        if "connections" in only:
            progress("connections on postgresql (a server of its own)")
            with local_postgres(PG_SETTINGS) as server:
                if servers.version == "not run":
                    servers.version = server_version(server.url)
                done(connections.run(server, terminations=sizes.terminations, seed=seed))
        if "disk" in only:
            progress("disk on sqlite")
            disk_dir = work / "disk"
            disk_dir.mkdir()
            done(disk.run(disk_dir, episodes=sizes.disk_episodes, seed=seed))
        if "inputs" in only:
            progress("inputs on sqlite")
            done(inputs.run(sqlite_database(work, "inputs"), calls=sizes.inputs, seed=seed))
            progress("inputs on postgresql")
            with postgres_database(servers.url(), "inputs") as db:
                done(inputs.run(db, calls=sizes.inputs, seed=seed))
        return servers.version


# -- the report ---------------------------------------------------------------------------------


def machine(pg_version: str) -> str:
    """CPU, cores, system and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores; Linux {platform.release()}; Python "
        f"{platform.python_version()}; SQLAlchemy {sqlalchemy.__version__}; "
        f"SQLite {sqlite3.sqlite_version}; PostgreSQL {pg_version}"
    )


def _markdown(docstring: str | None) -> tuple[str, str]:
    """A module docstring as a title and Markdown paragraphs."""
    text = docstring or ""
    text = re.sub(r":(?:func|class|mod|data|meth):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    title, _, body = text.strip().partition("\n")
    return title.rstrip("."), body.strip()


_MODULES = {
    "kill": kill,
    "contention": contention,
    "connections": connections,
    "disk": disk,
    "inputs": inputs,
}


def _rows(outcome: Outcome) -> dict[str, str]:
    rows = {name: f"{value:,}" for name, value in outcome.work.items()}
    if outcome.scenario != "inputs":
        rows["flushes acknowledged"] = f"{outcome.flushes:,}"
        rows["messages acknowledged"] = f"{outcome.acknowledged:,}"
        rows["messages stored"] = f"{outcome.stored:,}"
        rows["duplicated"] = f"{outcome.duplicated:,}"
        rows["lost"] = f"{outcome.lost:,}"
    typed = "; ".join(f"{kind} {count:,}" for kind, count in sorted(outcome.typed.items()))
    rows["typed errors"] = typed or "none"
    rows["untyped errors"] = f"{sum(outcome.untyped.values()):,}"
    rows["other failures"] = f"{len(outcome.problems):,}"
    rows.update(outcome.notes)
    rows["duration"] = f"{outcome.seconds:.0f} s"
    rows["verdict"] = "passed" if outcome.ok else "**FAILED**"
    return rows


def table(outcomes: list[Outcome]) -> str:
    """One table: a row per figure, a column per backend."""
    rows = [_rows(o) for o in outcomes]
    names: list[str] = []
    for r in rows:
        names += [name for name in r if name not in names]
    cells = [
        "| | " + " | ".join(o.backend for o in outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    for name in names:
        values = [r.get(name, "").replace("|", "\\|") for r in rows]
        cells.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(cells)


def findings(outcomes: list[Outcome]) -> str:
    """Every untyped error (with the call that raised it) and every other failure."""
    lines = []
    for o in outcomes:
        for kind, count in sorted(o.untyped.items()):
            sample = o.samples.get(kind, "")
            sample = (
                sample if len(sample) < 300 else f"{sample[:150]} ... {sample[-150:]}"
            ).replace("`", "'")
            lines.append(f"- {o.scenario}/{o.backend}: `{kind}` ({count}x), e.g. `{sample}`")
        for problem in o.problems[:10]:
            shown = problem.replace("`", "'")
            lines.append(f"- {o.scenario}/{o.backend}: {shown}")
        if len(o.problems) > 10:
            lines.append(f"- {o.scenario}/{o.backend}: and {len(o.problems) - 10} more")
    return "\n".join(lines) or "None: nothing duplicated or lost, every error typed."


def report(outcomes: list[Outcome], pg_version: str, seed: int) -> str:
    """docs/reliability.md."""
    sections = []
    for scenario in SCENARIOS:
        mine = [o for o in outcomes if o.scenario == scenario]
        if not mine:
            continue
        title, body = _markdown(_MODULES[scenario].__doc__)
        sections.append(f"## {scenario}: {title}\n\n{body}\n\n{table(mine)}\n")
    verdict = (
        "Every check passed."
        if all(o.ok for o in outcomes)
        else "**Some checks failed**: see the findings below."
    )
    scenarios = "\n".join(sections)
    return f"""# Reliability

hermes_orm keeps a session's flush cursor (`flushed_idx`) in the session row
and advances it in the same transaction as the message inserts, so that a
crash, a lost commit acknowledgement, another process writing the same
session, a dropped connection or a full disk can neither duplicate nor drop a
message, and bad input is refused with a typed error before anything is
written. This suite puts that to the test; these are the figures of one run.

Generated by `python -m reliability` (from the repository root, after
`pip install -e '.[test]'`) on {time.strftime("%Y-%m-%d")}, seed {seed}, in
{sum(o.seconds for o in outcomes) / 60:.0f} minutes. `python -m reliability --quick`
runs every scenario with small counts and writes nothing (the tests run that
form: `tests/test_reliability.py`); `--only NAME` runs some of them.

Machine: {machine(pg_version)}.

Every scenario ends with the same check of every session: the messages read
back are exactly the first `flushed_idx` messages of its deterministic
conversation (message `i` of a session is a pure function of the session
and `i`, with text of many scripts, emoji, NUL characters, tool calls, sizes
up to 160 KB), at positions 0..n-1, with `flushed_idx == message_count ==`
the rows; the cursor ends a turn (a flush wrote all its messages or none);
no message is held twice; every cursor a flush returned to a writer is at
most the stored one (no acknowledged message lost). Then `hermes-orm verify`
checks every invariant of the database. PostgreSQL runs with
`synchronous_commit=on` (a commit is in the WAL before it is acknowledged)
and `fsync=off` (the server's crashes here keep the OS page cache).

{verdict}

{scenarios}
## Findings

{findings(outcomes)}
"""


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every check passed."""
    parser = argparse.ArgumentParser(
        prog="python -m reliability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small counts; nothing written")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"run these scenarios ({', '.join(SCENARIOS)}); nothing written",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds every scenario (default 0)")
    args = parser.parse_args(argv)
    only = SCENARIOS
    if args.only:
        only = tuple(name.strip() for names in args.only for name in names.split(",") if name)
        unknown = sorted(set(only) - set(SCENARIOS))
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    sizes = QUICK if args.quick else FULL

    outcomes: list[Outcome] = []

    def progress(what: str) -> None:
        print(f"... {what}", file=sys.stderr, flush=True)

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(outcome.summary(), flush=True)

    pg_version = run(sizes, only, progress, done, seed=args.seed)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print("\nFindings:\n" + findings(failed), file=sys.stderr)
    if not (args.quick or args.only):
        DOCS.mkdir(exist_ok=True)
        text = report(outcomes, pg_version, args.seed)
        (DOCS / "reliability.md").write_text(text, encoding="utf-8", errors="backslashreplace")
        print(f"\nwrote {DOCS / 'reliability.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

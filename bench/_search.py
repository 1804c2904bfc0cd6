"""The search benchmark: a generated corpus, representative queries, three engines.

The corpus is agent sessions of user messages, assistant messages (half of them
with a tool call) and tool results; words follow a Zipf distribution over a
technical vocabulary with a long tail, about 1 message in 20 holds Chinese or
Japanese, and 1 tool result in 100 is a large output (4-16 KB). The same corpus
goes into hermes_orm on SQLite and on PostgreSQL (through ``SessionStore.flush``)
and into a Hermes Agent state.db (its schema and FTS5 triggers, rows inserted
in batches).
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hermes_orm

_COMMON = """
the to of and a in is for that it with on this be as you are can not or from by
an at if we i error file database connection server request response function
return value data user test code run build deploy config update install python
module import path session message tool result agent query index table column
row commit migration version docker container image service port network timeout
retry failed success output input log warning debug trace stack exception status
api key token model prompt context cache memory disk process thread lock queue
worker job task schedule cron backup restore deployment deployed deploying
deploys kubernetes cluster node pod helm compose volume postgres sqlite mysql
redis nginx linux ubuntu macos windows git branch merge rebase pull push
repository release tag changelog issue bug fix patch feature refactor review
""".split()  # noqa: SIM905

_CHINESE = """
部署 数据库 连接 数据库连接 服务器 配置 文件 错误 日志 用户 会话 消息 工具
结果 代码 测试 运行 构建 安装 更新 版本 迁移 索引 缓存 内存 进程 线程 超时
重试 成功 失败 网络 端口 容器 镜像 集群 节点 备份 恢复 搜索 查询 问题 修复
功能 需要 我们 这个 一个 可以 已经 现在 然后 因为 所以 但是 如果 没有 项目
大别山
""".split()  # noqa: SIM905

_JAPANESE = """
設定 ファイル 設定ファイル データベース 接続 サーバー エラー ログ ユーザー
セッション メッセージ ツール 結果 コード テスト 実行 ビルド インストール 更新
検索 問題 修正 機能 必要 です ます した する こと これ それ
""".split()  # noqa: SIM905


def _vocabulary(rng: random.Random, size: int = 30_000) -> list[str]:
    syllables = "ka lo mi ren tor vex sa qui dra pel zu nor bi fe gu ha jo ny wo ix".split()  # noqa: SIM905
    tail = set()
    while len(tail) < size:
        tail.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return _COMMON + sorted(tail)


@dataclass
class Corpus:
    """A deterministic generator of the benchmark's sessions."""

    messages: int
    per_session: int = 500
    seed: int = 2026
    _pool: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        words = _vocabulary(rng)
        weights = [1 / (rank + 1) ** 1.07 for rank in range(len(words))]
        self._pool = rng.choices(words, weights=weights, k=1_000_003)

    def _words(self, rng: random.Random, low: int, high: int) -> str:
        count = rng.randint(low, high)
        start = rng.randrange(len(self._pool) - count)
        return " ".join(self._pool[start : start + count])

    @staticmethod
    def _cjk(rng: random.Random) -> str:
        pool = _CHINESE if rng.random() < 0.7 else _JAPANESE
        clauses = [
            "".join(rng.choices(pool, k=rng.randint(3, 8))) for _ in range(rng.randint(1, 4))
        ]
        return "\uff0c".join(clauses) + "\u3002"  # CJK comma and full stop

    def _text(self, rng: random.Random, low: int, high: int) -> str:
        text = self._words(rng, low, high)
        roll = rng.random()
        if roll < 0.05:
            text = self._cjk(rng) + " " + text if roll < 0.025 else text + " " + self._cjk(rng)
        elif roll < 0.06:
            text += " connection refused"
        elif roll < 0.07:
            text += " see config.yaml"
        elif roll < 0.0705:
            text += " ECONNREFUSED"
        return text

    def _message(self, rng: random.Random, n: int, stamp: float) -> dict[str, Any]:
        kind = n % 3
        if kind == 0:
            return {"role": "user", "content": self._text(rng, 8, 40), "timestamp": stamp}
        if kind == 1:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": self._text(rng, 10, 80),
                "timestamp": stamp,
            }
            if rng.random() < 0.5:
                command = self._words(rng, 2, 8)
                message["tool_calls"] = [
                    {
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {"name": "terminal", "arguments": json.dumps({"cmd": command})},
                    }
                ]
            return message
        large = rng.random() < 0.01  # a large tool output
        content = self._words(rng, 700, 2500) if large else self._text(rng, 20, 150)
        return {"role": "tool", "content": content, "tool_name": "terminal", "timestamp": stamp}

    def sessions(self) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        """``(session_id, source, messages)`` of every session, in order."""
        rng = random.Random(self.seed + 1)
        sources = ("cli", "telegram", "discord")
        made = 0
        number = 0
        while made < self.messages:
            count = min(self.per_session, self.messages - made)
            stamp = 1_760_000_000.0 + made
            messages = [self._message(rng, n, stamp + n) for n in range(count)]
            yield f"bench-{number:05d}", sources[number % 3], messages
            made += count
            number += 1


#: (query, filters); every one also runs through Hermes' search_messages.
QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("error", {}),
    ("database connection", {}),
    ("kubernetes", {}),
    ('"connection refused"', {}),
    ("deploy*", {}),
    ("postgres OR sqlite", {}),
    ("docker -compose", {}),
    ("部署", {}),
    ("数据库连接", {}),
    ("設定ファイル", {}),
    ("docker 部署", {}),
    ("config.yaml", {}),
    ("ECONNREFUSED", {}),
    ("kalomi", {}),
    ("zzyzx", {}),
    ("timeout", {"role": "tool"}),
    ("migration", {"source": "telegram"}),
    ("migr*", {}),
    ("retry failed worker", {}),
    ('"stack trace"', {}),
]


def hermes_query(query: str) -> str:
    """The same query in the FTS5 syntax Hermes accepts (exclusion is ``NOT``)."""
    return " ".join(f"NOT {w[1:]}" if w.startswith("-") else w for w in query.split())


def load_ours(url: str, corpus: Corpus) -> hermes_orm.SessionStore:
    store = hermes_orm.SessionStore(url, sqlite_synchronous="OFF")
    store.upgrade()
    for session_id, source, messages in corpus.sessions():
        store.create_session(session_id, source, started_at=messages[0]["timestamp"])
        store.flush(session_id, messages)
    return store


def load_hermes(path: Path, corpus: Corpus) -> Any:
    """A Hermes Agent SessionDB holding the corpus (rows inserted in batches)."""
    from hermes_state import SessionDB

    db = SessionDB(db_path=path)
    conn = db._conn
    conn.execute("PRAGMA synchronous=OFF")
    for session_id, source, messages in corpus.sessions():
        db.create_session(session_id, source)
        rows = [
            (
                session_id,
                m["role"],
                m["content"],
                json.dumps(m["tool_calls"]) if "tool_calls" in m else None,
                m.get("tool_name"),
                m["timestamp"],
            )
            for m in messages
        ]
        with conn:
            conn.executemany(
                "INSERT INTO messages (session_id, role, content, tool_calls, tool_name, "
                "timestamp) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
    return db


@dataclass
class Timings:
    """Per-query median seconds and every sample."""

    medians: dict[str, float]
    samples: list[float]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def time_queries(run: Callable[[str, dict[str, Any]], Any], repeat: int) -> Timings:
    medians: dict[str, float] = {}
    samples: list[float] = []
    for query, filters in QUERIES:
        run(query, filters)  # warm
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run(query, filters)
            times.append(time.perf_counter() - start)
        medians[query] = statistics.median(times)
        samples += times
    return Timings(medians, samples)


def ours_runner(store: hermes_orm.SessionStore) -> Callable[[str, dict[str, Any]], Any]:
    return lambda query, filters: store.search(query, limit=20, **filters)


def hermes_runner(db: Any) -> Callable[[str, dict[str, Any]], Any]:
    def run(query: str, filters: dict[str, Any]) -> Any:
        return db.search_messages(
            hermes_query(query),
            source_filter=[filters["source"]] if "source" in filters else None,
            role_filter=[filters["role"]] if "role" in filters else None,
            limit=20,
        )

    return run


def sqlite_index_bytes(path: Path, prefix: str) -> int:
    """Bytes of the tables named ``prefix*`` (a search index and its shadow tables)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(
            conn.execute(
                "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name LIKE ?", (prefix + "%",)
            ).fetchone()[0]
        )


def sqlite_text_bytes(path: Path) -> int:
    """Bytes of the text hermes_orm's search indexes (every message's body)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        statement = "SELECT sum(length(CAST(body AS BLOB))) FROM hermes_search_source"
        return int(conn.execute(statement).fetchone()[0])


@dataclass(frozen=True)
class PostgresqlSizes:
    """Bytes of PostgreSQL's search columns and indexes, by part, and of the indexed text."""

    vectors: int
    #: Of ``vectors``, what the words' positions take (phrases are checked on them).
    positions: int
    words_index: int
    #: The CJK-like words' column and its indexes.
    cjk: int
    text: int

    @property
    def total(self) -> int:
        return self.vectors + self.words_index + self.cjk

    def parts(self) -> str:
        mib = 2**20
        return (
            f"vectors {self.vectors / mib:,.1f} (of them positions {self.positions / mib:,.1f}), "
            f"their GIN index {self.words_index / mib:,.1f}, CJK-like words {self.cjk / mib:,.1f}"
        )


def postgresql_sizes(store: hermes_orm.SessionStore) -> PostgresqlSizes:
    """Bytes of the search columns and indexes, by part, and of the indexed text."""
    with store.engine.connect() as conn:
        indexes = dict(
            conn.exec_driver_sql(
                "SELECT c.relname, pg_relation_size(indexrelid) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname LIKE 'ix_hermes_search%%'"
            ).all()
        )
        # The text is each message's body, as the search function computes it.
        vectors, stripped, cjk, text = conn.exec_driver_sql(
            "SELECT sum(pg_column_size(search_vector)), sum(pg_column_size(strip(search_vector))), "
            "sum(coalesce(pg_column_size(search_cjk), 0)), "
            "sum(octet_length(hermes_search_body(content, content_parts, tool_name, tool_calls))) "
            "FROM hermes_messages"
        ).one()
    words_index = int(indexes.pop("ix_hermes_search_vector"))
    return PostgresqlSizes(
        vectors=int(vectors),
        positions=int(vectors) - int(stripped),
        words_index=words_index,
        cjk=int(cjk) + sum(int(size) for size in indexes.values()),
        text=int(text),
    )

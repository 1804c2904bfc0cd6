"""A store inside a real web server: bursts of requests after idle spells, on a small pool."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio.to_thread
import uvicorn

from hermes_orm import SessionStore, create_store_engine

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


def _app(store: SessionStore) -> Callable[[dict[str, Any], Receive, Send], Any]:
    """``GET /turn/SID/N`` flushes N messages to SID from a worker thread, as a sync endpoint."""

    async def app(scope: dict[str, Any], _receive: Receive, send: Send) -> None:
        _, _, session_id, count = scope["path"].split("/")

        def work() -> int:
            store.ensure_session(session_id, source="web")
            messages = [{"role": "user", "content": f"m{i}"} for i in range(int(count))]
            return store.flush(session_id, messages).cursor

        cursor = await anyio.to_thread.run_sync(work)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps({"cursor": cursor}).encode()})

    return app


def test_bursts_after_idle_spells_on_a_pool_of_two_plus_two(db_url: str) -> None:
    engine = create_store_engine(db_url, pool_size=2, max_overflow=2, pool_timeout=10)
    store = SessionStore(engine)
    config = uvicorn.Config(
        _app(store), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]

    def get(path: str) -> tuple[int, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, json.loads(response.read())

    try:
        for burst in range(1, 4):
            with ThreadPoolExecutor(40) as pool:
                paths = [f"/turn/s{i % 10}/{burst}" for i in range(40)]
                results = list(pool.map(get, paths))
            assert [status for status, _ in results] == [200] * 40
            assert {body["cursor"] for _, body in results} == {burst}
            time.sleep(1.0)  # an idle spell
    finally:
        server.should_exit = True
        thread.join(10)
    for i in range(10):
        assert store.get_messages(f"s{i}") == [
            {"role": "user", "content": f"m{j}"} for j in range(3)
        ]
    assert engine.pool.checkedout() <= 1  # the store's one idle connection at most
    store.close()
    engine.dispose()

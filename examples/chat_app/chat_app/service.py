"""The chat service: accounts in the app's own tables, conversations in hermes_orm's.

Run it with ``uvicorn chat_app.service:app`` after ``alembic upgrade head``.
Endpoints are plain ``def``: FastAPI runs them on its worker threads, and the
store takes a pooled connection for each operation and gives it back.
"""

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as OrmSession

import hermes_orm
from chat_app.models import Account

URL = os.environ.get("CHAT_APP_DATABASE_URL", "sqlite:///chat_app.db")
# One engine for the app's own queries and hermes_orm's, as an application has.
# pool_pre_ping: after a database restart or an idle timeout, the app's own
# queries get a live connection, not a dead pooled one (hermes_orm's calls
# retry on a lost connection either way).
engine = create_engine(URL, pool_pre_ping=True)
store = hermes_orm.SessionStore(engine)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Refuse to serve on a database its migrations have not reached.
    hermes_orm.check_schema(engine)
    yield
    store.close()
    engine.dispose()


app = FastAPI(title="chat_app", lifespan=lifespan)


@app.exception_handler(RequestValidationError)
def malformed(_request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's own answer to an invalid request, its text escaped.

    It echoes the input, which may hold a lone surrogate (a JSON escape a client
    may send) that a UTF-8 response cannot, or the raw bytes of a body sent as no
    JSON, which need not be UTF-8: a 500, where the client's error is a 422.
    """
    errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: _shown_bytes})
    document = json.dumps({"detail": errors})  # (ASCII, escaped)
    return Response(document, status_code=422, media_type="application/json")


def _shown_bytes(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


#: SQLSTATEs of a PostgreSQL server going away or busy for now: a connection lost
#: (class 08), shutting down or starting up (57P01-57P03), a lock wait past
#: lock_timeout (55P03), no connection slot left (53300).
_TEMPORARY = {"57P01", "57P02", "57P03", "55P03", "53300"}


def _temporary(exc: OperationalError) -> bool:
    """Whether the app's own query failed on a database out of reach or locked for now.

    (Not a missing table, which SQLite also reports as an OperationalError.)
    """
    if exc.connection_invalidated:
        return True
    if engine.dialect.name == "sqlite":
        return any(word in str(exc.orig) for word in ("locked", "busy"))
    state = getattr(exc.orig, "sqlstate", None)
    if state is None:  # refused before any server answered: a connection, not a query
        return "authentication" not in str(exc.orig) and "does not exist" not in str(exc.orig)
    return str(state).startswith("08") or state in _TEMPORARY


@app.exception_handler(hermes_orm.DatabaseUnavailableError)
@app.exception_handler(hermes_orm.DatabaseBusyError)
@app.exception_handler(OperationalError)
def unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """The database out of reach or locked (a restart, a long write): try again later.

    hermes_orm's calls waited as their retry policy says; the app's own queries
    wait only as their driver does (5 s for SQLite's lock). Neither is the
    client's error, nor the app's: a 503. Any other OperationalError is the
    app's (a 500).
    """
    if isinstance(exc, OperationalError) and not _temporary(exc):
        raise exc
    detail = "the database is unavailable or busy: try again"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})


@app.exception_handler(hermes_orm.InvalidArgumentError)
def refused(_request: Request, exc: hermes_orm.InvalidArgumentError) -> JSONResponse:
    """A chat id, message or search query hermes_orm refuses: the client's to correct."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


#: An account id, in a body and in a query: a positive 32-bit integer, as the column
#: holds it (``Integer``: 32 bits on PostgreSQL).
AccountId = Annotated[int, Field(ge=1, le=2**31 - 1)]
AccountParam = Annotated[int, Query(ge=1, le=2**31 - 1)]


class NewAccount(BaseModel):
    """``POST /accounts``."""

    # As the column holds it; NUL is no text PostgreSQL stores.
    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00]*$")


class Turn(BaseModel):
    """``POST /chats/{chat_id}``: the whole conversation as the agent holds it."""

    account_id: AccountId
    messages: list[dict[str, Any]]


def _account(orm: OrmSession, account_id: int) -> Account:
    account = orm.get(Account, account_id)
    if account is None:
        raise HTTPException(404, f"no account {account_id}")
    return account


@app.post("/accounts")
def create_account(body: NewAccount) -> dict[str, Any]:
    try:
        with OrmSession(engine) as orm, orm.begin():
            account = Account(name=body.name)
            orm.add(account)
            orm.flush()
            return {"id": account.id, "name": account.name}
    except IntegrityError as exc:
        raise HTTPException(409, f"an account named {body.name!r} exists") from exc


@app.post("/chats/{chat_id}")
def save_turn(chat_id: str, body: Turn) -> dict[str, Any]:
    """Flush the conversation: only what the database does not hold yet is written."""
    with OrmSession(engine) as orm:
        account = _account(orm, body.account_id)
    chats = store.for_user(str(account.id))
    try:
        chats.ensure_session(chat_id, source="chat_app")
    except hermes_orm.SessionExistsError as exc:  # another account's chat
        raise HTTPException(409, f"chat {chat_id} belongs to another account") from exc
    try:
        result = chats.flush(chat_id, body.messages)
    except hermes_orm.HistoryDivergedError as exc:
        raise HTTPException(409, str(exc)) from exc
    return {"written": result.written, "cursor": result.cursor}


@app.get("/chats/{chat_id}")
def read_chat(chat_id: str, account_id: AccountParam) -> dict[str, Any]:
    chats = store.for_user(str(account_id))
    if chats.get_session(chat_id) is None:
        raise HTTPException(404, f"no chat {chat_id}")
    return {"messages": chats.get_messages(chat_id)}


@app.get("/search")
def search(q: str, account_id: AccountParam) -> dict[str, Any]:
    page = store.for_user(str(account_id)).search(q)
    return {"hits": [{"chat_id": hit.session_id, "snippet": hit.snippet} for hit in page.hits]}


@app.get("/accounts")
def list_accounts() -> list[dict[str, Any]]:
    with OrmSession(engine) as orm:
        accounts = orm.scalars(select(Account).order_by(Account.id))
        return [{"id": account.id, "name": account.name} for account in accounts]

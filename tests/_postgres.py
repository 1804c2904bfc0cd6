"""The throwaway PostgreSQL server lives in ``devtools`` (the benchmarks start it too)."""

from devtools.postgres import PostgresUnavailable, postgres_server

__all__ = ["PostgresUnavailable", "postgres_server"]

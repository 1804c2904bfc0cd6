"""Hermes Agent: import a ``state.db`` losslessly, and its ``SessionDB`` API on any database."""

from hermes_orm.integrations.hermes.importer import (
    ImportReport,
    StateDbError,
    import_state_db,
)
from hermes_orm.integrations.hermes.sessiondb import SessionDB

__all__ = ["ImportReport", "SessionDB", "StateDbError", "import_state_db"]

"""Hermes Agent: import a ``state.db`` losslessly into any hermes_orm database."""

from hermes_orm.integrations.hermes.importer import (
    ImportReport,
    StateDbError,
    import_state_db,
)

__all__ = ["ImportReport", "StateDbError", "import_state_db"]

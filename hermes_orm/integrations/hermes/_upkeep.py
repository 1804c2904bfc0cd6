"""Hermes Agent's SessionDB, continued: upkeep.

Rewriting and archiving messages, deleting and pruning, imports, metadata.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.
"""

from __future__ import annotations


class UpkeepMethods:
    """SessionDB methods on upkeep."""

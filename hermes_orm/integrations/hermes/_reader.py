"""The import's reader as a child process: ``python -m hermes_orm.integrations.hermes._reader``.

It reads a pickled :class:`~hermes_orm.integrations.hermes.importer.ReadJob`
from stdin and writes to stdout, each in a frame of
:func:`~hermes_orm.integrations.hermes.importer.write_frame`, every batch of
:func:`~hermes_orm.integrations.hermes.importer.read_batches` as
``("batch", batch)``, then ``("done", None)``, or ``("error", exception)``
if reading failed. The importing process starts it and writes the batches.
"""

from __future__ import annotations

import pickle
import sys
from typing import BinaryIO

from hermes_orm.integrations.hermes.importer import StateDbError, read_batches, write_frame


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Run one job from ``stdin``, its batches to ``stdout``."""
    job = pickle.load(stdin)
    try:
        for batch in read_batches(job):
            write_frame(stdout, ("batch", batch))
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # an exception that does not survive pickling is described instead
            exc = StateDbError(f"reading the source failed: {exc!r}")
        write_frame(stdout, ("error", exc))
    else:
        write_frame(stdout, ("done", None))


if __name__ == "__main__":
    protocol = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not break the stream of batches
    try:
        serve(sys.stdin.buffer, protocol)
    except (BrokenPipeError, KeyboardInterrupt):  # the importing process is gone
        sys.exit(1)

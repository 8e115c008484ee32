"""Writing a file whole: the run's manifest, the report's page, the benchmark's measurements.

One writer for them all, so each gets the same guarantees: a crash, a full disk or Ctrl-C
part-way leaves the file as it was or the whole new one, never a cut one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file, on disk before it is renamed over it: a write
    that fails or is stopped part-way (a full disk, a crash, Ctrl-C) leaves the file before it,
    not a cut one (a page the next report refuses to write over as no report of selftune's, a
    benchmark's ``overhead.json`` that lost every measurement it held, a run's manifest).  The
    temporary file's name is this writer's own (two reports at once), a link is written through
    to its file, and a file there keeps its permissions."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_bytes(data)
        # on disk before the rename: after a power cut the rename may be kept and the data not,
        # an empty file in the old one's place
        synced = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(synced)
        finally:
            os.close(synced)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except OSError as err:  # named by the file, not by its temporary
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself is on disk once the folder is synced; not every platform allows it
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

"""``python -m selftune``: the ``selftune`` command, where its script is not on PATH (a virtual
environment not activated, a checkout run from ``src``)."""

from __future__ import annotations

import sys

from selftune.cli import main

sys.exit(main())

"""Silence Avalanche's notices that say nothing to a user of this package (the CLI and its worker processes).

- ``qpsolvers`` warns at import that GEM's optional QP solvers are absent (GEM is not used here).
- Avalanche's deprecated helpers (e.g. ``ReplayPlugin`` calling ``storage_policy.update``) warn on every
  experience. They warn through the ``deprecated`` package, which sets its own ``always`` filter around each
  warning, so a ``warnings.filterwarnings`` rule cannot reach them: they are dropped when shown instead.
"""

from __future__ import annotations

import os
import warnings

_AVALANCHE_DIR = f"{os.sep}avalanche{os.sep}"


def quiet_avalanche_notices() -> None:
    """Install the filter and the display hook (idempotent). Warnings raised by this package are untouched."""
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    show = warnings.showwarning
    if getattr(show, "_avalanche_merge_quiet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and _AVALANCHE_DIR in str(filename):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._avalanche_merge_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning

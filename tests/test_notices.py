"""Avalanche's notices are hidden from CLI users; this package's own warnings are not."""

import warnings

from avalanche_merge.notices import quiet_avalanche_notices


def test_avalanche_deprecations_are_dropped_and_others_shown(monkeypatch):
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append((a[1], str(a[2]))))
    quiet_avalanche_notices()
    quiet_avalanche_notices()  # idempotent: one wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as the `deprecated` package does around its warning
        warnings.warn_explicit("old", DeprecationWarning, "/x/site-packages/avalanche/training/plugins/replay.py", 1)
        warnings.warn_explicit("ours", DeprecationWarning, "/x/avalanche_merge/plugins/merge.py", 1)
        warnings.warn_explicit("user", UserWarning, "/x/site-packages/avalanche/core.py", 1)
    assert [(c, f.rsplit("/", 1)[-1]) for c, f in shown] == [(DeprecationWarning, "merge.py"), (UserWarning, "core.py")]

"""The one progress bar: fed by the jobs (per-chunk updates) and by the commands (totals)."""

from __future__ import annotations

import io
import types

from engine import progress
from engine.progress import TerminalBar, format_seconds, make_progress


def test_updates_accumulate_like_the_callable_protocol():
    buf = io.StringIO()
    bar = TerminalBar(total_rows=1000, stream=buf, interval=0.0, width=200)
    bar.update(250, 10_000_000)
    bar.update(250, 10_000_000)
    assert "500/1,000 rows" in buf.getvalue() and "50%" in bar.line()
    bar.close()
    assert buf.getvalue().endswith("\n")


def test_make_progress(monkeypatch):
    source = types.SimpleNamespace(num_rows=10)
    calls = []
    cb = make_progress(lambda *a: calls.append(a), source)
    cb.update(4, 40)
    cb.update(6, 60)
    assert calls == [(4, 40, 10), (10, 100, 10)]
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    assert not isinstance(make_progress(True, source), TerminalBar)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    bar = make_progress(True, source)
    assert isinstance(bar, TerminalBar) and bar.line().startswith("[")
    assert not isinstance(make_progress(False, source), TerminalBar)


def test_format_seconds():
    assert [format_seconds(s) for s in (1.25, 65, 7380)] == ["1.2s", "1m05s", "2h03m"]

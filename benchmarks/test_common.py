"""The benchmarks' shared helpers where a bare GPU machine differs from this one: no matplotlib."""

from __future__ import annotations

import sys

from benchmarks import common


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to `import`
    rows = [dict(shape="s", backend="eager", tflops=1.0)]
    picture = common.plot_bars(tmp_path / "x.png", rows, metric="tflops", group="shape", series="backend", title="t")
    assert picture is None and not (tmp_path / "x.png").exists()

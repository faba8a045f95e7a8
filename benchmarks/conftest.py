"""Markers the benchmark tests share with tests/ (registered there too), for runs of this folder alone; and a run
killed in the middle of writing a file, for the tests of how results and tables reach the disk."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower variant of a path that a faster default test also covers")


class Killed(BaseException):
    """The run stopping mid-write (a deadline's kill, Ctrl-C): a BaseException, so no ``except Exception`` takes it."""


@pytest.fixture
def killed_mid_write(monkeypatch) -> type[BaseException]:
    """Every ``Path.write_text`` from here on writes the first half of its text, then the run is killed: whatever
    writes a file in place leaves it truncated; a write to a temporary file renamed afterwards leaves it whole.
    Set up the files a test starts from with ``write_bytes``."""

    def half_then_killed(self: Path, data: str, *args, **kwargs) -> int:
        with open(self, "w") as file:
            file.write(data[: len(data) // 2])
        raise Killed(str(self))

    monkeypatch.setattr(Path, "write_text", half_then_killed)
    return Killed

"""Markers the benchmark tests share with tests/ (registered there too), for runs of this folder alone."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower variant of a path that a faster default test also covers")

"""perceiver_fast benchmark suite: ``python -m benchmarks <suite>`` (see ``python -m benchmarks --help``)."""

"""The benchmark suite behind `make bench` (`python -m tests.bench.run --help`); not part of `make test`."""

# eventserver: `make run` serves on 127.0.0.1:8000, `make test` runs the test suite.
PYTHON ?= python3

.PHONY: run test bench

run:
	$(PYTHON) eventserver.py

test:
	$(PYTHON) -m unittest -v test_eventserver

bench:
	$(PYTHON) bench_eventserver.py

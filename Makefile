# Each target sets up .venv itself so that a fresh clone needs nothing but Python >= 3.11
# (and, for psana, the system packages below, which it installs when run as root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# psana (raw xtc2 runs) builds pykerberos against Kerberos and needs mpi4py built against MPICH.
SYSTEM_PACKAGES := libkrb5-dev mpich libmpich-dev postgresql

.PHONY: demo test fuzz bench lint clean system-packages

$(STAMP): pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	MPICC=mpicc $(BIN)/pip install --quiet --no-binary mpi4py -e '.[test,bench]'
	touch $(STAMP)

# krb5-config and mpicc are what the psana builds call, initdb what the cluster tests start a
# PostgreSQL with; without them, install the packages (as root) or stop with the command that does.
system-packages:
	@if ! command -v krb5-config >/dev/null || ! command -v mpicc >/dev/null \
			|| ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(SYSTEM_PACKAGES) (psana and the cluster tests need them)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
		else \
			echo "psana needs Kerberos and MPICH development files, the cluster tests PostgreSQL; run:"; \
			echo "    sudo apt-get install -y $(SYSTEM_PACKAGES)"; \
			echo "and then make again."; \
			exit 1; \
		fi; \
	fi

demo: $(STAMP)
	$(BIN)/lclstream demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The fuzz targets of the test suite, long: FUZZ_EXAMPLES cases each (make test runs 150).
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz LCLSTREAM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest tests/security/test_fuzz.py \
		--hypothesis-show-statistics --timeout 0

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo-data bench-data

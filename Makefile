# sessiongate: every target sets itself up (virtualenv, dependencies, generated code).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_DIR := protos
PROTO_SRC := $(PROTO_DIR)/sessiongate/v1/session_service.proto
PROTO_GEN := $(PROTO_DIR)/sessiongate/v1/session_service_pb2.py
ARGS ?=
# Third-party tools the conformance tests drive (Node gRPC client, buf, codex-acp), from npm.
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
BUF        := $(NODE_DIR)/node_modules/.bin/buf
# buf breaking compares the proto with main (on a branch) or with the previous commit (on main).
BREAKING_BASE ?= $(shell if [ "$$(git rev-parse --abbrev-ref HEAD 2>/dev/null)" != main ] && git rev-parse -q --verify main >/dev/null 2>&1; then echo main; elif git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then echo HEAD~1; fi)

.PHONY: setup node-deps proto proto-check proto-lint proto-breaking run test chaos mutate bench lint docs clean

setup: $(STAMP)

node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else \
		echo "npm not found: the Node client, buf, codex-acp and Zed example agent tests will be skipped"; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

# Generated code is committed; regenerate after editing the proto.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py $(PROTO_DIR)

# Fails when the committed generated code is not what the proto produces.
proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check $(PROTO_DIR)

proto-lint: $(NODE_STAMP)
	$(BUF) lint

proto-breaking: $(NODE_STAMP)
	@if [ -z "$(BREAKING_BASE)" ]; then \
		echo "buf breaking: no earlier commit to compare with"; \
	else \
		$(BUF) breaking --against '.git#ref=$(BREAKING_BASE),subdir=$(PROTO_DIR)' \
		&& echo "buf breaking: no breaking change against $(BREAKING_BASE)"; \
	fi

# Its state (database, agents' homes, the echo agent's sessions) stays in the checkout's .state/
# (git-ignored), not in the per-user default of an installed server shared with every other clone.
run: $(STAMP)
	XDG_STATE_HOME='$(CURDIR)/.state' $(PY) -m sessiongate.server $(ARGS)

# Three workers, each a whole test file at a time (a file's shared servers stay in one process).
# Three on two cores: most tests wait on agents, servers and bounds, not on the CPU (9:31 on two
# workers, 7:42 on three, on this 2-core machine); the suite passes beside `make bench` too.
TEST_WORKERS ?= 3

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The session core's state machine (tests/test_session_machine.py) for CHAOS_SECONDS instead of
# its short `make test` budget: before a release.
CHAOS_SECONDS ?= 600

chaos: $(STAMP)
	SESSIONGATE_CHAOS_SECONDS=$(CHAOS_SECONDS) $(PY) -m pytest -p no:cacheprovider -s tests/test_session_machine.py $(ARGS)

# Mutation testing of the core's modules against their own tests; prints the survivors. Narrow
# it with MUTATE_MODULES / MUTATE_TESTS (space-separated paths), e.g.
# `make mutate MUTATE_MODULES=server/sessions/lock.py MUTATE_TESTS=tests/test_session_core.py`.
MUTATE_MODULES ?=
MUTATE_TESTS ?=
MUTATE_JOBS ?= 2

mutate: $(STAMP)
	MUTATE_MODULES="$(MUTATE_MODULES)" MUTATE_TESTS="$(MUTATE_TESTS)" MUTATE_JOBS=$(MUTATE_JOBS) \
		$(PY) -m tests.mutate

# Benchmarks, never part of `make test`: `make bench` (full, writes docs/benchmarks.md) or
# `make bench ARGS=--quick` (about two minutes, writes bench-results/quick.md).
bench: $(STAMP)
	$(PY) -m tests.bench $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): strict, so a broken link or a page missing from the
# nav fails; the site goes to the git-ignored site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache

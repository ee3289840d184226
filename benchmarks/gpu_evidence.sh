#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, one stage per argument (run from the repo root on
# a CUDA machine; OUT defaults to ./bench_out). Each stage writes its JSON/Markdown under OUT.
#
#   benchmarks/gpu_evidence.sh gpu-tests small-gpu quality kernels   # issues 5 and 7
#   benchmarks/gpu_evidence.sh decode throughput max-params     # issue 6
#   benchmarks/gpu_evidence.sh attention-sweep                  # re-pick the attention block sizes
#   benchmarks/gpu_evidence.sh model-quality                    # issue 15 (8 such runs: 310 s, H100)
#   benchmarks/gpu_evidence.sh phase8                           # issue 18
#   benchmarks/gpu_evidence.sh conv small-gpu-speed             # issue 16: measured 2026-12-07 (H100)
#   benchmarks/gpu_evidence.sh p1 attention-grad-bf16 hla-sweep decode-profile ssm-fla ssm-tf32  # issues 16, 18 (2026-12-08, H100)
#   benchmarks/gpu_evidence.sh hla-profile decode-int8 p1      # issues 18, 16: waiting for a GPU (two-part
#                                                              # features, int8 decoding, both speed settings)
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
P7="python3 -m phase7fw"
export PYTHONUNBUFFERED=1

# issue 16 item 5: 300 phase7_small steps under each of two overrides, the logged losses side by
# side (train and validation), checkpoints deleted. loss_curves TAG LABEL_A SET_A LABEL_B SET_B
loss_curves() {
  local label
  for label in "$2" "$4"; do
    local set=$3; [ "$label" = "$4" ] && set=$5
    $P7 run recipes/phase7_small.toml --set train.max_steps=300 --set "$set" \
        --set "run.output_dir=\"$OUT/$1_$label\"" > "$OUT/$1_$label.txt" 2>&1
    find "$OUT/$1_$label" -name "*.pt" -delete
  done
  python3 - "$OUT" "$1" "$2" "$4" <<'PY'
import json, sys
from pathlib import Path
out, tag, *labels = sys.argv[1:]
rows = {p: [json.loads(l) for l in open(next(Path(out, f"{tag}_{p}").rglob("training_log.jsonl")))] for p in labels}
for split in ("train", "val"):
    a, b = ([r["loss"] for r in rows[p] if r.get("split") == split] for p in labels)
    for i in range(0, len(a), max(1, len(a) // 6)):
        print(f"{split} row {i}: {labels[0]} {a[i]:.4f} {labels[1]} {b[i]:.4f} ({100 * (b[i] / a[i] - 1):+.2f}%)")
PY
}

attention_grad_loss_curves() {
  loss_curves attn_grad tf32 'kernels.hyperbolic_attention={impl = "auto", grad_matmul_low_precision = false}' \
      bf16 'kernels.hyperbolic_attention={impl = "auto", grad_matmul_low_precision = true}'
}

for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    gpu-tests)    # every kernel against its fp64 reference at real shapes, bf16 (issue 5)
      python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
    kernels)      # P3-P6 timings (correctness: the gpu-tests stage)
      python3 benchmarks/kernels.py --skip-verify --out "$OUT" $( [ -f "$OUT/p7_10g.json" ] && echo --step-json "$OUT/p7_10g.json" ) ;;
    attention-sweep)  # block sizes of the attention (and scan) kernels on this GPU, then P3 alone
      python3 benchmarks/kernels.py --sweep --skip-verify --attention-only --out "$OUT/sweep" ;;
    decode)       # P9: CUDA-graph decoding, exactness first (exit 1 if any path's tokens differ), then speed
      python3 benchmarks/bench_decoding.py --graphs --compile-step --tokens 300 --json "$OUT/dec_graphs_fp32.json" 2>&1 | tail -8
      python3 benchmarks/bench_decoding.py --graphs --compile-step --tokens 300 --precision bf16 --json "$OUT/dec_graphs_bf16.json" 2>&1 | tail -8
      # P9 against HF transformers generate (static cache + its compile) in the same process:
      # the graphed step as it is, then compiled before the capture (--compile-step)
      python3 benchmarks/p9_generate.py --cuda-graph on --json "$OUT/p9_graph.json" 2>&1 | tail -9
      python3 benchmarks/p9_generate.py --cuda-graph on --compile-step --hf-modes static-compile \
          --json "$OUT/p9_graph_compiled.json" 2>&1 | tail -6 ;;
    small-gpu)    # P7: the 1.5B model under 10 GiB and 8 GiB caps (issue 7). Peak memory does not
                  # depend on the number of accumulated micro-batches, so 2 (not 16) keep it short.
      $P7 bench recipes/phase7_1.5b.toml --memory-cap-gib 10 --steps 50 --warmup 1 --grad-accum 2 \
          --set train.compile=false ${KERNEL_SET:-} --json "$OUT/p7_10g.json" 2>&1 | tail -12
      $P7 bench recipes/phase7_1.5b_8gb.toml --memory-cap-gib 8 --steps 20 --warmup 1 \
          --set train.compile=false ${KERNEL_SET:-} --json "$OUT/p7_8g.json" 2>&1 | tail -12 ;;
    quality)      # small-GPU mode vs standard AdamW, ~100M model, 300 steps (issue 7)
      python3 benchmarks/small_gpu_quality.py --steps 300 --out "$OUT" 2>&1 | tail -6 ;;
    throughput)   # P1, P2 (and P9 decoding) against llama_1.5b in the same process (issue 6)
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 10 --warmup 2 \
          --compare recipes/llama_1.5b.toml --generate --gen-tokens 48 --profile /tmp/prof \
          --json "$OUT/p1_compiled.json" 2>&1 | tail -14
      cat /tmp/prof/*.ops.txt > "$OUT/p1_ops.txt"   # the traces stay on the machine (large)
      # the recipe (like llama_1.5b) runs without activation checkpointing; with it, for comparison
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 10 --warmup 2 \
          --set train.activation_checkpointing=true --json "$OUT/p1_compiled_ckpt.json" 2>&1 | tail -8
      # selective checkpointing: matmul and mixer-kernel outputs kept, elementwise work recomputed
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 10 --warmup 2 \
          --set train.activation_checkpointing=true --set 'train.checkpoint_policy="save_matmuls"' --json "$OUT/p1_compiled_sac.json" 2>&1 | tail -8 ;;
    max-params)   # the largest phase7 model that trains under 10 and 8 GiB (issue 6)
      $P7 bench recipes/phase7_1.5b.toml --memory-cap-gib 10 --max-params --grad-accum 1 --steps 1 --warmup 1 \
          --set train.compile=false --json "$OUT/max_10g.json" 2>&1 | tail -12
      $P7 bench recipes/phase7_1.5b_8gb.toml --memory-cap-gib 8 --max-params --steps 1 --warmup 1 \
          --set train.compile=false --json "$OUT/max_8g.json" 2>&1 | tail -12 ;;
    model-quality)  # phase7, its ablations and llama at ~100M on the same data (issue 15); the
                    # default 1000 steps are 8.2M tokens, QUALITY_STEPS=3052 the recipes' 25.0M
      # QUALITY_ARGS adds arguments: recipes, --seeds, --set 'data.sampling="epochs"'
      python3 benchmarks/quality.py --jobs ${QUALITY_JOBS:-4} --steps ${QUALITY_STEPS:-1000} \
          --out "$OUT/quality" ${QUALITY_ARGS:-} 2>&1 | tail -20
      find "$OUT/quality" -name "*.pt" -delete ;;   # checkpoints stay behind (large)
    phase8)       # P11 (issue 18): T = 1k..32k against phase7 and llama, then the 10 GiB long recipe
      python3 benchmarks/phase8_vs_phase7.py --out "$OUT/phase8" 2>&1 | tail -16
      $P7 bench recipes/phase8_1.5b_long.toml --memory-cap-gib 10 --steps 3 --warmup 1 \
          --set train.compile=false --json "$OUT/p8_long_10g.json" 2>&1 | tail -10 ;;
    conv)         # issue 16: the causal_conv kernel (its gate: gpu-tests, case 14) against the reference
                  # (cuDNN's depthwise conv with its transposes), then inside the 1.5B step, same process
      python3 benchmarks/ssm_conv.py --json "$OUT/ssm_conv.json" 2>&1 | tail -5
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 6 --warmup 2 --repeat 2 \
          --set 'kernels.causal_conv="triton"' --compare recipes/phase7_1.5b_standard.toml \
          --json "$OUT/conv_ab.json" 2>&1 | tail -12 ;;
    p1)           # issue 16: P1 / P2 in one process, three windows, with a profile of each recipe
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 6 --warmup 2 --repeat 3 \
          --compare recipes/llama_1.5b.toml --profile "$OUT/p1_profile" --json "$OUT/p1.json" 2>&1 | tail -24 ;;
    attention-grad-bf16)  # issue 16: the attention backward's dZ matmuls in bf16 (on in phase7_1.5b_standard
                          # since 2026-12-08, opt-in elsewhere): its gate, the step A/B, the 300-step check
      python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -k 16_bit -q -p no:cacheprovider 2>&1 | tail -3
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 6 --warmup 2 --repeat 2 \
          --set 'kernels.hyperbolic_attention={impl = "auto", grad_matmul_low_precision = true}' \
          --compare recipes/phase7_1.5b_standard.toml \
          --compare-set 'kernels.hyperbolic_attention={impl = "auto", grad_matmul_low_precision = false}' \
          --json "$OUT/attn_grad_bf16_ab.json" 2>&1 | tail -12
      attention_grad_loss_curves ;;
    attention-grad-bf16-loss)  # issue 16 item 5 for the option above alone (H100, 2026-12-08: within 0.04%)
      attention_grad_loss_curves ;;
    decode-int8)  # issue 16, P9: int8 weight-only decoding (--int8): its GPU test, then P9 with an int8 row
      python3 -m pytest -m gpu tests/gpu/test_int8_gpu.py -q -p no:cacheprovider 2>&1 | tail -3
      python3 benchmarks/p9_generate.py --cuda-graph on --compile-step --hf-modes static-compile --int8 \
          --json "$OUT/p9_int8.json" 2>&1 | tail -12 ;;
    decode-profile)  # issue 16, P9: GPU time of each kernel of the captured decode step, phase7 and llama 1.5B
      python3 benchmarks/decode_profile.py --tokens 64 --top 25 --json "$OUT/decode_profile.json" 2>&1 | tail -60 ;;
    ssm-fla)      # issue 16: [kernels] ar_ssm_scan = "fla" (needs fla-core): its gate, the scan's rows and P5
                  # with fla beside our schedules, then the 1.5B step with each scan in one process
      python3 -m pytest -m gpu tests/gpu/test_ar_ssm_scan_fla_gpu.py -q -p no:cacheprovider 2>&1 | tail -3
      python3 benchmarks/kernels.py --ssm-only --out "$OUT/ssm_fla" 2>&1 | tail -12
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 6 --warmup 2 --repeat 2 \
          --set 'kernels.ar_ssm_scan="fla"' --compare recipes/phase7_1.5b_standard.toml \
          --json "$OUT/ssm_fla_ab.json" 2>&1 | tail -12 ;;
    ssm-tf32)     # issue 16: the scan's TF32 dots (the default since 2026-12-08) against "ieee": the 1.5B
                  # step A/B in one process, then item 5's check, 300 phase7_small steps each way
      $P7 bench recipes/phase7_1.5b_standard.toml --batch-size 8 --grad-accum 1 --steps 6 --warmup 2 --repeat 2 \
          --set 'kernels.ar_ssm_scan={impl = "auto", precision = "tf32"}' --compare recipes/phase7_1.5b_standard.toml \
          --compare-set 'kernels.ar_ssm_scan={impl = "auto", precision = "ieee"}' \
          --json "$OUT/ssm_tf32_ab.json" 2>&1 | tail -12
      loss_curves ssm_tf32 ieee 'kernels.ar_ssm_scan={impl = "auto", precision = "ieee"}' \
          tf32 'kernels.ar_ssm_scan={impl = "auto", precision = "tf32"}' ;;
    hla-profile)  # issue 18: where the Phase 8 op's time goes (eager, compiled; a profiler table of each)
      python3 benchmarks/kernels.py --hla-profile --out "$OUT/hla_profile" 2>&1 | tail -60 ;;
    hla-sweep)    # issue 18: Phase 8 kernel launch candidates as GPU time next to SDPA cuDNN
      python3 benchmarks/kernels.py --hla-sweep --out "$OUT/hla_sweep" 2>&1 | tail -6 ;;
    small-gpu-speed)  # issue 16 item 4: the 10 GiB recipe at batch 1 x 16 against the standard recipe at
                      # the same batch, with a profile, then with half the blocks checkpointed
      $P7 bench recipes/phase7_1.5b_standard.toml --steps 2 --warmup 1 --json "$OUT/sg_standard.json" 2>&1 | tail -6
      $P7 bench recipes/phase7_1.5b.toml --memory-cap-gib 10 --steps 2 --warmup 1 --profile /tmp/psg \
          --json "$OUT/sg_10g.json" 2>&1 | tail -8
      cat /tmp/psg/*.ops.txt > "$OUT/sg_10g_ops.txt"
      $P7 bench recipes/phase7_1.5b.toml --memory-cap-gib 10 --steps 2 --warmup 1 --set train.checkpoint_every=2 \
          --json "$OUT/sg_10g_every2.json" 2>&1 | tail -6 ;;
    *) echo "unknown stage $stage (gpu-tests kernels attention-sweep decode small-gpu small-gpu-speed quality model-quality phase8 throughput max-params conv p1 attention-grad-bf16 attention-grad-bf16-loss hla-profile hla-sweep decode-int8 decode-profile ssm-fla ssm-tf32)"; exit 2 ;;
  esac
done

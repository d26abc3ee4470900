#!/usr/bin/env bash
# The SmolLM2-135M table of benchmarks/RESULTS.md ("Sparsity plus quantisation"): each row is one
# `oneshot prune` run (calibration 16 x 256 wiki-offline and 16 evaluation windows of 256 tokens, as in
# experiments/quickstart.yaml; fp32 on CPU), saved in the format named; then packed checkpoints are reloaded
# in a fresh process
# (`oneshot eval`) to check its perplexity against the run's. Usage: benchmarks/quant_table.sh OUT_DIR
set -euo pipefail
OUT=${1:-runs/quant}
COMMON=(--model smollm2-135m --calibration wiki-offline --nsamples 16 --seqlen 256 --eval-samples 16 --quiet --overwrite)
RUN() { local name=$1; shift; if [ -e "$OUT/$name/result/result.json" ]; then echo "done already: $name"; return; fi
        echo "== $name: oneshot prune $* --output $OUT/$name/result --save-model $OUT/$name/model"
        nice -n 10 env OMP_NUM_THREADS=1 python -m oneshot prune "${COMMON[@]}" "$@" --output "$OUT/$name/result" \
            --save-model "$OUT/$name/model"; }
RUN dense-fp32        --method dense --dtype float32
RUN dense-bf16        --method dense --dtype bfloat16
RUN sgpt-50           --method sparsegpt --sparsity 0.5
RUN sgpt-24           --method sparsegpt --pattern 2:4
RUN int8              --method dense --quantize int8 --symmetric --format compressed-tensors
RUN int4-g64          --method dense --quantize int4 --group-size 64 --symmetric --format compressed-tensors
RUN int4-g64-rtn      --method dense --quantize int4 --group-size 64 --symmetric --quant-method rtn --format compressed-tensors
RUN sgpt-50-int4-joint --method sparsegpt --sparsity 0.5 --quantize int4 --group-size 64 --symmetric --quant-method joint --format compressed-tensors
RUN sgpt-50-int4-seq  --method sparsegpt --sparsity 0.5 --quantize int4 --group-size 64 --symmetric --quant-method gptq --format compressed-tensors
RUN sgpt-24-int4-joint --method sparsegpt --pattern 2:4 --quantize int4 --group-size 64 --symmetric --quant-method joint --format compressed-tensors
RUN sgpt-50-q4_0      --method sparsegpt --sparsity 0.5 --quantize int4 --group-size 32 --symmetric --format gguf
for name in int8 sgpt-24-int4-joint; do
  echo "== reload $name: oneshot eval --pruned $OUT/$name/model"
  nice -n 10 env OMP_NUM_THREADS=1 python -m oneshot eval --pruned "$OUT/$name/model" --seqlen 256 --eval-samples 16 \
      --quiet --output "$OUT/$name/reload"
done
for name in sgpt-50-q4_0; do
  echo "== reload $name: oneshot eval --model $OUT/$name/model/model.gguf"
  nice -n 10 env OMP_NUM_THREADS=1 python -m oneshot eval --model "$OUT/$name/model/model.gguf" --seqlen 256 \
      --eval-samples 16 --quiet --output "$OUT/$name/reload"
done

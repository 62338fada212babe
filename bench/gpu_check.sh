#!/usr/bin/env bash
# One call on a lent GPU machine (keep it under ~9 minutes): the CUDA tests, then the GPU benchmarks.
# Results land under $OUT. The machine has no registry access: it uses its own python3 with the
# checkout on PYTHONPATH (openai is not needed: tests/test_serve.py is not run here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetier-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests
{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
  > "$OUT/env.txt" 2>&1
# parity, batching and packed loading on CUDA (issues 2 and 4)
timeout 150 python3 -m pytest -q tests/test_cuda.py tests/test_packed.py -k "cuda or Cuda" > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
tail -3 "$OUT/tests.txt"
# load time into GPU memory: packed vs safetensors (issue 4)
timeout 90 python3 bench/load.py --device cuda --size-gib 2 --repeats 2 --dir /tmp/moetier-bench-load \
  > "$OUT/load.jsonl" 2> "$OUT/load.err"
echo "load rc=$?" >> "$OUT/load.err"
# throughput runner (issue 6) with a device budget of half the model: experts streamed from the packed file
timeout 170 python3 bench/throughput.py --device cuda --parts b --threads 8 --prompts 512 --new-tokens 64 \
  --dir /tmp/moetier-bench-throughput > "$OUT/throughput.jsonl" 2> "$OUT/throughput.err"
echo "throughput rc=$?" >> "$OUT/throughput.err"
tail -1 "$OUT/throughput.jsonl"
# offloaded decode latency (issue 5): a 16-layer Mixtral (~2.8 GiB) with a 1 GiB GPU budget and a 1 GiB pinned
# host tier, moetier vs accelerate with the same GPU/CPU split and disk offload
timeout 170 python3 bench/latency.py --device cuda --layers 16 --budget 1GiB --host-memory 1GiB --rounds 1 \
  --policies activation lru --prefetch lookahead none --acc-modes none --skip-demo --threads 8 \
  --dir /tmp/moetier-bench-latency > "$OUT/latency.jsonl" 2> "$OUT/latency.err"
echo "latency rc=$?" >> "$OUT/latency.err"
tail -1 "$OUT/latency.jsonl"

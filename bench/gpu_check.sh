#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the GPU benchmarks; results under $OUT.
# The machine has no registry access: it uses its own python3 with the checkout on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetier-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests
{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
  > "$OUT/env.txt" 2>&1
timeout 300 python3 -m pytest -q tests/test_cuda.py tests/test_parity_mixtral.py -x > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
tail -3 "$OUT/tests.txt"
# throughput runner (issue 6) with a device budget of half the model: experts streamed from the packed file
timeout 420 python3 bench/throughput.py --device cuda --parts b --threads 8 --prompts 512 --new-tokens 64 \
  --dir /tmp/moetier-bench-throughput > "$OUT/throughput.jsonl" 2> "$OUT/throughput.err"
echo "throughput rc=$?" >> "$OUT/throughput.err"
tail -1 "$OUT/throughput.jsonl"

#!/usr/bin/env bash
# One prepared GPU session, under 10 minutes: install, nvidia-smi, the cross-encoder's rates (training
# pairs/s; scoring fp32 vs bf16 autocast; FLOP utilisation against the card's peak), the demo end to end on
# the GPU, and optionally the quality benchmark's full mode; writes docs/benchmarks/gpu.json, which
# docs/deploy.md quotes. From the repository root, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh
#   WHEELS=.whl bash benchmarks/gpu.sh   # no registry reachable: adrank's missing dependencies from a wheel folder
#   QUALITY=1 bash benchmarks/gpu.sh     # + benchmarks/quality.py (one seed, full mode) in the time left,
#                                        #   if ../shared/datasets/ml-100k exists
# A CUDA torch already installed (any >= 2.4) is kept and its version recorded; otherwise torch==2.13.0 comes
# from the CUDA 13.0 index (deploy/Dockerfile's). Each step has a timeout; one that fails or times out is
# recorded in the JSON with its exit code, and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-570}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/adrank-gpu}
OUT_JSON=${OUT_JSON:-docs/benchmarks/gpu.json}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu130}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$WORK" && mkdir -p "$WORK"
left() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, log to $WORK/NAME.log, record rc and seconds
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  echo "== $name (timeout ${limit}s, $(left)s left)"
  timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - started))}" >"$WORK/$name.step.json"
  echo "== $name: exit $rc after $((SECONDS - started))s"
}

# 1. install
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  step install_torch 300 "$PYTHON" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
fi
if [ -n "${WHEELS:-}" ]; then
  step install_adrank 120 "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation -e .
else
  step install_adrank 240 "$PYTHON" -m pip install -q -e .
fi

# 2. the card
nvidia-smi | tee "$WORK/nvidia-smi.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv >"$WORK/gpu.csv"

# 3. rates and utilisation (the packaged MiniLM-L6; ADRANK_GPU_MODEL names another folder)
step rates 240 "$PYTHON" benchmarks/gpu_rates.py --device cuda --pairs 20000 --train-batch 64 --train-steps 100 \
  --score-batch 512 --out "$WORK/rates.json" ${ADRANK_GPU_MODEL:+--model "$ADRANK_GPU_MODEL"}

# 4. the demo end to end on the GPU: sample data, retrain (fine-tune, two-tower, gates), rerank
demo_limit=$(($(left) - 30))
if [ "$demo_limit" -gt 60 ]; then
  step demo "$((demo_limit < 300 ? demo_limit : 300))" env ADRANK_HOME="$WORK/demo" "$PYTHON" -m flows.cli demo
fi

# 5. optional: quality, full mode, one seed, into $WORK (docs/benchmarks.md stays as it is)
if [ "${QUALITY:-0}" = 1 ] && [ -d ../shared/datasets/ml-100k ] && [ "$(left)" -gt 120 ]; then
  step quality "$(($(left) - 20))" "$PYTHON" benchmarks/quality.py --data ../shared/datasets/ml-100k --seeds 42 \
    --work "$WORK/quality" --out-dir "$WORK/quality-docs"
fi

# 6. one JSON
"$PYTHON" - "$WORK" "$OUT_JSON" <<'EOF'
import csv, json, sys, time
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "bash benchmarks/gpu.sh"}
rows = list(csv.DictReader((work / "gpu.csv").read_text().splitlines(), skipinitialspace=True))
result["gpu"] = rows[0] if rows else None
result["steps"] = {p.name.removesuffix(".step.json"): json.loads(p.read_text()) for p in sorted(work.glob("*.step.json"))}
if (work / "rates.json").exists():
    result["rates"] = json.loads((work / "rates.json").read_text())
quality = sorted((work / "quality-docs").glob("benchmarks/quality-*.json")) if (work / "quality-docs").exists() else []
if quality:
    result["quality"] = {"file": quality[0].name, "result": json.loads(quality[0].read_text())}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}")
EOF
echo "done in ${SECONDS}s"

#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, prove the scale paths with the real engines.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, venv active or .venv present
#   MODEL=local:smollm2 STEPS=20 bash benchmarks/gpu_check.sh
#
# 1. vLLM's OpenAI server (if `pip install vllm` works here) serving SmolLM2 from its embedded
#    copy, and one eval through `openai:` against it: items/s and output tokens/s.
#    Without vLLM, the same eval against `flywheel serve-model` on the GPU instead.
# 2. One SFT under `accelerate launch` on 1 GPU (--launcher accelerate --num-processes 1): tokens/s
#    from the trainer's own runtime.
# Prints a summary table at the end. Writes everything under $OUT (default: a temp folder).
#
# NOT RUN YET: no GPU machine was lent when this was written (see docs/scale.md). Each step was
# run on CPU here in its CPU form; the GPU forms are what this script adds.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"; [ -x "$PY" ] || PY="$(command -v python3)"
OUT="${OUT:-$(mktemp -d)}"
STEPS="${STEPS:-20}"
LIMIT="${LIMIT:-100}"
PORT="${PORT:-8123}"
SPEC="$ROOT/evals/banking77/eval.yaml"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" FLYWHEEL_DB="$OUT/flywheel.db"
mkdir -p "$OUT"; cd "$OUT" || exit 1
log() { echo "[gpu_check $(date +%T)] $*" >&2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { log "no nvidia-smi: not a GPU machine"; exit 1; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

# The embedded SmolLM2 as a plain folder (vLLM loads folders; nothing is downloaded).
MODEL_DIR="$("$PY" -c "from flywheel.models.loading import materialise_embedded; print(materialise_embedded('smollm2'))")"
log "model folder: $MODEL_DIR"

# -- 1. generation: vLLM's OpenAI server, else serve-model -------------------------------------
ENGINE=vllm
if ! "$PY" -c "import vllm" 2>/dev/null; then
    log "installing vllm (may take minutes)"; "$PY" -m pip install --quiet vllm >"$OUT/pip_vllm.log" 2>&1 || true
fi
if "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name smollm2 \
        --port "$PORT" --gpu-memory-utilization 0.5 --max-model-len 2048 >"$OUT/server.log" 2>&1 &
else
    ENGINE="flywheel serve-model (vllm not installable: see $OUT/pip_vllm.log)"
    "$PY" -m flywheel serve-model local:smollm2 --name smollm2 --port "$PORT" -o device=cuda >"$OUT/server.log" 2>&1 &
fi
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null || { log "server did not come up: $(tail -5 "$OUT/server.log")"; exit 1; }
log "eval through $ENGINE"
"$PY" -m flywheel eval "$SPEC" --limit "$LIMIT" --json -s model=openai:smollm2 \
    -s "model_options.base_url=http://127.0.0.1:$PORT/v1" -s model_options.concurrency=64 >"$OUT/eval.json" || exit 1
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null

# -- 2. SFT under accelerate on 1 GPU ---------------------------------------------------------
log "capture + SFT under accelerate launch (1 GPU)"
"$PY" -m flywheel capture "$SPEC" --teacher reference:label --json >"$OUT/capture.json" || exit 1
"$PY" -m flywheel train sft "$SPEC" --base local:smollm2 --no-eval --json -s max_steps="$STEPS" \
    -s batch_size=8 --launcher accelerate --num-processes 1 >"$OUT/train.json" || exit 1

# -- summary ------------------------------------------------------------------------------------
"$PY" - "$OUT" "$ENGINE" <<'PYEOF'
import json, sys, pathlib
out, engine = pathlib.Path(sys.argv[1]), sys.argv[2]
ev = json.loads((out / "eval.json").read_text())
tr = json.loads((out / "train.json").read_text())
m = tr["metrics"]
print(f"\n| check | figure |\n|---|---|")
print(f"| eval via {engine} | {ev['n_samples'] / ev['wall_s']:.1f} items/s, "
      f"{ev['completion_tokens'] / ev['wall_s']:.0f} output tokens/s, pass rate {ev['pass_rate']:.3f} |")
import sqlite3
steps, runtime = m.get("steps"), m.get("runtime_s") or m.get("wall_s")
with sqlite3.connect(out / "flywheel.db") as db:  # TRL logs the tokens it has trained on
    logged = [json.loads(r[0]) for r in db.execute(
        "select data_json from training_events where job_id = ? and type = 'metrics'", (tr["job_id"],))]
tokens = max((d.get("num_tokens") or 0 for d in logged), default=0)
print(f"| SFT, accelerate, {m.get('processes')} process(es) | {steps} steps in {runtime:.1f} s, "
      f"{tokens / runtime:.0f} tokens/s ({tokens:.0f} tokens), loss {m.get('first_loss')} -> {m.get('last_loss')} |")
print(f"| checkpoint | {tr['checkpoint']['id']} adapter {tr['checkpoint']['adapter_hash']} |")
PYEOF
log "outputs in $OUT"

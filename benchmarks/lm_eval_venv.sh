#!/usr/bin/env bash
# A scratch venv with lm-evaluation-harness for `benchmarks/eval_throughput.py --lm-eval PYTHON`.
#
#   bash benchmarks/lm_eval_venv.sh [VENV] [BASE_VENV]
#   .venv/bin/python benchmarks/eval_throughput.py --lm-eval VENV/bin/python
#
# VENV (default ../lmeval-venv beside the checkout) must lie outside the repository: lm_eval is no
# dependency of this project. The new venv sees BASE_VENV's site-packages (default .venv) through a
# .pth file, so torch and transformers count as installed and are not downloaded again (pip is
# checked with --dry-run first and the script stops if it would install torch or transformers);
# lm_eval and its remaining dependencies go into VENV only, ahead of BASE_VENV's on the path.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(realpath -m "${1:-$ROOT/../lmeval-venv}")"
BASE="$(realpath -m "${2:-$ROOT/.venv}")"
LM_EVAL="${LM_EVAL_VERSION:-0.4.13}"

case "$VENV/" in
  "$ROOT"/*) echo "error: $VENV is inside the repository; put the scratch venv outside it" >&2; exit 1 ;;
esac
if [ ! -x "$BASE/bin/python" ]; then
  echo "error: $BASE/bin/python not found; give the project's venv as the second argument" >&2
  exit 1
fi

"$BASE/bin/python" -m venv "$VENV"
base_site="$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
venv_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$venv_site/flywheel-base-venv.pth"
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

plan="$("$VENV/bin/pip" install --dry-run --quiet --report - "lm_eval==$LM_EVAL" 2>/dev/null \
  | "$VENV/bin/python" -c 'import json, sys; print(" ".join(i["metadata"]["name"] for i in json.load(sys.stdin)["install"]))')"
echo "pip would install: $plan"
for heavy in torch transformers; do
  if printf ' %s ' "$plan" | grep -qi " $heavy "; then
    echo "error: pip would install $heavy into the scratch venv; is $BASE the project's venv?" >&2
    exit 1
  fi
done
"$VENV/bin/pip" install --quiet "lm_eval==$LM_EVAL"
"$VENV/bin/python" -c 'import importlib.metadata as m; print("lm_eval", m.version("lm_eval"))'
echo "ready: .venv/bin/python benchmarks/eval_throughput.py --lm-eval $VENV/bin/python"

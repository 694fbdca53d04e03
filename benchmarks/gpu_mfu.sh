#!/usr/bin/env bash
# MFU proof on one GPU: a ~1 B-parameter Llama-shaped causal LM built from a config (random
# init, nothing downloaded) trained by `zerotune train` at bf16, ZeRO-2, for a few hundred
# steps; prints tokens/s, TFLOP/s per device and MFU. Target: under 8 minutes on an
# H100-class GPU (MFU aim: >= 45 % on an H200). Self-contained for an offline machine: wheels
# in .whl/ (benchmarks/gpu_prepare.sh) are installed with --no-index, the data is generated.
#
#   bash benchmarks/gpu_mfu.sh              # the real run (GPU)
#   bash benchmarks/gpu_mfu.sh --dry-run    # the same path with a tiny model for a few steps (CPU ok)
#
# The model: builtin:tiny-llama scaled through model.builtin to TinyLlama-1.1B's shape (22
# layers, hidden 2048, SwiGLU 5632, 32 heads, 4 KV heads) with the word-level vocabulary
# zerotune builds from the data (8 000 words + specials: ~1.0 B parameters). The data: rows of
# MFU_SEQ random words, so every sequence is exactly MFU_SEQ tokens (no padding, none wasted).
# FLOPs per token: the run's own accounting (results.json throughput.tflops_per_device / mfu,
# trainer/flops.py) when present; else 6 N + 12 L h s (weights forward + backward, and the
# attention scores and values of a full s × s product, PaLM's convention) over a dense bf16
# peak (H100 / H200 989 TFLOP/s, A100 312; MFU_PEAK_TFLOPS overrides).
#
# Environment (all optional): MFU_STEPS (300), MFU_SEQ (2048), MFU_MICRO (8), MFU_GLOBAL (16),
# MFU_LAYERS (22), MFU_HIDDEN (2048), MFU_FFN (5632), MFU_HEADS (32), MFU_KV_HEADS (4),
# MFU_PEAK_TFLOPS, MFU_DIR (runs/gpu_mfu), MFU_INSTALL (1; 0 skips the offline install), PYTHON.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then # the same path, tiny: the builtin tiny-llama shape, a few short steps
    : "${MFU_STEPS:=6}" "${MFU_SEQ:=64}" "${MFU_MICRO:=4}" "${MFU_GLOBAL:=8}" "${MFU_LAYERS:=2}"
    : "${MFU_HIDDEN:=128}" "${MFU_FFN:=256}" "${MFU_HEADS:=4}" "${MFU_KV_HEADS:=2}"
fi
STEPS=${MFU_STEPS:-300}
SEQ=${MFU_SEQ:-2048}
MICRO=${MFU_MICRO:-8}
GLOBAL=${MFU_GLOBAL:-16}
DIR=${MFU_DIR:-$ROOT/runs/gpu_mfu}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ZEROTUNE_CACHE=${ZEROTUNE_CACHE:-$DIR/cache}

# ---- install what an offline GPU image lacks (as benchmarks/gpu_check.sh) ---------------
if [ "${MFU_INSTALL:-1}" != 0 ] && [ $DRY = 0 ]; then
    shopt -s nullglob
    wheels=("$ROOT"/.whl/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps "${wheels[@]}" \
            >"$DIR/pip.log" 2>&1 || echo "warning: some wheels did not install (see $DIR/pip.log)"
    fi
    "$PY" -c "import trainer, deepspeed, datasets, pydantic" 2>/dev/null ||
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$DIR/pip.log" 2>&1 || true
fi

# ---- data: rows of SEQ random words (every sequence SEQ tokens long) ---------------------
ROWS=$((STEPS * GLOBAL + 64))
DATA=$DIR/lm_${ROWS}x${SEQ}.jsonl
if [ ! -f "$DATA" ]; then
    "$PY" - "$DATA" "$ROWS" "$SEQ" <<'EOF'
import json, sys

import numpy as np

path, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
words = np.array([f"w{i}" for i in range(8000)])
with open(path + ".tmp", "w") as f:
    for _ in range(rows):
        f.write(json.dumps({"text": " ".join(words[rng.integers(0, len(words), seq)])}) + "\n")
import os

os.replace(path + ".tmp", path)
EOF
fi

# ---- train ----------------------------------------------------------------------------------
ARCH="{hidden_size: ${MFU_HIDDEN:-2048}, intermediate_size: ${MFU_FFN:-5632}, num_hidden_layers: ${MFU_LAYERS:-22}, num_attention_heads: ${MFU_HEADS:-32}, num_key_value_heads: ${MFU_KV_HEADS:-4}}"
RUN=$DIR/run
echo "gpu_mfu: $STEPS steps of $GLOBAL × $SEQ tokens (micro $MICRO), bf16, ZeRO-2, model.builtin $ARCH"
set +e
"$PY" -m launcher train --nproc-per-node 1 --run-dir "$RUN" --resume never \
    --set task=causal_lm --set precision=bf16 --set zero.stage=2 \
    --set model.name_or_path=builtin:tiny-llama --set "model.builtin=$ARCH" \
    --set "data.train=$DATA" --set data.text_column=text --set "data.max_length=$SEQ" \
    --set data.validation_fraction=0.02 --set data.max_eval_samples=16 \
    --set "train.max_steps=$STEPS" --set "train.micro_batch_size=$MICRO" \
    --set "train.global_batch_size=$GLOBAL" --set train.lr=3e-4 --set train.warmup_steps=10 \
    --set eval.every_steps=null --set checkpoint.every_steps=null \
    --set checkpoint.export_final=false --set logging.every_steps=10 \
    --set logging.progress_bar=false --set logging.tensorboard=false \
    >"$DIR/train.log" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
    tail -n 40 "$DIR/train.log"
    echo "gpu_mfu: training failed (exit $rc; log $DIR/train.log)"
    exit $rc
fi

# ---- figures --------------------------------------------------------------------------------
"$PY" - "$RUN" "$SEQ" "$(($(date +%s) - START))" <<'EOF'
import json, os, sys
from pathlib import Path

run, seq, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = json.loads((run / "results.json").read_text())
env = json.loads((run / "env.json").read_text())
cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [r for r in recs if r.get("kind") == "train"]
timed = train[1:] or train  # the first log window holds the warm-up steps
tokens_s = sum(r["tokens_per_s"] for r in timed) / len(timed)
n = env["parameters"]
arch = cfg["model"]["builtin"]
layers, hidden = arch["num_hidden_layers"], arch["hidden_size"]
flops_per_token = 6 * n + 12 * layers * hidden * seq
name = env.get("device_name", "")
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
peak = os.environ.get("MFU_PEAK_TFLOPS")
peak = float(peak) * 1e12 if peak else next((v for k, v in PEAK.items() if k in name.upper()), None)
tp = results.get("throughput", {})
own = flops_per_token * tokens_s / 1e12  # TFLOP/s per device by 6N + 12·L·h·s
if tp.get("tflops_per_device") is not None:  # the run's own accounting (trainer/flops.py)
    tflops, mfu = tp["tflops_per_device"], tp.get("mfu")
    source = f"results.json; 6N + 12·L·h·s gives {own:.4g}"
else:
    tflops, mfu, source = own, (own * 1e12 / peak if peak else None), "6N + 12·L·h·s"
if os.environ.get("MFU_PEAK_TFLOPS") and peak:
    mfu = tflops * 1e12 / peak
print(
    f"gpu_mfu: {name or 'unknown device'}; {n / 1e9:.3f} B parameters; "
    f"{tokens_s:,.0f} tokens/s; {tflops:.4g} TFLOP/s per device ({source}); "
    + (f"MFU {100 * mfu:.1f} %" if mfu is not None else "MFU n/a (set MFU_PEAK_TFLOPS)")
    + f"; {results['steps']} steps; wall {wall} s; final loss {train[-1]['loss']:.3f}"
)
EOF

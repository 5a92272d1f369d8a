#!/usr/bin/env bash
# Run the GPU tests and the GPU benchmark on a machine that has a GPU, PyTorch and Triton
# but no package index (the lent H100/H200 machines: Python 3.12, torch 2.11+cu130).
#
#   tools/gpu-machine.sh fetch          # here, with an index: wheels for what that machine lacks -> .whl/
#   tools/gpu-machine.sh test           # there: install .whl/ into /tmp/site, then make test-gpu
#   tools/gpu-machine.sh bench [args]   # there: install .whl/, then bench/gpu.py [args]
#   tools/gpu-machine.sh bench-quant    # there: install .whl/, then bench/quant.py --gpu (fp8 vs fp16)
#   tools/gpu-machine.sh pytest [args]  # there: install .whl/, then pytest with these arguments
#   tools/gpu-machine.sh trust          # there: issue 21's check, 3 default runs in a row at batch 1 and 32
#   tools/gpu-machine.sh smoke          # there: the issue's command, resnet50 fp16 with target=auto
#   tools/gpu-machine.sh sweep-gpus     # there: issue 24's 4-job joblib sweep on 1 GPU, then on up to 4
#   tools/gpu-machine.sh fetch-ort      # here: onnxruntime-gpu (CUDA 13) as tar.xz in four parts -> .ortgpu/pN
#   tools/gpu-machine.sh join-ort       # there: join the parts and unpack them into /tmp/site-ort
#
# A device call carries at most 64 MiB. The wheel is 255 MB (zip); unpacked, without the TensorRT
# provider library (no TensorRT there) and recompressed with xz it is 203 MB, so it travels in four
# calls, one ~48 MiB part each (carry .ortgpu/p1, then .ortgpu/p2, ...; ignored paths stay there between
# calls of one machine, which goes back after 30 s idle: make the calls back to back);
# once joined, `test` and `bench` put it ahead of the machine's CPU-only onnxruntime.
#
# Wheels are pure Python (the machine has numpy, onnx, onnxscript, onnxruntime, transformers);
# antlr4-python3-runtime 4.9.3 ships only as a source archive, so `fetch` builds its wheel.
# MLflow and its server stack are not carried (about 100 MB with pyarrow and pandas): runs
# there use tracking.enabled=false, and `python -m pipeline.tracking sync` records them later.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
SITE=/tmp/site
ORT_SITE=/tmp/site-ort
ORT_GPU=onnxruntime-gpu==1.31.1
PY=${PY:-python3}
PACKAGES=(hydra-core==1.3.2 omegaconf==2.3.0 rich==13.9.4 markdown-it-py==3.0.0 mdurl==0.1.2
          pygments==2.19.1 pytest==8.3.5 pluggy==1.5.0 iniconfig==2.0.0
          # Torch-TensorRT's int8/fp8 route quantizes the module with modelopt in export (~57 MB,
          # scipy the most of it; install() skips what the machine has).
          nvidia-modelopt==0.47.0 nvidia-ml-py==13.615.71 pulp==3.3.2 ninja==1.13.2 pydantic==2.14.4
          pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 scipy==1.18.1
          # target=inductor's fp8/int8 on CUDA (pipeline.quantize.torchao_gpu): torchao 0.17 is built
          # against torch 2.11, the machine's (0.18 needs 2.12+); 3 MB, its CUDA kernels unused.
          torchao==0.17.0
          # sweep=parallel (Hydra's joblib launcher), for the GPU lease's sweep (sweep-gpus, tests/test_gpu.py)
          hydra-joblib-launcher==1.2.0 joblib==1.5.3)

fetch() {
    mkdir -p "$WHEELS"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$WHEELS" "${PACKAGES[@]}"
    python3 -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
    du -sh "$WHEELS"
}

install() {
    # Only what the machine lacks: its own torch, numpy, onnx and PyYAML stay in charge.
    local missing=()
    for whl in "$WHEELS"/*.whl; do
        local dist
        dist=$(basename "$whl" | cut -d- -f1)
        $PY -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$whl")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}"
    fi
    export PYTHONPATH="$SITE:$ORT_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
}

fetch_ort() {
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$tmp" "$ORT_GPU"
    mkdir "$tmp/site" && (cd "$tmp/site" && python3 -m zipfile -e "$tmp"/*.whl . \
        && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so)
    rm -rf .ortgpu && mkdir -p .ortgpu
    tar -C "$tmp/site" -cf - . | xz -T0 -9 > "$tmp/ort.tar.xz"
    (cd .ortgpu && split -n 4 -d -a 1 "$tmp/ort.tar.xz" part && for i in 0 1 2 3; do
        mkdir -p "p$((i + 1))" && mv "part$i" "p$((i + 1))/"; done)
    rm -rf "$tmp"
    du -sh .ortgpu/p*
}

join_ort() {
    rm -rf "$ORT_SITE" && mkdir -p "$ORT_SITE"
    cat .ortgpu/p*/part* | xz -d | tar -C "$ORT_SITE" -xf -
    # Its CUDA provider loads cuDNN and cuBLAS from the nvidia-* wheels torch brought: import torch first.
    PYTHONPATH="$ORT_SITE" $PY -c "import torch, onnxruntime as o; print(o.__version__, o.get_available_providers())"
}

# Issue 24: the same 4-job sweep (distinct weights: no job waits on another's build) with gpus=[0] and
# with up to 4 GPUs, fresh caches each; prints each sweep's wall time and each job's GPU and lease interval.
sweep_gpus() {
    local count list n gpus out
    count=$(nvidia-smi -L | grep -c '^GPU ')
    list=$(seq -s, 0 $(( (count < 4 ? count : 4) - 1 )))
    for gpus in $(printf '%s\n' 0 "$list" | uniq); do
        n=$(echo "$gpus" | tr , '\n' | wc -l)
        out=/tmp/gl-$n && rm -rf "$out"
        SECONDS=0
        TORCHINDUCTOR_CACHE_DIR=$out/inductor PIPELINE_STATE_DIR=$out/state $PY -m pipeline -m sweep=parallel \
            hydra.launcher.n_jobs=4 model=resnet50 model.seed=0,1,2,3 target=inductor compile.precision=fp16 \
            "gpus=[$gpus]" tracking.enabled=false paths.outputs="$out" hydra.sweep.dir="$out/sweep" > "$out.log" 2>&1 \
            || { tail -30 "$out.log"; return 1; }
        echo "gpus=[$gpus]: wall ${SECONDS} s"
        $PY -c 'import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/sweep/*/run.json")):
    r = json.load(open(f)); t = r["tags"]
    print(f, r["status"], t.get("gpu.index"), t.get("gpu.uuid"), t.get("gpu.visible"), t.get("gpu.lease.start"),
          t.get("gpu.lease.end"), t.get("gpu.lease.waited_s"), r["metrics"].get("latency_p50_ms"))' "$out"
    done
}

# Issue 21: ResNet-50 fp16 on the default GPU mode (target=auto), three runs in a row at batch 1 and at
# batch 32 on one cache; prints each run's GPU compute and host medians, the rounds' spread and whether
# the tool trusted it, then how far the three medians of each batch lie apart.
trust() {
    local out=/tmp/trust b i
    rm -rf "$out" && mkdir -p "$out"
    for b in 1 32; do
        for i in 1 2 3; do
            $PY -m pipeline model=resnet50 compile.precision=fp16 tracking.enabled=false \
                "input.tensors=[{name: x, shape: [$b, 3, 224, 224]}]" paths.outputs="$out/b$b-$i" \
                paths.cache="$out/cache" > "$out/b$b-$i.log" 2>&1 || { tail -20 "$out/b$b-$i.log"; return 1; }
        done
    done
    $PY - "$out" <<'PYEOF'
import glob, json, sys
for b in (1, 32):
    medians = []
    for i in (1, 2, 3):
        (f,) = glob.glob(f"{sys.argv[1]}/b{b}-{i}/runs/*/*/run.json")
        r = json.load(open(f)); m, t = r["metrics"], r["tags"]
        medians.append(m["latency_p50_ms"])
        print(f"batch {b} run {i}: {t.get('target.mode')} gpu p50 {m['latency_p50_ms']:.3f} p99 "
              f"{m['latency_p99_ms']:.3f} host p50 {m.get('host_latency_p50_ms', 0):.3f} ms, rounds' spread "
              f"{m['latency_median_spread']:.2%}, trusted {t['latency.trusted']}, eager p50 "
              f"{m['eager/latency_p50_ms']:.3f} ms, speedup {m['speedup']:.2f}x, "
              f"build {'hit' if m.get('build_cache_hit') else 'built'}")
    print(f"batch {b}: the three medians lie {(max(medians) - min(medians)) / min(medians):.2%} apart")
PYEOF
}

case "${1:-}" in
    fetch) fetch ;;
    fetch-ort) fetch_ort ;;
    join-ort) join_ort ;;
    test) install; make --no-print-directory test-gpu PY="$PY" ;;
    pytest) install; shift; $PY -m pytest "$@" ;;
    bench) install; shift; PYTHONUNBUFFERED=1 $PY bench/gpu.py "$@" ;;
    bench-quant) install; shift; PYTHONUNBUFFERED=1 $PY bench/quant.py --gpu "$@" ;;
    smoke) install; PYTHONUNBUFFERED=1 $PY -m pipeline model=resnet50 compile.precision=fp16 tracking.enabled=false \
               paths.outputs="${OUTPUTS:-/tmp/pipeline-outputs}" ;;
    sweep-gpus) install; sweep_gpus ;;
    trust) install; trust ;;
    *) echo "usage: tools/gpu-machine.sh fetch|fetch-ort|join-ort|test|pytest [args]|bench [bench/gpu.py args]|bench-quant|smoke|sweep-gpus|trust" >&2; exit 2 ;;
esac

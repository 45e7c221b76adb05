#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md, one stage per call of the device tool (each stage
# should fit its 10-minute limit). The generated JPEGs stay in /tmp only while the machine stays
# warm, which is 30 s after a call: make the calls back to back, or each stage generates them again.
#
# Here, once: the device lacks albumentations and pydantic, so fetch cp312 wheels to carry
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 pydantic==2.14.3 \
#     pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
# and, for the real-photo cache benchmark, copy some faces into an ignored folder:
#   echo /.faces/ >> .git/info/exclude; mkdir -p .faces; ls ../shared/data/utkface/*.jpg | head -1400 | xargs cp -t .faces
# and, for the accuracy run, the faces, mask templates and tools of ../shared (32 MB, never committed):
#   echo /.utk/ >> .git/info/exclude; mkdir -p .utk/data; cp -r ../shared/tools .utk/
#   cp -r ../shared/data/utkface ../shared/data/mask_templates .utk/data/
# Then, on the device (carry: [".whl", ".faces"]):
#   bash scripts/gpu_session.sh check        # CUDA tests + the whole suite
#   bash scripts/gpu_session.sh throughput   # bench_throughput at batch 128, and bench_cache
#   bash scripts/gpu_session.sh compile      # bench_throughput at batch 256 with torch.compile
#   bash scripts/gpu_session.sh kfold 1      # 5 folds x 10 epochs, competition size, one fold at a time
#   bash scripts/gpu_session.sh kfold 2      # the same, two folds at once
#   bash scripts/gpu_session.sh accuracy     # issue 14's GPU target (carry: [".whl", ".utk"]): the full
#       real-face build, configs/competition.yaml from scratch with 8 minutes for all folds, held-out F1
set -euo pipefail
stage=${1:?usage: scripts/gpu_session.sh check|throughput|compile|kfold JOBS|accuracy [extra --set overrides]}
shift
out=${OUT:-gpu_out}
mkdir -p "$out"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import albumentations, pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
data=/tmp/mt_bench
mkdir -p "$data"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } | tee "$out/gpu.txt"

case $stage in
check)
    python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    python3 -m pytest -q tests 2>&1 | tee "$out/tests.log"
    ;;
throughput)
    python3 scripts/bench_throughput.py --data "$data" "$@" | tee "$out/throughput_b128.json"
    if [ -d .faces ]; then
        python3 scripts/bench_cache.py --faces .faces --n 1400 --workers 1 4 16 | tee "$out/cache.json"
    fi
    ;;
compile)
    python3 scripts/bench_throughput.py --data "$data" --batch-size 256 --compile "$@" | tee "$out/throughput_b256_compile.json"
    ;;
kfold)
    jobs=${1:?kfold needs the number of folds at once}
    shift
    python3 scripts/bench_kfold.py --data "$data" --jobs "$jobs" "$@" | tee "$out/kfold_jobs$jobs.json"
    ;;
accuracy)
    # LIMIT=N builds from the first N faces only (a dry run on a CPU); TRAIN_LIMIT is mt train's budget,
    # which leaves the build and the submission inside one 10-minute call
    utk=${UTK:-.utk}
    python3 "$utk/tools/build_maskset.py" --faces "$utk/data/utkface" --out /tmp/utkmask --eval-frac 0.2 --seed 0 \
        ${LIMIT:+--limit "$LIMIT"} | tee "$out/build.txt"
    python3 scripts/study_row.py --data /tmp/utkmask --out /tmp/acc_run --config competition \
        --score "$utk/tools/score.py" --set "train.time_limit_s=${TRAIN_LIMIT:-480}" "$@" | tee "$out/accuracy.json"
    cp /tmp/acc_run/round0/summary.json "$out/accuracy_summary.json"
    ;;
*)
    echo "unknown stage: $stage" >&2
    exit 2
    ;;
esac

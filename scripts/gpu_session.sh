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
# Then, on the device (carry: [".whl", ".utk"]; bench_cache reads .faces where it exists, else the
# faces under .utk). An H200 was lent three times (docs/PERFORMANCE.md): on 2026-11-26 `throughput`
# and a spoilt `accuracy`; on 2026-11-27 `cache`, `accuracy` (held-out 0.6657 with efficientnet_b0,
# 7 epochs under the 420-s limit) and a short `compile`; on 2026-11-28 `accuracy --config demo` twice
# (0.6687 in 7 epochs of 15: the small network trained no faster than efficientnet_b0, about 2,000
# img/s, bound by its step at batch 32). So a session with a device now runs, in this order:
#   bash scripts/gpu_session.sh small      # step_overhead (the step alone, eager and as CUDA graphs),
#       then bench_throughput on the demo's network: batch 32 and 128, eager, and each compiled with
#       CUDA graphs (run on a CPU only, at 140 images: about 4 min; on a GPU a guess: 6 minutes):
#       what a step costs, and what buys it back
#   bash scripts/gpu_session.sh accuracy --config demo --set aug.backend=torch --set data.cache_on_device=true \
#       --set data.num_workers=0 --set train.compile=true --set train.compile_mode=reduce-overhead \
#       [--set train.batch_size=128 --set train.lr=LR]
#       # the demo config with whatever `small` showed fastest (docs/RESULTS.md for the batch's LR)
# and, in sessions after that:
#   bash scripts/gpu_session.sh accuracy --set train.compile=true   # competition config, compiled
#   bash scripts/gpu_session.sh kfold 1      # 5 folds x 10 epochs, competition size, one fold at a time
#   bash scripts/gpu_session.sh compile      # bench_throughput at batch 256 with torch.compile, all 18,900
#   bash scripts/gpu_session.sh throughput   # the CUDA tests, bench_throughput at batch 128, bench_cache
#   bash scripts/gpu_session.sh check        # the suite but the CUDA tests and tune (no optuna there)
#   bash scripts/gpu_session.sh kfold 2      # the same, two folds at once
#   bash scripts/gpu_session.sh cache        # bench_cache on 16 cores
# 15 minutes of device time hold the machine's start (about 50 s), the first stage, and the second where
# the first took under about 5 minutes (an `accuracy` stage takes its TRAIN_LIMIT, 420 s, and about
# 2 minutes more; give the second TRAIN_LIMIT=270 when it follows `small`).
set -euo pipefail
stage=${1:?usage: scripts/gpu_session.sh check|throughput|cache|small|compile|kfold JOBS|accuracy [extra --set overrides]}
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
    # the CUDA tests run in `throughput`; tune needs optuna, which the device lacks
    python3 -m pytest -q tests --ignore=tests/test_cuda.py --ignore=tests/test_tune.py 2>&1 | tee "$out/tests.log"
    ;;
throughput)
    # a failing CUDA test is a finding to bring back, not a reason to skip the benchmarks
    python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" || true
    python3 scripts/bench_throughput.py --data "$data" "$@" | tee "$out/throughput_b128.json"
    bash "$0" cache
    ;;
cache)
    faces=.faces
    [ -d "$faces" ] || faces=${UTK:-.utk}/data/utkface
    python3 scripts/bench_cache.py --faces "$faces" --n 1400 --workers 1 4 16 | tee "$out/cache.json"
    ;;
small)
    # the demo config's network, test_efficientnet at 64x64 (docs/RESULTS.md: bound by its step at
    # batch 32 on the H200): first the step alone, eager and as CUDA graphs (docs/PERFORMANCE.md,
    # step_overhead), then bench_throughput over 7,000 generated JPEGs made once
    for extra in "" "--set train.compile=true --set train.compile_mode=reduce-overhead"; do
        python3 scripts/step_overhead.py --config demo --size 64 --batch-size 32 $extra | tee -a "$out/small.json"
    done
    # reduce-overhead: torch.compile's CUDA graphs, one launch for a whole step's kernels
    for extra in "--batch-size 32" "--batch-size 128" "--batch-size 32 --compile --compile-mode reduce-overhead" \
            "--batch-size 128 --compile --compile-mode reduce-overhead"; do
        python3 scripts/bench_throughput.py --data /tmp/mt_bench_small --model test_efficientnet --img-size 64x64 \
            --n-images 7000 $extra "$@" | tee -a "$out/small.json"
    done
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
    # which leaves the build, the start-ups, the decode and the submission (about 2 minutes) inside
    # one 10-minute call
    utk=${UTK:-.utk}
    rm -rf /tmp/utkmask /tmp/acc_run  # a second try on a warm machine starts over, not into the first's run
    python3 "$utk/tools/build_maskset.py" --faces "$utk/data/utkface" --out /tmp/utkmask --eval-frac 0.2 --seed 0 \
        ${LIMIT:+--limit "$LIMIT"} | tee "$out/build.txt"
    status=0
    python3 scripts/study_row.py --data /tmp/utkmask --out /tmp/acc_run --config competition \
        --score "$utk/tools/score.py" --set "train.time_limit_s=${TRAIN_LIMIT:-420}" "$@" | tee "$out/accuracy.json" \
        || status=$?
    # whatever the run left, a failed one too: the log says why, config.yaml the epochs it trained
    cp /tmp/acc_run/round0/summary.json "$out/accuracy_summary.json" || true
    cp /tmp/acc_run/config.yaml "$out/accuracy_config.yaml" || true
    cp /tmp/acc_run/train.log "$out/accuracy_train.log" || true  # the time limit's reckoning among it
    cp /tmp/acc_run/round0/fold0/metrics.csv "$out/accuracy_fold0_metrics.csv" || true  # train_s, validate_s
    exit "$status"
    ;;
*)
    echo "unknown stage: $stage" >&2
    exit 2
    ;;
esac

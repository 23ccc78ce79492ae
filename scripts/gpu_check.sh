#!/usr/bin/env bash
# One-shot GPU timing check for DuoDecoding (issue #8), for a machine with an NVIDIA GPU and
# no network.  Run from the repository root:
#
#     bash scripts/gpu_check.sh .gpu            # .gpu/ from scripts/pack_gpu_bundle.sh
#
# Phases, each with its own time limit inside TOTAL_BUDGET: install the carried wheels,
# build llama-cpp-python with CUDA for this GPU from the trimmed source, install specli,
# write RANDOM-WEIGHT timing models (scripts/make_timing_models.py: the numbers time the
# pipeline, not a real model pair), measure their greedy agreement, then `specli bench`
# with the target on the GPU and the drafter on the CPU.  Everything useful goes to stdout
# as it happens; with $OUT set, the summary and the bench's files are copied there.
#
# Env (defaults in brackets):
#   METHODS [none,draft,duo]  bench methods; ones this specli does not know are dropped,
#                             loudly
#   SKIP_BUILD [0]            1: use the llama-cpp-python $PYTHON already imports (CPU test)
#   NGL [99; 0 with SKIP_BUILD=1]  target layers on the GPU (-ngl; required when > 0)
#   DRAFT_FLAGS [--draft-gpu-layers 0 --draft-threads 8]  each flag the bench lacks is
#                             dropped with a warning
#   THREADS [auto; empty with SKIP_BUILD=1]  --threads for the bench (the target's CPU
#                             threads); auto: `gpu_probe.py speed` times thread splits
#                             (SPEED_TARGET_THREADS x SPEED_DRAFT_THREADS) and the bench
#                             takes the split with the fastest draft or duo round
#   EXTRA_BENCH_FLAGS []      passed to `specli bench` as they are (e.g. "--budget fixed:4")
#   PRESET [gpu; small with SKIP_BUILD=1]  timing-model size; NOISE [generator's default]
#   CATEGORIES [all] LIMIT [1] NTOK [128] REPEATS [1]  the bench's prompts and length
#   QUANT [q4_k_m]            also write llama.cpp-quantised copies of the pair (none: f16 only)
#   PROBES [q:3 q:1 f:3 f:1]  scripts/gpu_probe.py runs, one process each (MODELS:BRANCHES,
#                             q = quantised pair, f = f16 pair), with CUDA_LAUNCH_BLOCKING=1;
#                             the bench runs the first that passed (BENCH_CONFIG overrides)
#   PACK_BUILD [1]            also return the fresh CUDA build in $OUT (xz parts), so a rerun
#                             on a fresh machine carries it in $BUNDLE/build/ and skips the build
#   CUDA_ARCH [from nvidia-smi]  e.g. 90;  CUDA_FA [OFF]  compile FlashAttention kernels
#   JOBS [nproc] BUILD_TIMEOUT [420]  parallel compile jobs, the build's own time limit
#   TOTAL_BUDGET [540]        seconds for the whole run; PYTHON [python3]; WORK [/tmp/specli-gpu]
#   REUSE_BUILD [1]           a rerun on the same machine keeps a finished build
set -uo pipefail

BUNDLE=${1:-.gpu}
REPO=$(pwd)
START=$(date +%s)
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/specli-gpu}
SKIP_BUILD=${SKIP_BUILD:-0}
METHODS=${METHODS:-none,draft,duo}
if [[ $SKIP_BUILD == 1 ]]; then NGL=${NGL:-0}; PRESET=${PRESET:-small}; else
    NGL=${NGL:-99}; PRESET=${PRESET:-gpu}; fi
DRAFT_FLAGS=${DRAFT_FLAGS---draft-gpu-layers 0 --draft-threads 8}
if [[ $SKIP_BUILD == 1 ]]; then THREADS=${THREADS:-}; else THREADS=${THREADS:-auto}; fi
SPEED_TARGET_THREADS=${SPEED_TARGET_THREADS:-1,2,16}
SPEED_DRAFT_THREADS=${SPEED_DRAFT_THREADS:-2,4,8,16}
EXTRA_BENCH_FLAGS=${EXTRA_BENCH_FLAGS:-}
NOISE=${NOISE:-}
CATEGORIES=${CATEGORIES:-}
LIMIT=${LIMIT:-1}
NTOK=${NTOK:-128}
REPEATS=${REPEATS:-1}
CUDA_FA=${CUDA_FA:-OFF}
REUSE_BUILD=${REUSE_BUILD:-1}
QUANT=${QUANT:-q4_k_m}
PROBES=${PROBES:-q:3 q:1 f:3 f:1}
BENCH_CONFIG=${BENCH_CONFIG:-}
PACK_BUILD=${PACK_BUILD:-1}
if [[ $QUANT == none ]]; then  # no quantised pair: drop its probes
    kept=""
    for c in $PROBES; do [[ $c == q:* ]] || kept+="$c "; done
    PROBES=$kept
fi
JOBS=${JOBS:-$(nproc)}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-420}
LCP_VERSION=0.3.36
RESERVE=15  # seconds kept for the summary at the end

SITE=$WORK/site              # wheels and specli, fresh each run
LLAMA_SITE=$WORK/llama-site  # the CUDA build, kept for a rerun
export PYTHONPATH=$SITE:$LLAMA_SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SPECLI_HOME=$WORK/home  # fresh calibration, no history, no registry downloads
declare -a PHASE_LINES=()
STATUS=ok

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((TOTAL_BUDGET - $(elapsed))); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

PHASE=""
PHASE_T0=0
phase() {
    PHASE=$1
    PHASE_T0=$(date +%s.%N)
    echo
    echo "=============== PHASE $PHASE (elapsed $(elapsed)s, $(remaining)s left) ==============="
}
phase_end() {  # phase_end RC [note]
    local dt
    dt=$(awk -v a="$PHASE_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    local result=ok
    [[ $1 == 0 ]] || result="FAILED (rc $1)"
    PHASE_LINES+=("| $PHASE | $result | $dt | ${2:-} |")
    echo "=============== END $PHASE: rc=$1, ${dt}s (elapsed $(elapsed)s) ==============="
}
limit_for() {  # limit_for DEFAULT: the phase's limit, never past the total budget
    local left=$(($(remaining) - RESERVE))
    ((left < $1)) && echo "$left" || echo "$1"
}
fail() {  # fail MESSAGE: stop here, still writing the summary
    STATUS="FAILED in $PHASE: $*"
    say "ERROR: $*"
    finish
    exit 1
}

write_summary() {
    local f=$WORK/gpu_check_summary.md
    {
        echo "# specli gpu_check ($(date -u +%FT%TZ))"
        echo
        echo "- status: $STATUS"
        echo "- models: RANDOM-WEIGHT timing models (scripts/make_timing_models.py, preset" \
            "$PRESET): these numbers time the pipeline, not a real model pair"
        echo "- machine: ${GPU_INFO:-no GPU queried}; $(nproc) CPU cores"
        echo "- repo: ${COMMIT:-unknown}; methods asked: $METHODS; run: ${RUN_METHODS:-}"
        echo "- bench configuration: ${CONFIG:-none} (probes passed: ${PASSED[*]:-none})"
        echo "- bench flags: ${BENCH_FLAGS_TEXT:-}"
        echo "- total: $(elapsed)s of $TOTAL_BUDGET"
        echo
        echo "| phase | result | seconds | note |"
        echo "|---|---|---|---|"
        printf '%s\n' "${PHASE_LINES[@]}"
        if [[ -f $WORK/models/models.json ]]; then
            echo
            echo '```'
            cat "$WORK/models/models.json"
            [[ -f $WORK/models/agreement.json ]] && cat "$WORK/models/agreement.json"
            echo '```'
        fi
        [[ -f $WORK/methods.md ]] && { echo; cat "$WORK/methods.md"; }
        [[ -f $WORK/bench/summary.md ]] && { echo; cat "$WORK/bench/summary.md"; }
    } >"$f"
}

pack_wait() {  # the background packing of the build, waited for once
    if [[ -n ${PACK_PID:-} && -z ${PACK_RC:-} ]]; then
        wait "$PACK_PID"
        PACK_RC=$?
        say "build packed (rc $PACK_RC): $(du -ch "$WORK"/pack/* 2>/dev/null | tail -1)"
    fi
}

finish() {
    write_summary
    echo
    echo "=============== SUMMARY ==============="
    printf '%s\n' "status: $STATUS" "| phase | result | seconds | note |" "${PHASE_LINES[@]}"
    [[ -f $WORK/methods.md ]] && cat "$WORK/methods.md"
    if [[ -n ${OUT:-} ]]; then
        # at most 8 files come back: the summary, one archive of logs and results, and
        # the build's parts
        mkdir -p "$OUT" "$WORK/logs"
        cp "$WORK/gpu_check_summary.md" "$OUT/" 2>/dev/null
        for f in bench/summary.md bench/summary.json bench/results.jsonl probe.log \
            speed.log quantize.log specli-pip.log; do
            [[ -f $WORK/$f ]] && cp "$WORK/$f" "$WORK/logs/${f//\//_}"
        done
        [[ -f $WORK/build.log ]] && { head -n 150 "$WORK/build.log"; echo "[...]"
            tail -n 300 "$WORK/build.log"; } >"$WORK/logs/build_log.txt"
        [[ -f $WORK/bench.log ]] && tail -n 3000 "$WORK/bench.log" >"$WORK/logs/bench_log_tail.txt"
        tar -C "$WORK/logs" -czf "$OUT/logs.tar.gz" .
        pack_wait
        if [[ ${PACK_RC:-} == 0 ]]; then
            cp "$WORK"/pack/llama-build.tar.xz.part* "$OUT/"
        elif [[ -n ${PACK_RC:-} ]]; then
            say "WARNING: packing the build failed (rc $PACK_RC)"
        fi
        say "files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
    fi
    say "done: $STATUS"
}

# ------------------------------------------------------------------------------------------
phase env
mkdir -p "$WORK"
rm -rf "${WORK:?}"/{site,bench,home,methods.md,bench.log}
BUNDLE=$(cd "$BUNDLE" 2>/dev/null && pwd) || fail "no bundle folder ${1:-.gpu}"
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
say "repo $REPO ($COMMIT), bundle $BUNDLE, work $WORK, budget ${TOTAL_BUDGET}s"
say "python: $($PYTHON --version 2>&1) at $(command -v "$PYTHON")"
say "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
if command -v nvidia-smi >/dev/null; then
    GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
        --format=csv,noheader 2>&1 | head -1)
    say "gpu: $GPU_INFO"
elif [[ $SKIP_BUILD != 1 && -z ${CUDA_ARCH:-} ]]; then
    fail "nvidia-smi not found (use SKIP_BUILD=1 for a CPU run, or set CUDA_ARCH)"
else
    say "WARNING: no nvidia-smi"
fi
sed -n '1,3p' "$BUNDLE/MANIFEST.txt" 2>/dev/null
phase_end 0

# ------------------------------------------------------------------------------------------
phase wheels
timeout "$(limit_for 60)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --disable-pip-version-check --target "$SITE" "$BUNDLE"/wheels/*.whl ||
    fail "installing the carried wheels failed"
say "installed: $(ls "$BUNDLE"/wheels | tr '\n' ' ')"
phase_end 0

# ------------------------------------------------------------------------------------------
find_cuda() {  # sets NVCC, CUDA_ROOT, CUDA_CMAKE_ARGS, CUDA_LIB_DIRS
    NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null |
        head -1)
    [[ -n $NVCC ]] || fail "nvcc not found"
    NVCC=$(readlink -f "$NVCC")
    if [[ $(head -c 2 "$NVCC") == '#!' ]]; then  # a wrapper script: follow its exec
        local real
        real=$(grep -o '/[^ "]*/bin/nvcc' "$NVCC" | head -1)
        [[ -x $real ]] && NVCC=$(readlink -f "$real")
    fi
    CUDA_ROOT=$(dirname "$(dirname "$NVCC")")
    say "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
    CUDA_CMAKE_ARGS="-DCMAKE_CUDA_COMPILER=$NVCC"
    CUDA_LIB_DIRS=""
    local extra=$WORK/cuda-extra sites lib hdr drv d
    rm -rf "$extra"
    mkdir -p "$extra/lib" "$extra/include"
    sites=$("$PYTHON" -c 'import site; print(" ".join(site.getsitepackages()))')
    # cuBLAS: the toolkit's own, else the nvidia-cublas wheel of this Python (then CMake
    # is pointed at it through unversioned links, and its headers alone are added)
    lib=$(ls "$CUDA_ROOT"/lib64/libcublas.so "$CUDA_ROOT"/targets/*/lib/libcublas.so 2>/dev/null |
        head -1)
    if [[ -z $lib ]]; then
        for d in $sites; do
            lib=$(ls "$d"/nvidia/cu1[0-9]/lib/libcublas.so.* "$d"/nvidia/cublas/lib/libcublas.so.* \
                2>/dev/null | head -1)
            [[ -n $lib ]] && break
        done
        [[ -n $lib ]] || fail "cuBLAS not found in $CUDA_ROOT nor in $sites"
        d=$(dirname "$lib")
        ln -sf "$lib" "$extra/lib/libcublas.so"
        ln -sf "$(ls "$d"/libcublasLt.so.* | head -1)" "$extra/lib/libcublasLt.so"
        hdr=$(dirname "$d")/include
        [[ -f $hdr/cublas_v2.h ]] || fail "cublas_v2.h not found beside $lib"
        for f in "$hdr"/cublas*.h; do ln -sf "$f" "$extra/include/"; done
        CUDA_CMAKE_ARGS+=" -DCUDA_cublas_LIBRARY=$extra/lib/libcublas.so"
        CUDA_CMAKE_ARGS+=" -DCUDA_cublasLt_LIBRARY=$extra/lib/libcublasLt.so"
        CUDA_CMAKE_ARGS+=" -DCMAKE_CUDA_FLAGS=-I$extra/include"
        CUDA_LIB_DIRS=$d
    fi
    say "cuBLAS: $lib"
    # libcuda (the driver) for CUDA's virtual memory management; without it, VMM off
    drv=$(ls "$CUDA_ROOT"/lib64/stubs/libcuda.so "$CUDA_ROOT"/targets/*/lib/stubs/libcuda.so \
        2>/dev/null | head -1)
    if [[ -z $drv ]]; then
        drv=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}'
            ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* \
                /usr/lib64/libcuda.so* 2>/dev/null) | head -1)
        if [[ -n $drv ]]; then
            ln -sf "$drv" "$extra/lib/libcuda.so"
            CUDA_CMAKE_ARGS+=" -DCUDA_cuda_driver_LIBRARY=$extra/lib/libcuda.so"
        else
            CUDA_CMAKE_ARGS+=" -DGGML_CUDA_NO_VMM=ON"
        fi
    fi
    say "libcuda: ${drv:-not found: building with GGML_CUDA_NO_VMM=ON}"
    export PATH=$CUDA_ROOT/bin:$PATH CUDACXX=$NVCC
    # the toolkit's runtime first (the one compiled against), then the wheel's cuBLAS
    local lp=$extra/lib:$CUDA_ROOT/lib64${CUDA_LIB_DIRS:+:$CUDA_LIB_DIRS}
    export LD_LIBRARY_PATH=$lp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LIBRARY_PATH=$extra/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
}

phase build
if [[ $SKIP_BUILD == 1 ]]; then
    say "SKIP_BUILD=1: using the llama-cpp-python that $PYTHON imports"
    phase_end 0 "skipped (SKIP_BUILD=1)"
else
    find_cuda
    arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 |
        tr -d '. ')}
    [[ $arch =~ ^[0-9]+$ ]] || fail "could not read the GPU's compute capability ($arch)"
    # -real: machine code for this GPU only (no PTX to embed); FlashAttention kernels off by
    # default (the slowest part of the build; llama.cpp then runs attention without them);
    # no tests, tools, examples, server, multimodal library (tools/mtmd is not in the bundle),
    # NCCL or OpenSSL; fatbins uncompressed.
    export CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${arch}-real \
-DGGML_CUDA_FA=$CUDA_FA -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=none \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF $CUDA_CMAKE_ARGS"
    export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS CMAKE_GENERATOR=Ninja
    say "CMAKE_ARGS=$CMAKE_ARGS"
    stamp="$LCP_VERSION $CMAKE_ARGS"
    if [[ $REUSE_BUILD == 1 && ! -f $LLAMA_SITE/.stamp ]] &&
        compgen -G "$BUNDLE/build/llama-build.tar.xz.part*" >/dev/null; then
        say "unpacking the carried build from $BUNDLE/build"
        rm -rf "$LLAMA_SITE" && mkdir -p "$LLAMA_SITE"
        cat "$BUNDLE"/build/llama-build.tar.xz.part* | xz -d -T0 | tar -C "$LLAMA_SITE" -xf - ||
            say "WARNING: the carried build did not unpack"
        [[ -f $LLAMA_SITE/.stamp && $(cat "$LLAMA_SITE/.stamp") == "$stamp" ]] ||
            { say "WARNING: the carried build is for other CMAKE_ARGS: building"; rm -rf "$LLAMA_SITE"; }
    fi
    if [[ $REUSE_BUILD == 1 && -f $LLAMA_SITE/.stamp && $(cat "$LLAMA_SITE/.stamp") == "$stamp" ]]
    then
        say "reusing the build in $LLAMA_SITE (same version and CMAKE_ARGS)"
        phase_end 0 "reused"
    else
        rm -rf "$LLAMA_SITE" "$WORK/src"
        mkdir -p "$WORK/src"
        tar -xzf "$BUNDLE/llama_cpp_python-$LCP_VERSION-trimmed.tar.gz" -C "$WORK/src" ||
            fail "cannot unpack the llama-cpp-python source"
        lim=$(limit_for "$BUILD_TIMEOUT")
        say "building llama-cpp-python $LCP_VERSION for sm_$arch with $JOBS jobs" \
            "(limit ${lim}s; log $WORK/build.log)"
        timeout -k 10 "$lim" "$PYTHON" -m pip install -v --no-index --no-deps --no-cache-dir \
            --no-build-isolation --no-compile --disable-pip-version-check --target "$LLAMA_SITE" \
            "$WORK/src/llama_cpp_python-$LCP_VERSION" >"$WORK/build.log" 2>&1 &
        pid=$!
        n=0
        while kill -0 "$pid" 2>/dev/null; do
            sleep 2
            (((n += 1) % 10 == 0)) &&
                say "building: $(grep -o '\[[0-9]*/[0-9]*\]' "$WORK/build.log" | tail -1)"
        done
        wait "$pid"
        rc=$?
        if ((rc != 0)); then
            echo "----- build errors (grep) -----"
            grep -n -E 'error|FAILED|Error' "$WORK/build.log" | grep -v -E 'Werror|-Wno-error' |
                cut -c1-400 | head -40
            echo "----- build log tail -----"
            tail -n 60 "$WORK/build.log"
            phase_end "$rc" "see build.log (build_log.txt in \$OUT)"
            ((rc == 124 || rc == 137)) && fail "the CUDA build ran past ${lim}s"
            fail "the CUDA build failed (rc $rc)"
        fi
        echo "$stamp" >"$LLAMA_SITE/.stamp"
        if [[ $PACK_BUILD == 1 && -n ${OUT:-} ]]; then  # in the background, for a rerun
            mkdir -p "$WORK/pack" && rm -f "$WORK"/pack/*
            # the package alone, its libraries' copies (libX.so, .so.0) made links: 10 MB
            (rm -rf "$WORK/packdir" && mkdir -p "$WORK/packdir" &&
                cp -a "$LLAMA_SITE"/.stamp "$LLAMA_SITE"/llama_cpp "$LLAMA_SITE"/*.dist-info \
                    "$WORK/packdir/" &&
                for real in "$WORK"/packdir/llama_cpp/lib/*.so.*.*; do  # fully versioned
                    for f in "$WORK"/packdir/llama_cpp/lib/*; do
                        [[ -f $f && ! -L $f && $f != "$real" ]] && cmp -s "$f" "$real" &&
                            ln -sf "$(basename "$real")" "$f"
                    done
                done &&
                tar -C "$WORK/packdir" -cf - . | xz -T8 -9 |
                split -b 15M -d - "$WORK/pack/llama-build.tar.xz.part") &
            PACK_PID=$!
        fi
        phase_end 0 "sm_$arch, FA $CUDA_FA"
    fi
fi

# ------------------------------------------------------------------------------------------
phase check
cd "$WORK" || fail "no $WORK"  # never import the repo's own specli/ from the cwd
"$PYTHON" - <<'EOF' || fail "llama_cpp does not import"
import llama_cpp, os
print(f"llama_cpp {llama_cpp.__version__} from {os.path.dirname(llama_cpp.__file__)}")
print(f"llama_supports_gpu_offload() = {bool(llama_cpp.llama_supports_gpu_offload())}")
EOF
gpu_ok=$("$PYTHON" -c 'import llama_cpp; print(int(bool(llama_cpp.llama_supports_gpu_offload())))')
if [[ $NGL != 0 && $gpu_ok != 1 ]]; then
    phase_end 1
    fail "this llama-cpp-python cannot offload to a GPU, but NGL=$NGL"
fi
phase_end 0 "gpu offload: $gpu_ok"

# ------------------------------------------------------------------------------------------
phase specli
# a copy of the tree (tracked and untracked work alike), installed as a package so that
# backends/ becomes specli.backends as pyproject.toml maps it
rm -rf "$WORK/specli-src"
mkdir -p "$WORK/specli-src"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.gpu --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$WORK/specli-src" -xf - ||
    fail "cannot copy the repository"
how=pip
if ! timeout "$(limit_for 120)" "$PYTHON" -m pip install -q --no-index --no-deps \
    --no-build-isolation --no-compile --disable-pip-version-check --target "$SITE" \
    "$WORK/specli-src" >"$WORK/specli-pip.log" 2>&1; then
    tail -n 3 "$WORK/specli-pip.log"
    # no usable setuptools/wheel here: lay the package out as pyproject.toml maps it
    # (backends/ inside specli/), plus the metadata that `specli bench` reads its version from
    how=links
    say "WARNING: pip could not build specli; installing it as links instead"
    rm -rf "$SITE"/specli "$SITE"/specli-*.dist-info
    cp -r "$WORK/specli-src/backends" "$WORK/specli-src/specli/backends"
    ln -s "$WORK/specli-src/specli" "$SITE/specli"
    ver=$(sed -n 's/^version = "\(.*\)"/\1/p' "$WORK/specli-src/pyproject.toml" | head -1)
    mkdir -p "$SITE/specli-$ver.dist-info"
    printf 'Metadata-Version: 2.1\nName: specli\nVersion: %s\n' "$ver" \
        >"$SITE/specli-$ver.dist-info/METADATA"
fi
"$PYTHON" -c 'import specli, specli.backends.gguf, specli.cli; print("specli:", specli.__file__)' ||
    fail "specli does not import"
SPECLI=("$PYTHON" -m specli.cli)
phase_end 0 "installed with $how"

# ------------------------------------------------------------------------------------------
phase models
rm -rf "$WORK/models"
gen=("$PYTHON" "$REPO/scripts/make_timing_models.py" write "$WORK/models" --preset "$PRESET"
    --tokenizer "$BUNDLE/smollm2-tokenizer.json.gz")
[[ -n $NOISE ]] && gen+=(--noise "$NOISE")
timeout "$(limit_for 180)" "${gen[@]}" || fail "writing the timing models failed"
if [[ $QUANT != none ]]; then
    for m in target draft; do
        timeout "$(limit_for 90)" "$PYTHON" "$REPO/scripts/gpu_probe.py" quantize \
            "$WORK/models/$m.gguf" "$WORK/models/$m-$QUANT.gguf" "$QUANT" \
            >>"$WORK/quantize.log" 2>&1 || fail "quantizing $m to $QUANT failed"
        grep "^\[probe" "$WORK/quantize.log" | tail -1
    done
fi
ls -la "$WORK/models"
phase_end 0 "preset $PRESET${QUANT:+, quantised copies $QUANT}"

# ------------------------------------------------------------------------------------------
phase probe
# each configuration in its own process: an abort names its last call (see gpu_probe.py)
model_files() {  # model_files q|f -> "TARGET DRAFT"
    if [[ $1 == q ]]; then echo "$WORK/models/target-$QUANT.gguf $WORK/models/draft-$QUANT.gguf"
    else echo "$WORK/models/target.gguf $WORK/models/draft.gguf"; fi
}
PASSED=()
for cfg in $PROBES; do
    read -r tgt drf <<<"$(model_files "${cfg%%:*}")"
    echo "----- probe $cfg: $(basename "$tgt") + $(basename "$drf"), branches ${cfg##*:}" |
        tee -a "$WORK/probe.log"
    CUDA_LAUNCH_BLOCKING=1 timeout -k 5 "$(limit_for 90)" "$PYTHON" \
        "$REPO/scripts/gpu_probe.py" "$tgt" --draft "$drf" -ngl "$NGL" \
        --branches "${cfg##*:}" >"$WORK/probe.one" 2>&1
    rc=$?
    cat "$WORK/probe.one" >>"$WORK/probe.log"
    # the steps, and every line llama.cpp logged as an error around an abort
    grep -E '^\[probe|error|Error|ERROR|CUDA|abort|current device' "$WORK/probe.one" |
        grep -v -E 'llama_model_loader|print_info|load_tensors' | tail -n 25
    echo "----- probe $cfg: rc $rc" | tee -a "$WORK/probe.log"
    ((rc == 0)) && PASSED+=("$cfg")
    PHASE_LINES+=("| probe $cfg | $( ((rc == 0)) && echo ok || echo "FAILED (rc $rc)") | | $(grep '^\[probe' "$WORK/probe.one" | tail -1 | cut -c1-70) |")
done
say "probes passed: ${PASSED[*]:-none}"
phase_end 0 "passed: ${PASSED[*]:-none}"

phase agreement
# greedy per-token agreement of the pair, measured apart from specli (a cross-check of the
# bench's acceptance), with the target where the bench puts it; skipped when time is short
if (($(remaining) < 300)); then
    say "skipped: $(remaining)s left, kept for the bench"
    phase_end 0 "skipped (time)"
else
    timeout -k 5 "$(limit_for 60)" "$PYTHON" "$REPO/scripts/make_timing_models.py" measure \
        "$WORK/models" -n 64 --gpu-layers "$NGL" --threads "$(($(nproc) < 8 ? $(nproc) : 8))"
    rc=$?
    phase_end "$rc" "$( ( ((rc == 0)) && cut -c1-60 "$WORK/models/agreement.json") ||
        echo "not measured")"
fi

# ------------------------------------------------------------------------------------------
phase speed
if [[ $THREADS == auto ]]; then
    CONFIG=${BENCH_CONFIG:-${PASSED[0]:-}}
    [[ -n $CONFIG ]] || fail "no probe configuration passed: nothing to time"
    read -r tgt drf <<<"$(model_files "${CONFIG%%:*}")"
    timeout -k 5 "$(limit_for 90)" "$PYTHON" "$REPO/scripts/gpu_probe.py" speed "$tgt" "$drf" \
        -ngl "$NGL" --branches "${CONFIG##*:}" --target-threads "$SPEED_TARGET_THREADS" \
        --draft-threads "$SPEED_DRAFT_THREADS" >"$WORK/speed.log" 2>&1
    rc=$?
    grep '^\[probe' "$WORK/speed.log"
    split=$("$PYTHON" - "$WORK/speed.log" <<'EOF2'
import json, sys
line = [x for x in open(sys.argv[1]) if x.startswith("SPEED ")][-1]
d = json.loads(line[6:])
k = d["k"]
def best_round(r):  # the faster of drafting after verifying and drafting beside it
    seq = k * r["draft_ms_per_token"] + r["verify_ms"]
    duo = max(k * (r["draft_ms_per_token_beside"] or 1e9), r["verify_ms_beside"])
    return min(seq, duo)
b = min(d["results"], key=best_round)
print(b["target_threads"], b["draft_threads"], f"{best_round(b):.2f}")
EOF2
    )
    if ((rc == 0)) && [[ -n $split ]]; then
        read -r THREADS dthreads round_ms <<<"$split"
        DRAFT_FLAGS=$(sed -E 's/--draft-threads [0-9]+//' <<<"$DRAFT_FLAGS")
        DRAFT_FLAGS+=" --draft-threads $dthreads"
        say "thread split: target $THREADS, drafter $dthreads (round of k=4: ${round_ms} ms)"
        phase_end 0 "target $THREADS threads, drafter $dthreads"
    else
        tail -n 20 "$WORK/speed.log"
        THREADS=""
        phase_end "$rc" "failed: bench with default threads"
    fi
else
    phase_end 0 "skipped (THREADS=${THREADS:-default})"
fi

# ------------------------------------------------------------------------------------------
phase bench
pack_wait  # xz on 8 cores would slow the CPU drafter
help=$("${SPECLI[@]}" bench --help 2>&1) || fail "specli bench --help failed: $help"
# methods this specli knows (parse_methods raises on the others)
RUN_METHODS=$("$PYTHON" - "$METHODS" <<'EOF'
import sys
from specli.bench import parse_methods
ok = []
for m in sys.argv[1].split(","):
    try:
        parse_methods(m)
        ok.append(m)
    except Exception as e:  # noqa: BLE001
        print(f"WARNING: method {m!r} dropped: {e}", file=sys.stderr)
print(",".join(ok))
EOF
) || fail "cannot check the methods"
[[ -n $RUN_METHODS ]] || fail "none of METHODS=$METHODS is known to this specli"
CONFIG=${BENCH_CONFIG:-${PASSED[0]:-}}
[[ -n $CONFIG ]] || fail "no probe configuration passed: nothing to bench"
read -r BENCH_TARGET BENCH_DRAFT <<<"$(model_files "${CONFIG%%:*}")"
say "bench configuration $CONFIG: $(basename "$BENCH_TARGET") + $(basename "$BENCH_DRAFT")"
flags=(--methods "$RUN_METHODS" --limit "$LIMIT" -n "$NTOK" --repeats "$REPEATS"
    --draft "$BENCH_DRAFT" --out "$WORK/bench" --branches "${CONFIG##*:}")
[[ -n $CATEGORIES ]] && flags+=(--categories "$CATEGORIES")
[[ -n $THREADS ]] && flags+=(--threads "$THREADS")
if [[ $NGL != 0 ]]; then
    grep -q -- '--gpu-layers' <<<"$help" || fail "specli bench has no -ngl/--gpu-layers flag yet"
    flags+=(-ngl "$NGL")
fi
read -r -a dflags <<<"$DRAFT_FLAGS"
i=0
while ((i < ${#dflags[@]})); do  # FLAG VALUE pairs
    f=${dflags[i]} v=${dflags[i + 1]:-}
    if grep -q -- "$f" <<<"$help"; then flags+=("$f" "$v"); else
        say "WARNING: specli bench has no $f flag: dropped '$f $v'"
    fi
    i=$((i + 2))
done
read -r -a extra <<<"$EXTRA_BENCH_FLAGS"
flags+=("${extra[@]}")
BENCH_FLAGS_TEXT="${flags[*]}"
lim=$(limit_for 300)
say "specli bench $BENCH_TARGET ${flags[*]} (limit ${lim}s)"
# SIGINT first: the bench then writes the summary of what finished
timeout -s INT -k 20 "$lim" "${SPECLI[@]}" bench "$BENCH_TARGET" "${flags[@]}" \
    2>&1 | tee "$WORK/bench.log"
rc=$?
[[ -f $WORK/bench/summary.json ]] || { phase_end "$rc"; fail "the bench wrote no summary"; }
"$PYTHON" - "$WORK/bench" >"$WORK/methods.md" <<'EOF'
"""Per method over all prompts: acceptance (accepted / drafted), tokens per target pass,
decode tok/s and the bench's own speedup vs none."""
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines() if x.strip()]
table = json.loads((d / "summary.json").read_text())["table"]
print("| method | runs | drafted | accepted | acceptance | tokens/target pass "
      "| decode tok/s (geomean) | decode speedup vs none | identity |")
print("|---|---|---|---|---|---|---|---|---|")
for m, cells in table.items():
    mine = [r for r in rows if r["method"] == m]
    dr = sum(r.get("drafted") or 0 for r in mine)
    ac = sum(r.get("accepted") or 0 for r in mine)
    o = cells["overall"]
    f = lambda x, s: "n/a" if x is None else format(x, s)  # noqa: E731
    ident = "n/a" if o["identity_rate"] is None else f"{100 * o['identity_rate']:.0f}%"
    print(f"| {m} | {len(mine)} | {dr} | {ac} | {f(ac / dr if dr else None, '.3f')} "
          f"| {f(o['mean_accepted'], '.2f')} | {f(o['decode_tok_s'], '.1f')} "
          f"| {f(o['speedup'], '.2f')}x | {ident} |")
EOF
note="methods $RUN_METHODS"
((rc == 124)) && note="stopped at ${lim}s: partial"
phase_end "$rc" "$note"
((rc == 0)) || STATUS="bench rc $rc (partial results)"

finish

#!/usr/bin/env bash
# One-shot GPU timing check for DuoDecoding (issues #8, #14), for a machine with an NVIDIA GPU
# and no network.  Run from the repository root:
#
#     bash scripts/gpu_check.sh .gpu            # .gpu/ from scripts/pack_gpu_bundle.sh
#
# Phases, each with its own time limit inside TOTAL_BUDGET: a time and disk plan (shapes
# checked before anything slow), install the carried wheels, build llama-cpp-python with
# CUDA for this GPU from the trimmed source (or unpack a carried build), install specli,
# then per noise level: write a RANDOM-WEIGHT timing pair (scripts/make_timing_models.py:
# the numbers time the pipeline, not a real model pair), measure its greedy agreement and
# run `specli bench` with the target on the GPU and the drafter on the CPU.  The probes
# (each llama.cpp call in its own process) and the thread-split sweep run once, on the
# first pair.  Everything useful goes to stdout as it happens; with $OUT set, the summary,
# one archive of logs and results, and the fresh build's parts are copied there.
#
# Env (defaults in brackets):
#   METHODS [none,draft,duo]  bench methods, comma list as `specli bench --methods` takes it
#                             (e.g. none,auto,draft,duo,draft@fixed:4,duo@fixed:4); ones
#                             this specli does not know are dropped, loudly
#   PRESET [gpu; small with SKIP_BUILD=1]  timing-model shapes, see make_timing_models.py
#   DRAFT_SHAPE, TARGET_SHAPE []  n_embd,n_layer,n_head,n_head_kv,n_ff: override the preset's
#                             drafter / target (same head size and GQA group; the target
#                             wider and deeper); checked in the plan phase, before the build
#   NOISES [generator's default, 0.5]  noise levels, space- or comma-separated ("0.3 0.1"):
#                             one pair, agreement and bench per level, in order; the drafter
#                             does not depend on the noise, so the pairs share its file.
#                             NOISE: a single level, used when NOISES is unset
#   QUANT [q4_k_m]            also write llama.cpp-quantised copies of each pair (none: f16 only)
#   PROBES [q:3 q:1 f:3 f:1]  scripts/gpu_probe.py runs, one process each (MODELS:BRANCHES,
#                             q = quantised pair, f = f16 pair), with CUDA_LAUNCH_BLOCKING=1;
#                             the bench runs the first that passed.  none (or empty): no
#                             probes, the bench runs BENCH_CONFIG
#   BENCH_CONFIG [first probe passed; q:3, or f:3 with QUANT=none, when no probes]
#   SKIP_BUILD [0]            1: use the llama-cpp-python $PYTHON already imports (CPU test)
#   NGL [99; 0 with SKIP_BUILD=1]  target layers on the GPU (-ngl; required when > 0)
#   DRAFT_FLAGS []            e.g. "--draft-gpu-layers 0" (each flag the bench lacks is
#                             dropped with a warning); none: specli places duo's draft model
#                             by measurement (GPU or CPU beside the target, issue #14)
#   THREADS [auto; empty with SKIP_BUILD=1]  --threads for the bench (the target's CPU
#                             threads); auto: `gpu_probe.py speed` times thread splits
#                             (SPEED_TARGET_THREADS x SPEED_DRAFT_THREADS) and the bench
#                             takes the split with the fastest draft or duo round
#   EXTRA_BENCH_FLAGS []      passed to `specli bench` as they are (e.g. "--budget fixed:4")
#   CATEGORIES [all: 13] LIMIT [1] NTOK [128] REPEATS [1]  the bench's prompts and length
#   BENCH_TIMEOUT [300]       one bench's own time limit (SIGINT: it keeps what finished)
#   BENCH_MS_PER_TOKEN [8]    the plan's bench wall time per generated token, all methods
#                             together (H200, 1.9B Q4_K_M pair, 2026-11-26: about 6)
#   PACK_BUILD [1]            also return a fresh CUDA build in $OUT as xz parts of
#                             PACK_PART_SIZE [15M] each (the device tool returns files up to
#                             16 MiB, 8 files, 64 MiB together), see "Carrying the build"
#   CUDA_ARCH [from nvidia-smi]  e.g. 90;  CUDA_FA [OFF]  compile FlashAttention kernels
#   JOBS [nproc] BUILD_TIMEOUT [420]  parallel compile jobs, the build's own time limit
#   TOTAL_BUDGET [540]        seconds for the whole run; PYTHON [python3]; WORK [/tmp/specli-gpu]
#   REUSE_BUILD [1]           reuse a finished build: this machine's (a rerun) or a carried one
#
# Time plan.  Before the build the script prints an estimate per phase (from the target's
# size, the bench's prompt x method x token count and whether a build is carried) and says
# which noise levels fit.  Before each further noise level it estimates that level's pair,
# agreement and bench again against the time left, and skips the level LOUDLY (a SKIPPED
# line in the summary) rather than overrun; an agreement measurement is skipped when it
# would leave its bench short.  Measured on an H200 (2026-11-26): CUDA build 215 s, 1.9B
# pair written in 14 s and quantised in 27 s.
#
# Carrying the build (keeps a fresh machine from spending ~200-230 s on it; the build never
# enters the repository).  A run that built hands back llama-build.tar.xz.part00, part01, ...
# in $OUT.  Put them, and only them, in the ignored bundle folder before the next call:
#     mkdir -p .gpu/build && rm -f .gpu/build/* && cp <files_at>/llama-build.tar.xz.part* .gpu/build/
# and call with carry [".gpu"] as always (.gpu/ must stay ignored: pack_gpu_bundle.sh adds
# /.gpu/ to .git/info/exclude; the bundle plus the parts must fit the 64 MiB that travel,
# check with `du -sh .gpu`).  The build phase then unpacks $BUNDLE/build/llama-build.tar.xz.part*
# and uses it when it was made with the same llama-cpp-python version and CMAKE_ARGS
# (CUDA_ARCH: 90 on both the H100 and the H200; CUDA_FA; the CUDA paths of the machine
# image); otherwise it says so and builds.  A reused build is not handed back again.
#
# The issue #14 check (6.1B f16 target, 87M drafter, two noise levels), one device call with
# timeout_s 600 and carry [".gpu"]:
#     TARGET_SHAPE=4096,32,64,16,11008 DRAFT_SHAPE=512,12,8,2,1536 NOISES="0.3 0.1" QUANT=none PROBES=f:3 METHODS=none,auto,draft,duo,draft@fixed:4,duo@fixed:4 LIMIT=1 NTOK=128 bash scripts/gpu_check.sh .gpu
# Planned (seconds; target 12.2 GB f16, 13 prompts x 6 methods x 128 tokens, TOTAL_BUDGET 540):
#   setup ~10, build ~15 when carried (~230 when not), then per noise level: pair written ~50
#   (disk 12.2 GB per target + 0.17 GB drafter, shared), agreement ~20, bench ~130, plus
#   once probe ~10 and thread sweep ~20: about 460 s with the build carried.  Without it the
#   first level (~475 s) fits and the second is skipped loudly; that call hands the build
#   back, so the next one (carrying it) runs both levels.
set -uo pipefail

BUNDLE=${1:-.gpu}
REPO=$(pwd)
START=$(date +%s)
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
PYTHON=${PYTHON:-python3}
# a relative path (PYTHON=.venv/bin/python) would break once the script cd's to $WORK
if [[ $PYTHON == */* && $PYTHON != /* ]]; then PYTHON=$PWD/$PYTHON; fi
WORK=${WORK:-/tmp/specli-gpu}
SKIP_BUILD=${SKIP_BUILD:-0}
METHODS=${METHODS:-none,draft,duo}
if [[ $SKIP_BUILD == 1 ]]; then NGL=${NGL:-0}; PRESET=${PRESET:-small}; else
    NGL=${NGL:-99}; PRESET=${PRESET:-gpu}; fi
DRAFT_SHAPE=${DRAFT_SHAPE:-}
TARGET_SHAPE=${TARGET_SHAPE:-}
DRAFT_FLAGS=${DRAFT_FLAGS-}
if [[ $SKIP_BUILD == 1 ]]; then THREADS=${THREADS:-}; else THREADS=${THREADS:-auto}; fi
SPEED_TARGET_THREADS=${SPEED_TARGET_THREADS:-1,2,16}
SPEED_DRAFT_THREADS=${SPEED_DRAFT_THREADS:-2,4,8,16}
EXTRA_BENCH_FLAGS=${EXTRA_BENCH_FLAGS:-}
NOISE=${NOISE:-}
NOISES=${NOISES:-}
CATEGORIES=${CATEGORIES:-}
LIMIT=${LIMIT:-1}
NTOK=${NTOK:-128}
REPEATS=${REPEATS:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
BENCH_MS_PER_TOKEN=${BENCH_MS_PER_TOKEN:-8}
CUDA_FA=${CUDA_FA:-OFF}
REUSE_BUILD=${REUSE_BUILD:-1}
QUANT=${QUANT:-q4_k_m}
PROBES=${PROBES-q:3 q:1 f:3 f:1}
[[ $PROBES == none ]] && PROBES=""
BENCH_CONFIG=${BENCH_CONFIG:-}
PACK_BUILD=${PACK_BUILD:-1}
PACK_PART_SIZE=${PACK_PART_SIZE:-15M}
if [[ $QUANT == none ]]; then  # no quantised pair: drop its probes
    kept=""
    for c in $PROBES; do [[ $c == q:* ]] || kept+="$c "; done
    PROBES=$kept
fi
JOBS=${JOBS:-$(nproc)}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-420}
LCP_VERSION=0.3.36
RESERVE=15  # seconds kept for the summary at the end
ALL_CATEGORIES=13  # the bench's prompt categories when CATEGORIES is empty

SITE=$WORK/site              # wheels and specli, fresh each run
LLAMA_SITE=$WORK/llama-site  # the CUDA build, kept for a rerun
export PYTHONPATH=$SITE:$LLAMA_SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SPECLI_HOME=$WORK/home  # fresh calibration, no history, no registry downloads
declare -a PHASE_LINES=()
declare -a TAGS=()  # noise levels whose pair was written: noise0.3, ...
PASSED=()
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
skipped() {  # skipped WHAT WHY: a phase not run, loudly, in the log and the summary
    say "SKIPPED $1: $2"
    PHASE_LINES+=("| $1 | SKIPPED | | $2 |")
}
limit_for() {  # limit_for DEFAULT: the phase's limit, never past the total budget
    local left=$(($(remaining) - RESERVE))
    ((left < 1)) && left=1  # (timeout 0 would mean no limit at all)
    ((left < $1)) && echo "$left" || echo "$1"
}
fail() {  # fail MESSAGE: stop here, still writing the summary
    STATUS="FAILED in $PHASE: $*"
    say "ERROR: $*"
    finish
    exit 1
}

write_summary() {
    local f=$WORK/gpu_check_summary.md tag
    {
        echo "# specli gpu_check ($(date -u +%FT%TZ))"
        echo
        echo "- status: $STATUS"
        echo "- models: RANDOM-WEIGHT timing models (scripts/make_timing_models.py, preset" \
            "$PRESET${DRAFT_SHAPE:+, drafter $DRAFT_SHAPE}${TARGET_SHAPE:+, target $TARGET_SHAPE}):" \
            "these numbers time the pipeline, not a real model pair"
        echo "- noise levels asked: ${NOISE_LIST[*]:-default}; benched: ${BENCHED[*]:-none}"
        echo "- machine: ${GPU_INFO:-no GPU queried}; $(nproc) CPU cores"
        echo "- repo: ${COMMIT:-unknown}; methods asked: $METHODS; run: ${RUN_METHODS:-}"
        echo "- bench configuration: ${CONFIG:-none} (probes${PROBES:+ passed: ${PASSED[*]:-none}" \
            "of $PROBES}${PROBES:- skipped})"
        echo "- bench flags: ${BENCH_FLAGS_TEXT:-}"
        echo "- plan: ${PLAN_TEXT:-none}"
        echo "- total: $(elapsed)s of $TOTAL_BUDGET"
        echo
        echo "| phase | result | seconds | note |"
        echo "|---|---|---|---|"
        printf '%s\n' "${PHASE_LINES[@]}"
        for tag in "${TAGS[@]}"; do
            echo
            echo "## $tag"
            if [[ -f $WORK/models-$tag/models.json ]]; then
                echo
                echo '```'
                cat "$WORK/models-$tag/models.json"
                [[ -f $WORK/models-$tag/agreement.json ]] && cat "$WORK/models-$tag/agreement.json"
                echo '```'
            fi
            [[ -f $WORK/methods-$tag.md ]] && { echo; cat "$WORK/methods-$tag.md"; }
            [[ -f $WORK/bench-$tag/summary.md ]] && { echo; cat "$WORK/bench-$tag/summary.md"; }
        done
    } >"$f"
}

pack_wait() {  # the background packing of the build, waited for once
    if [[ -n ${PACK_PID:-} && -z ${PACK_RC:-} ]]; then
        wait "$PACK_PID"
        PACK_RC=$?
        say "build packed (rc $PACK_RC): $(ls -l "$WORK"/pack/ 2>/dev/null | grep -c part)" \
            "part(s), $(du -ch "$WORK"/pack/* 2>/dev/null | tail -1)"
    fi
}

finish() {
    local tag f
    write_summary
    echo
    echo "=============== SUMMARY ==============="
    printf '%s\n' "status: $STATUS" "| phase | result | seconds | note |" "${PHASE_LINES[@]}"
    for tag in "${TAGS[@]}"; do
        [[ -f $WORK/methods-$tag.md ]] && { echo "$tag:"; cat "$WORK/methods-$tag.md"; }
    done
    if [[ -n ${OUT:-} ]]; then
        # at most 8 files come back (16 MiB each, 64 MiB together): the summary, one
        # archive of logs and results (bench-noiseX/ folders inside), the build's parts
        rm -rf "$WORK/logs"
        mkdir -p "$OUT" "$WORK/logs"
        cp "$WORK/gpu_check_summary.md" "$OUT/" 2>/dev/null
        for f in probe.log speed.log quantize.log specli-pip.log plan.log; do
            [[ -f $WORK/$f ]] && cp "$WORK/$f" "$WORK/logs/$f"
        done
        for tag in "${TAGS[@]}"; do
            mkdir -p "$WORK/logs/bench-$tag"
            for f in summary.md summary.json results.jsonl trace.jsonl.gz trace_report.md; do
                [[ -f $WORK/bench-$tag/$f ]] && cp "$WORK/bench-$tag/$f" "$WORK/logs/bench-$tag/"
            done
            for f in models.json agreement.json; do
                [[ -f $WORK/models-$tag/$f ]] && cp "$WORK/models-$tag/$f" "$WORK/logs/bench-$tag/"
            done
            [[ -f $WORK/bench-$tag.log ]] &&
                tail -n 3000 "$WORK/bench-$tag.log" >"$WORK/logs/bench-$tag/bench_log_tail.txt"
        done
        # every calibration: verify curve, drafter step, how a short catch-up is read
        # (round_batched / round_stepwise, issue 14's CUDA graph check), overlap
        [[ -d $SPECLI_HOME/calibration ]] && cp -r "$SPECLI_HOME/calibration" "$WORK/logs/"
        [[ -f $WORK/build.log ]] && { head -n 150 "$WORK/build.log"; echo "[...]"
            tail -n 300 "$WORK/build.log"; } >"$WORK/logs/build_log.txt"
        tar -C "$WORK/logs" -czf "$OUT/logs.tar.gz" .
        pack_wait
        if [[ ${PACK_RC:-} == 0 ]]; then
            local n kb
            n=$(find "$WORK/pack" -name 'llama-build.tar.xz.part*' | wc -l)
            kb=$(du -ck "$WORK"/pack/llama-build.tar.xz.part* | tail -1 | cut -f1)
            if ((n > 6 || kb > 56 * 1024)); then  # the device tool would drop some
                say "WARNING: the packed build ($n parts, $((kb / 1024)) MiB) is over what" \
                    "\$OUT returns (8 files, 64 MiB): not handed back"
            else
                cp "$WORK"/pack/llama-build.tar.xz.part* "$OUT/"
                say "build handed back: $n part(s), $((kb / 1024)) MiB; next time put them in" \
                    ".gpu/build/ and carry .gpu (header of this script)"
            fi
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
# earlier runs' results and pairs (a pair is 12 GB and more: the disk is 64 GiB)
rm -rf "${WORK:?}"/{site,bench,home,logs,models,methods.md,bench.log,plan.log}
rm -rf "${WORK:?}"/models-noise* "${WORK:?}"/bench-noise* "${WORK:?}"/methods-noise*.md
BUNDLE=$(cd "$BUNDLE" 2>/dev/null && pwd) || fail "no bundle folder ${1:-.gpu}"
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
say "repo $REPO ($COMMIT), bundle $BUNDLE, work $WORK, budget ${TOTAL_BUDGET}s"
say "python: $($PYTHON --version 2>&1) at $(command -v "$PYTHON")"
say "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
say "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB, " $7 " GiB available"}');" \
    "disk under $WORK: $(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free"
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
# noise levels: NOISES (space or comma list), else NOISE, else the generator's default
[[ -n $NOISES && -n $NOISE ]] && say "WARNING: NOISES=$NOISES and NOISE=$NOISE: NOISE ignored"
NOISE_LIST=()
IFS=', ' read -r -a words <<<"${NOISES:-$NOISE}"
for n in "${words[@]}"; do
    [[ -z $n ]] && continue
    [[ $n =~ ^[0-9]*\.?[0-9]+$ ]] || fail "noise '$n' is not a number (NOISES=${NOISES:-$NOISE})"
    NOISE_LIST+=("$n")
done
if ((${#NOISE_LIST[@]} == 0)); then
    NOISE_LIST=("$(sed -n 's/^DEFAULT_NOISE = \([0-9.]*\).*/\1/p' \
        "$REPO/scripts/make_timing_models.py")")
    [[ -n ${NOISE_LIST[0]} ]] || fail "cannot read DEFAULT_NOISE from make_timing_models.py"
fi
BENCHED=()
say "noise levels: ${NOISE_LIST[*]}"
phase_end 0

# ------------------------------------------------------------------------------------------
phase plan
# the shapes are checked here, before anything slow; then the time and disk estimates
GEN_ARGS=(--preset "$PRESET" --tokenizer "$BUNDLE/smollm2-tokenizer.json.gz")
[[ -n $DRAFT_SHAPE ]] && GEN_ARGS+=(--draft-shape "$DRAFT_SHAPE")
[[ -n $TARGET_SHAPE ]] && GEN_ARGS+=(--target-shape "$TARGET_SHAPE")
QUANT_EST=()
case $QUANT in none) ;; q4_0 | q4_k_m | q8_0) QUANT_EST=(--quant-estimate "$QUANT") ;;
    *) say "WARNING: no size estimate for QUANT=$QUANT: the disk plan counts f16 only" ;; esac
timeout 120 "$PYTHON" "$REPO/scripts/make_timing_models.py" write "$WORK/models-plan" \
    "${GEN_ARGS[@]}" "${QUANT_EST[@]}" --noise "${NOISE_LIST[0]}" --dry-run >"$WORK/plan.log" 2>&1
rc=$?
grep -v '^PLAN ' "$WORK/plan.log"
if ((rc != 0)); then
    phase_end "$rc"
    ((rc == 2)) && fail "bad shapes (DRAFT_SHAPE=$DRAFT_SHAPE TARGET_SHAPE=$TARGET_SHAPE" \
        "PRESET=$PRESET): $(tail -n 1 "$WORK/plan.log")"
    fail "the timing-model plan failed: $(tail -n 1 "$WORK/plan.log")"
fi
# GB: target f16, drafter f16, the pair's quantised copies (estimate); bytes: target + quant
read -r TGB DGB QGB PAIR_BYTES <<<"$("$PYTHON" - "$WORK/plan.log" <<'EOF2'
import json, sys
p = json.loads([x for x in open(sys.argv[1]) if x.startswith("PLAN ")][-1][5:])
t, d, q = p["target_bytes_planned"], p["draft_bytes_planned"], p["quant_bytes_estimated"]
print(f"{t / 1e9:.2f} {d / 1e9:.2f} {q / 1e9:.2f} {t + q}")
EOF2
)"
[[ -n ${PAIR_BYTES:-} ]] || fail "cannot read the plan ($WORK/plan.log)"
est() {  # est EXPR: seconds, EXPR in g (target GB), d (drafter GB), q (quantised GB)
    awk -v g="$TGB" -v d="$DGB" -v q="$QGB" "BEGIN { printf \"%d\", ($1) + 0.5 }"
}
if [[ $SKIP_BUILD == 1 ]]; then EST_BUILD=0; build_how="skipped (SKIP_BUILD=1)"
elif [[ $REUSE_BUILD == 1 && -f $LLAMA_SITE/.stamp ]]; then EST_BUILD=5; build_how="on this machine"
elif [[ $REUSE_BUILD == 1 ]] && compgen -G "$BUNDLE/build/llama-build.tar.xz.part*" >/dev/null
then EST_BUILD=15; build_how="carried in $BUNDLE/build"
else EST_BUILD=230; build_how="NOT carried: built here"; fi
n_probes=$(wc -w <<<"$PROBES")
IFS=, read -r -a cats <<<"$CATEGORIES"
n_prompts=$(((${#cats[@]} > 0 ? ${#cats[@]} : ALL_CATEGORIES) * LIMIT * REPEATS))
IFS=, read -r -a meths <<<"$METHODS"
n_methods=${#meths[@]}
[[ ,$METHODS, == *,none,* ]] || n_methods=$((n_methods + 1))  # the bench always runs none
# Per phase, from the H200 run of 2026-11-26 (1.9B Q4_K_M pair): f16 written at ~3.5 s/GB,
# quantised at ~7 s/GB, a model loaded in ~0.5 s/GB; the bench's setup ~40 s.
EST_SETUP=10
EST_WRITE=$(est '5 + 3.5 * (g + d)')
EST_QUANT=0
[[ $QUANT != none ]] && EST_QUANT=$(est '8 * (g + d)')
EST_PROBES=$((n_probes * $(est '5 + 0.5 * g')))
EST_AGREE=$(est '15 + 0.5 * g')
EST_SPEED=0
[[ $THREADS == auto ]] && EST_SPEED=$(est '15 + 0.5 * g')
EST_BENCH=$(est "40 + g + $n_prompts * $n_methods * $NTOK * $BENCH_MS_PER_TOKEN / 1000")
EST_FIRST=$((EST_WRITE + EST_QUANT + EST_PROBES + EST_AGREE + EST_SPEED + EST_BENCH))
EST_NEXT=$((EST_WRITE + EST_QUANT + EST_AGREE + EST_BENCH))  # a further noise level
total=$((EST_SETUP + EST_BUILD + EST_FIRST))
fit=1
for ((k = 1; k < ${#NOISE_LIST[@]}; k++)); do
    ((total + EST_NEXT <= TOTAL_BUDGET - RESERVE)) && fit=$((fit + 1))
    total=$((total + EST_NEXT))
done
if ((EST_SETUP + EST_BUILD + EST_FIRST > TOTAL_BUDGET - RESERVE)); then fit=0; fi
disk_need=$(awk -v n="${#NOISE_LIST[@]}" -v b="$PAIR_BYTES" -v d="$DGB" \
    'BEGIN { printf "%.1f", (n * b) / 1e9 + d }')
PLAN_TEXT="~${total}s of ${TOTAL_BUDGET}s for ${#NOISE_LIST[@]} noise level(s), $fit fit"
say "time plan (estimates, seconds): setup $EST_SETUP, build $EST_BUILD ($build_how);" \
    "first level: pair written $EST_WRITE, quantised $EST_QUANT, probes $EST_PROBES" \
    "($n_probes), agreement $EST_AGREE, thread sweep $EST_SPEED, bench $EST_BENCH" \
    "($n_prompts prompts x $n_methods methods x $NTOK tokens at ${BENCH_MS_PER_TOKEN} ms);" \
    "each further level $EST_NEXT; total ~${total}s of ${TOTAL_BUDGET}s"
say "disk plan: target ${TGB} GB f16 per level, drafter ${DGB} GB (shared), quantised" \
    "copies ~${QGB} GB per level: ~${disk_need} GB for ${#NOISE_LIST[@]} level(s);" \
    "$(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free (a level's files are" \
    "deleted after its bench when the next would not fit)"
if ((fit < ${#NOISE_LIST[@]})); then
    say "WARNING: by this estimate only $fit of ${#NOISE_LIST[@]} noise level(s)" \
        "(${NOISE_LIST[*]}) fit in TOTAL_BUDGET=$TOTAL_BUDGET; each further level is" \
        "checked again against the time left and SKIPPED, loudly, if it does not fit"
fi
phase_end 0 "$PLAN_TEXT"

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
        say "unpacking the carried build from $BUNDLE/build:" \
            "$(ls "$BUNDLE"/build/llama-build.tar.xz.part* | xargs -n1 basename | tr '\n' ' ')"
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
            # the package alone, its libraries' copies (libX.so, .so.0) made links: 10 MB;
            # xz blocks of 32 MiB so that its threads share the work (one block otherwise)
            (rm -rf "$WORK/packdir" && mkdir -p "$WORK/packdir" &&
                cp -a "$LLAMA_SITE"/.stamp "$LLAMA_SITE"/llama_cpp "$LLAMA_SITE"/*.dist-info \
                    "$WORK/packdir/" &&
                for real in "$WORK"/packdir/llama_cpp/lib/*.so.*.*; do  # fully versioned
                    for f in "$WORK"/packdir/llama_cpp/lib/*; do
                        # (an `if`: a last file that is no copy must not fail the packing)
                        if [[ -f $f && ! -L $f && $f != "$real" ]] && cmp -s "$f" "$real"; then
                            ln -sf "$(basename "$real")" "$f"
                        fi
                    done
                done &&
                tar -C "$WORK/packdir" -cf - . | xz -T8 -9 --block-size=32MiB |
                split -b "$PACK_PART_SIZE" -d - "$WORK/pack/llama-build.tar.xz.part") &
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
model_files() {  # model_files q|f DIR -> "TARGET DRAFT"
    if [[ $1 == q ]]; then echo "$2/target-$QUANT.gguf $2/draft-$QUANT.gguf"
    else echo "$2/target.gguf $2/draft.gguf"; fi
}

write_pair() {  # write_pair NOISE DIR: the pair, its quantised copies, the shared drafter
    local noise=$1 md=$2 shared="" m
    rm -rf "$md"
    timeout "$(limit_for 240)" "$PYTHON" "$REPO/scripts/make_timing_models.py" write "$md" \
        "${GEN_ARGS[@]}" "${QUANT_EST[@]}" --noise "$noise" ||
        fail "writing the timing models (noise $noise) failed"
    # the drafter does not depend on the noise: the first level's file serves them all
    if [[ -n $FIRST_MD && $md != "$FIRST_MD" ]] && cmp -s "$md/draft.gguf" "$FIRST_MD/draft.gguf"
    then
        ln -f "$FIRST_MD/draft.gguf" "$md/draft.gguf" && shared="drafter shared"
    fi
    if [[ $QUANT != none ]]; then
        for m in target draft; do
            if [[ $m == draft && -n $shared && -f $FIRST_MD/draft-$QUANT.gguf ]]; then
                ln -f "$FIRST_MD/draft-$QUANT.gguf" "$md/draft-$QUANT.gguf"
                continue
            fi
            timeout "$(limit_for 240)" "$PYTHON" "$REPO/scripts/gpu_probe.py" quantize \
                "$md/$m.gguf" "$md/$m-$QUANT.gguf" "$QUANT" \
                >>"$WORK/quantize.log" 2>&1 || fail "quantizing $m to $QUANT failed"
            grep "^\[probe" "$WORK/quantize.log" | tail -1
        done
    fi
    ls -la "$md"
    say "disk: $(du -sh "$md" | cut -f1) in $md; $(df -h --output=avail "$WORK" | tail -1 |
        tr -d ' ') free"
    PAIR_NOTE="noise $noise, target $(du -h "$md/target.gguf" | cut -f1) f16"
    [[ $QUANT != none ]] && PAIR_NOTE+=", $QUANT copies"
    [[ -n $shared ]] && PAIR_NOTE+=", $shared"
}

run_probes() {  # each configuration in its own process: an abort names its last call
    local cfg tgt drf rc
    for cfg in $PROBES; do
        read -r tgt drf <<<"$(model_files "${cfg%%:*}" "$FIRST_MD")"
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
}

run_speed() {  # the thread split for the bench, timed on the first level's pair
    local tgt drf rc split dthreads round_ms
    read -r tgt drf <<<"$(model_files "${CONFIG%%:*}" "$FIRST_MD")"
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
}

bench_setup() {  # once: the methods this specli knows, and the flags every bench shares
    local help i f v
    help=$("${SPECLI[@]}" bench --help 2>&1) || fail "specli bench --help failed: $help"
    # methods this specli knows (parse_methods raises on the others)
    RUN_METHODS=$("$PYTHON" - "$METHODS" <<'EOF2'
import sys
from specli.bench import parse_methods
ok = []
for m in sys.argv[1].split(","):
    if not m.strip():
        continue
    try:
        parse_methods(m)
        ok.append(m.strip())
    except Exception as e:  # noqa: BLE001
        print(f"WARNING: method {m!r} dropped: {e}", file=sys.stderr)
print(",".join(ok))
EOF2
    ) || fail "cannot check the methods"
    [[ -n $RUN_METHODS ]] || fail "none of METHODS=$METHODS is known to this specli"
    BASE_FLAGS=(--methods "$RUN_METHODS" --limit "$LIMIT" -n "$NTOK" --repeats "$REPEATS"
        --branches "${CONFIG##*:}")
    [[ -n $CATEGORIES ]] && BASE_FLAGS+=(--categories "$CATEGORIES")
    [[ -n $THREADS ]] && BASE_FLAGS+=(--threads "$THREADS")
    if [[ $NGL != 0 ]]; then
        grep -q -- '--gpu-layers' <<<"$help" || fail "specli bench has no -ngl/--gpu-layers flag yet"
        BASE_FLAGS+=(-ngl "$NGL")
    fi
    read -r -a dflags <<<"$DRAFT_FLAGS"
    i=0
    while ((i < ${#dflags[@]})); do  # FLAG VALUE pairs
        f=${dflags[i]} v=${dflags[i + 1]:-}
        if grep -q -- "$f" <<<"$help"; then BASE_FLAGS+=("$f" "$v"); else
            say "WARNING: specli bench has no $f flag: dropped '$f $v'"
        fi
        i=$((i + 2))
    done
    read -r -a extra <<<"$EXTRA_BENCH_FLAGS"
    BASE_FLAGS+=("${extra[@]}")
    BENCH_FLAGS_TEXT="${BASE_FLAGS[*]} --draft DRAFT --out bench-noiseX"
}

run_bench() {  # run_bench TAG DIR: one `specli bench` into $WORK/bench-TAG
    local tag=$1 md=$2 target draft lim rc note
    read -r target draft <<<"$(model_files "${CONFIG%%:*}" "$md")"
    local flags=("${BASE_FLAGS[@]}" --draft "$draft" --out "$WORK/bench-$tag")
    lim=$(limit_for "$BENCH_TIMEOUT")
    say "specli bench $target ${flags[*]} (limit ${lim}s; estimate ${EST_BENCH}s)"
    # SIGINT first: the bench then writes the summary of what finished.  SPECLI_TRACE: every
    # round's pick and budget state (specli/lineup.py), to read why a budget chose what it did
    mkdir -p "$WORK/bench-$tag"
    SPECLI_TRACE="$WORK/bench-$tag/trace.jsonl" timeout -s INT -k 20 "$lim" \
        "${SPECLI[@]}" bench "$target" "${flags[@]}" 2>&1 | tee "$WORK/bench-$tag.log"
    rc=${PIPESTATUS[0]}
    [[ -f $WORK/bench-$tag/trace.jsonl ]] && gzip -f "$WORK/bench-$tag/trace.jsonl"
    # target passes by size, same shape as the pass before or not; drafting by lag
    [[ -f $WORK/bench-$tag/trace.jsonl.gz ]] &&
        timeout 60 "$PYTHON" "$REPO/scripts/trace_report.py" "$WORK/bench-$tag/trace.jsonl.gz" \
            >"$WORK/bench-$tag/trace_report.md" 2>&1 && cat "$WORK/bench-$tag/trace_report.md"
    [[ -f $WORK/bench-$tag/summary.json ]] ||
        { phase_end "$rc"; fail "the bench ($tag) wrote no summary"; }
    "$PYTHON" - "$WORK/bench-$tag" >"$WORK/methods-$tag.md" <<'EOF2'
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
EOF2
    cat "$WORK/methods-$tag.md"
    note="methods $RUN_METHODS"
    ((rc == 124)) && note="stopped at ${lim}s: partial"
    phase_end "$rc" "$note"
    ((rc == 0)) || STATUS="bench $tag rc $rc (partial results)"
}

# ------------------------------------------------------------------------------------------
# per noise level: pair, (probes and thread split: first level only), agreement, bench
FIRST_MD=""
SKIPPED_LEVELS=()
BENCH_READY=0
for ((li = 0; li < ${#NOISE_LIST[@]}; li++)); do
    noise=${NOISE_LIST[li]}
    tag=noise$noise
    md=$WORK/models-$tag
    if ((li > 0)); then
        left=$(($(remaining) - RESERVE))
        if ((left < EST_NEXT)); then  # not started rather than stopped half way
            skipped "noise $noise" "needs ~${EST_NEXT}s (pair ${EST_WRITE}, agreement \
${EST_AGREE}, bench ${EST_BENCH}), ${left}s left of TOTAL_BUDGET=$TOTAL_BUDGET"
            SKIPPED_LEVELS+=("$noise")
            continue
        fi
        # disk: the earlier levels' targets go when this one's would not fit (1 GB spare)
        avail=$(df -B1 --output=avail "$WORK" | tail -1 | tr -d ' ')
        if ((avail < PAIR_BYTES + 1000000000)); then
            say "disk: $((avail / 1000000000)) GB free, ~$((PAIR_BYTES / 1000000000)) GB" \
                "needed: deleting the earlier levels' targets (their results are kept)"
            rm -f "$WORK"/models-noise*/target*.gguf
        fi
    fi
    phase "models $tag"
    write_pair "$noise" "$md"
    [[ -z $FIRST_MD ]] && FIRST_MD=$md
    TAGS+=("$tag")
    phase_end 0 "$PAIR_NOTE"

    if ((li == 0)); then
        phase probe
        if [[ -z $PROBES ]]; then
            phase_end 0 "skipped (PROBES=none)"
        else
            run_probes
            say "probes passed: ${PASSED[*]:-none}"
            phase_end 0 "passed: ${PASSED[*]:-none}"
        fi
        if [[ -n $BENCH_CONFIG ]]; then CONFIG=$BENCH_CONFIG
        elif [[ -n $PROBES ]]; then CONFIG=${PASSED[0]:-}
        elif [[ $QUANT != none ]]; then CONFIG=q:3
        else CONFIG=f:3; fi
        [[ -n $CONFIG ]] || fail "no probe configuration passed: nothing to bench"
        say "bench configuration $CONFIG (models:branches)"
        pack_wait  # xz on 8 cores would slow the CPU drafter: before the sweep and the bench
        phase speed
        if [[ $THREADS == auto ]]; then run_speed; else
            phase_end 0 "skipped (THREADS=${THREADS:-default})"; fi
    fi

    phase "agreement $tag"
    # greedy per-token agreement of the pair, measured apart from specli (a cross-check of
    # the bench's acceptance), with the target where the bench puts it
    left=$(($(remaining) - RESERVE))
    if ((left < EST_AGREE + EST_BENCH)); then
        say "SKIPPED: ${left}s left, kept for the bench (agreement ~${EST_AGREE}s," \
            "bench ~${EST_BENCH}s)"
        phase_end 0 "SKIPPED (time)"
    else
        timeout -k 5 "$(limit_for 90)" "$PYTHON" "$REPO/scripts/make_timing_models.py" measure \
            "$md" -n 64 --gpu-layers "$NGL" --threads "$(($(nproc) < 8 ? $(nproc) : 8))"
        rc=$?
        phase_end "$rc" "$( ( ((rc == 0)) && cut -c1-60 "$md/agreement.json") ||
            echo "not measured")"
    fi

    phase "bench $tag"
    ((BENCH_READY)) || { bench_setup; BENCH_READY=1; }
    run_bench "$tag" "$md"
    BENCHED+=("$noise")
done
if ((${#SKIPPED_LEVELS[@]} > 0)); then
    STATUS+="; SKIPPED noise level(s) ${SKIPPED_LEVELS[*]} (time)"
fi

finish

#!/usr/bin/env bash
# Fill .gpu/ with what scripts/gpu_check.sh needs on a GPU machine with no network (issue #8):
#   (a) llama-cpp-python 0.3.36's source, trimmed to what a CUDA library build compiles,
#   (b) wheels of the Python packages that machine lacks (diskcache, gguf),
#   (c) the SmolLM2 tokenizer vocabulary for the random-weight timing models.
# .gpu/build/ (a CUDA build that gpu_check.sh handed back, see its header) is left as it is,
# kept out of MANIFEST.txt and the bundle's own size check, and counted in the total that
# travels.
# Why a bundle: the whole working tree that travels is capped at 64 MiB, and the sdist
# alone is 76.6 MB (mostly vendor/llama.cpp/models and docs).  Run here, from anywhere:
#   bash scripts/pack_gpu_bundle.sh
# Env: PYTHON (a Python with pip and the gguf package, default .venv/bin/python),
#      SMOLLM2_GGUF (tokenizer source), SDIST_CACHE (where the 76.6 MB sdist is kept).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE="$REPO/.gpu"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LCP_VERSION=0.3.36
SMOLLM2_GGUF=${SMOLLM2_GGUF:-$HOME/.cache/specli/models/SmolLM2-135M-Instruct.Q4_1.gguf}
SDIST_CACHE=${SDIST_CACHE:-$HOME/.cache/specli-gpu-bundle}
MAX_MB=30

# wheels for the GPU machine (Python 3.12, x86-64): pure-Python ones, pinned
WHEELS=("diskcache==5.6.3" "gguf==0.19.0")

mkdir -p "$BUNDLE" "$SDIST_CACHE"
exclude="$REPO/.git/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

# (a) trimmed llama-cpp-python source ------------------------------------------------------
sdist="$SDIST_CACHE/llama_cpp_python-$LCP_VERSION.tar.gz"
if [[ ! -f $sdist ]]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" \
        -d "$SDIST_CACHE"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LCP_VERSION"
lc="$src/vendor/llama.cpp"

keep_only() {  # keep_only DIR NAME...: delete every entry of DIR (dotfiles too) not named
    local dir=$1 entry name keep
    shift
    for entry in "$dir"/* "$dir"/.[!.]*; do
        [[ -e $entry ]] || continue
        name=$(basename "$entry")
        keep=0
        for k in "$@"; do [[ $name == "$k" ]] && keep=1; done
        ((keep)) || rm -rf "$entry"
    done
}

# The Python package and its build files (the README is the wheel's metadata readme).
keep_only "$src" CMakeLists.txt pyproject.toml PKG-INFO README.md LICENSE.md llama_cpp vendor
# llama.cpp: only the library, ggml and the common library that llama-cpp-python's
# CMakeLists forces on (which needs vendor/).  gpu_check.sh builds with LLAVA_BUILD=OFF,
# so tools/ (mtmd) is not needed; tests, examples, tools and the app are off when llama.cpp
# is a subproject.
keep_only "$lc" CMakeLists.txt LICENSE cmake common ggml include licenses src vendor
# ggml: only the CPU, CUDA and BLAS backends (each other backend's folder is only added
# when its GGML_<NAME> option is on).
for d in "$lc"/ggml/src/ggml-*/; do
    case $(basename "$d") in ggml-cpu | ggml-cuda | ggml-blas) ;; *) rm -rf "$d" ;; esac
done

trimmed="$BUNDLE/llama_cpp_python-$LCP_VERSION-trimmed.tar.gz"
tar -czf "$trimmed" -C "$work" "llama_cpp_python-$LCP_VERSION"
echo "llama-cpp-python $LCP_VERSION source, trimmed: $(du -sh "$src" | cut -f1) unpacked," \
    "$(du -h "$trimmed" | cut -f1) packed"

# (b) wheels ---------------------------------------------------------------------------------
rm -rf "$BUNDLE/wheels"
mkdir -p "$BUNDLE/wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" "${WHEELS[@]}"

# (c) tokenizer ------------------------------------------------------------------------------
if [[ ! -f $SMOLLM2_GGUF ]]; then
    echo "missing $SMOLLM2_GGUF: run 'specli pull smollm2-135m-instruct' first" >&2
    exit 1
fi
"$PYTHON" "$REPO/scripts/make_timing_models.py" export-tokenizer "$SMOLLM2_GGUF" \
    "$BUNDLE/smollm2-tokenizer.json.gz"

# manifest and size check --------------------------------------------------------------------
{
    echo "# .gpu bundle for scripts/gpu_check.sh, packed $(date -u +%FT%TZ)"
    echo "# llama-cpp-python $LCP_VERSION sdist (PyPI), trimmed; wheels from PyPI;"
    echo "# tokenizer vocabulary of SmolLM2-135M-Instruct (Apache-2.0)," \
        "from $(basename "$SMOLLM2_GGUF")"
    (cd "$BUNDLE" && find . -path ./build -prune -o -type f ! -name MANIFEST.txt -print0 |
        sort -z | xargs -0 sha256sum)
} >"$BUNDLE/MANIFEST.txt"
cat "$BUNDLE/MANIFEST.txt"
size_kb=$(du -sk --exclude=build "$BUNDLE" | cut -f1)
echo "bundle $BUNDLE: $((size_kb / 1024)) MB ($size_kb KiB) without build/"
if ((size_kb > MAX_MB * 1024)); then
    echo "bundle is over $MAX_MB MB" >&2
    exit 1
fi
if [[ -d $BUNDLE/build ]]; then  # the working tree that travels is capped at 64 MiB
    total_kb=$(du -sk "$BUNDLE" | cut -f1)
    echo "with the carried CUDA build (build/): $((total_kb / 1024)) MB" \
        "$( ((total_kb > 58 * 1024)) && echo "- WARNING: near the 64 MiB that travels")"
fi

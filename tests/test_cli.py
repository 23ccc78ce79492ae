"""The command line as a user meets it: real subprocesses on tiny generated models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import write_tiny_model

SPECLI = str(Path(sys.executable).parent / "specli")


def run(args, env, stdin: str | None = "", timeout=120):
    return subprocess.run(
        [SPECLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


# a calibration timed while the host or a neighbour took a core says so (and saves
# nothing): a note about the machine the test runs on, not about the command
BUSY_NOTE = "note: other processes kept "


def told(stderr: str) -> list[str]:
    """stderr's non-blank lines, less the note a busy machine may add."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(BUSY_NOTE)]


def assert_one_line_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = told(p.stderr)
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_streams_text_and_stats(tiny_paths, env):
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    p = run(["generate", t, "--draft", d, "-p", "Hello there", "-n", "12", "--stats"], env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "method auto" in p.stderr and "accepted" in p.stderr
    assert "rounds drafted by:" in p.stderr  # which of auto's members drafted
    assert "auto chose each round among: none, hd, draft, draft+hd" in p.stderr


def test_generate_json(tiny_paths, env):
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    p = run(["generate", t, "-d", d, "-m", "draft", "-p", "Hello", "-n", "10", "--json"], env)
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert set(obj) >= {"text", "tokens", "n_prompt", "n_generated", "stop_reason", "method",
                        "stats"}
    assert set(obj["stats"]) >= {"drafted", "accepted", "acceptance_rate", "mean_accepted",
                                 "target_forwards", "prefill_tok_s", "decode_tok_s", "wall_s"}
    assert obj["method"] == "draft" and obj["n_generated"] == len(obj["tokens"]) <= 10
    assert sum(obj["stats"]["rounds_by"].values()) == obj["stats"]["target_forwards"]


def test_a_draft_with_another_tokenizer_just_works(tiny_paths, env):
    t, o = str(tiny_paths["target"]), str(tiny_paths["other"])
    p = run(["generate", t, "-d", o, "-m", "draft", "--budget", "fixed:3", "-p", "Hello there",
             "-n", "12", "--stats"], env)
    assert p.returncode == 0, p.stderr
    assert "cross-tokenizer drafting (other.gguf has another tokenizer)" in p.stderr
    a = run(["generate", t, "-d", o, "-p", "Hello there", "-n", "8", "--json"], env)  # auto
    assert a.returncode == 0 and json.loads(a.stdout)["method"] == "auto", a.stderr


def test_prompt_from_stdin_and_file(tiny_paths, env, tmp_path):
    t = str(tiny_paths["target"])
    a = run(["generate", t, "-m", "none", "-n", "8", "--json"], env, stdin="Tell me a story")
    f = tmp_path / "p.txt"
    f.write_text("Tell me a story")
    b = run(["generate", t, "-m", "none", "-n", "8", "--json", "-f", str(f)], env)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_seeded_sampling_is_reproducible(tiny_paths, env):
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    args = ["generate", t, "-d", d, "-p", "Hi", "-n", "16", "-t", "0.9", "--seed", "5", "--json"]
    a, b = run(args, env), run(args, env)
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["generate", "/nope/model.gguf", "-p", "x"], ["model file not found"]),
        (["generate", "no-such-model", "-p", "x"], ["unknown model"]),
        (["generate", "{target}", "-p", "x", "-t", "-1"], ["temperature"]),
        (["generate", "{target}", "-p", "x", "--top-p", "0"], ["top_p"]),
        (["generate", "{target}", "-p", "x", "--top-k", "-3"], ["top_k"]),
        (["generate", "{target}", "-p", "   "], ["empty prompt"]),
        (["generate", "{target}", "-f", "/nope/prompt.txt"], ["prompt file not found"]),
        (["generate", "{target}", "-p", "word " * 200, "--ctx", "64"], ["context holds"]),
        (["generate", "{target}", "-d", "{other}", "-m", "draft+hd", "-p", "x"],
         ["draft+hd needs a draft model with the target's tokenizer"]),
        (["generate", "{target}", "-m", "auto", "--budget", "fixed:x", "-p", "x"],
         ["invalid budget"]),
        (["generate", "{notgguf}", "-p", "x"], ["not a GGUF file"]),
        (["generate", "{target}", "-m", "draft", "-p", "x"], ["needs a draft model"]),
        (["generate", "{target}", "-m", "fast", "-p", "x"], ["unknown method"]),
        (["pull", "qwen-nonexistent"], ["unknown model"]),
        (["generate", "/nope/:100:.gguf", "-p", "x"], [":100:.gguf"]),  # not an emoji
        (["generate", "{target}", "-p", "x", "-t", "0.5", "--seed", "-1"], ["seed", ">= 0"]),
        (["chat", "{target}", "-t", "0.5", "--seed", "-1"], ["seed", ">= 0"]),
        (["bench", "{target}", "--methods", "none", "--limit", "1", "-n", "4", "-o",
          "{notgguf}"], ["fake.gguf", "exists"]),  # a file where results go
        (["bench", "{target}", "--methods", "none", "--categories", ""], ["--categories"]),
        (["generate", "{target}", "-m", "hd", "--budget", "fixed:12", "-k", "4", "-p", "x"],
         ["fixed:12", "--draft-max 4"]),
        (["generate", "{target}", "-m", "hd", "--budget", "fixed:65", "-p", "x"],
         ["fixed:65", "64"]),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_paths, env, tmp_path, args, needles):
    notgguf = tmp_path / "fake.gguf"
    notgguf.write_text("this is not a model")
    fill = {"target": tiny_paths["target"], "other": tiny_paths["other"], "notgguf": notgguf}
    p = run([a.format(**fill) for a in args], env)
    assert_one_line_error(p, *needles)


def test_a_fixed_budget_beyond_the_default_draft_max_drafts_that_many(tiny_paths, env):
    """--budget fixed:12 used to draft 8 a round (-k's default) while --stats said 12."""
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    p = run(["generate", t, "-d", d, "-m", "draft", "--budget", "fixed:12", "-n", "40",
             "-p", "Once upon a time", "--json"], env)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["stats"]
    assert max(s["drafted"] / max(1, s["draft_rounds"]), s["pass_size"] - 1) > 8


def test_gpu_layers_on_a_build_without_gpu_support_say_so(tiny_paths, env):
    import llama_cpp

    p = run(["generate", str(tiny_paths["target"]), "-m", "none", "-ngl", "5", "-n", "2",
             "-p", "Hi"], env)
    assert p.returncode == 0, p.stderr
    noted = "no GPU support, so -ngl is ignored" in p.stderr
    assert noted != bool(llama_cpp.llama_supports_gpu_offload())


def test_version(env):
    from importlib.metadata import version

    p = run(["--version"], env)
    assert p.returncode == 0 and p.stdout == f"specli {version('specli')}\n", p.stderr


def test_empty_stdin_is_an_error(tiny_paths, env):
    p = run(["generate", str(tiny_paths["target"])], env, stdin="")
    assert_one_line_error(p, "empty prompt")


def test_unreadable_model_is_an_error(tiny_paths, env, tmp_path):
    if os.geteuid() == 0:
        # root reads anything: a directory stands in for an unreadable file
        p = run(["generate", str(tmp_path), "-p", "x"], env)
        assert_one_line_error(p, "directory")
    else:
        f = tmp_path / "locked.gguf"
        f.write_bytes(Path(tiny_paths["target"]).read_bytes())
        f.chmod(0)
        assert_one_line_error(run(["generate", str(f), "-p", "x"], env), "not readable")


@pytest.mark.parametrize("args", ["generate '{target}' -m none -n 400 -p 'Once upon a time'",
                                  "models"])  # rich's own answer to a closed pipe: exit 1
def test_closed_pipe_exits_quietly(tiny_paths, env, args):
    cmd = f"set -o pipefail; '{SPECLI}' {args.format(**tiny_paths)} | head -c 10"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert len(p.stdout.encode()) <= 10


def test_stats_survive_a_closed_pipe(tiny_paths, env):
    """`| head` closing stdout lost --stats (stderr) too."""
    cmd = (f"set -o pipefail; '{SPECLI}' generate '{tiny_paths['target']}' -m none -n 400 "
           "-p 'Once upon a time' --stats | head -c 10")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "method none, stop: interrupted" in p.stderr and "Traceback" not in p.stderr
    cmd = f"'{SPECLI}' generate '{tiny_paths['target']}' -m none -n 4 -p 'Hi' >&-"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(p, "stdout is closed")  # was an internal error (exit 70)


@pytest.mark.parametrize(("args", "redirect", "needle"), [
    ("generate '{target}' -n 4", "<&-", "stdin is closed"),
    ("generate '{target}' -n 4 -f -", "<&-", "stdin is closed"),
    ("chat '{target}' -n 4", "<&-", "stdin is closed"),
    ("models", ">&-", "stdout is closed"),
    ("index build '{corpus}' --model '{target}' -o notes", ">&-", "stdout is closed"),
])
def test_a_closed_stdin_or_stdout_is_one_line(tiny_paths, env, tmp_path, args, redirect,
                                              needle):
    """Python makes a stream the shell closed None: reading it was an internal error
    (exit 70), and printing to it lost the output with exit 0 (index build's path)."""
    corpus = tmp_path / "notes.txt"
    corpus.write_text("the people said hello to the world\n" * 3)
    cmd = f"'{SPECLI}' {args.format(corpus=corpus, **tiny_paths)} {redirect}"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1
    assert_one_line_error(p, needle)


def test_chat_with_a_model_that_has_no_chat_template_fails_once_pointing_to_generate(
        tmp_path, env):
    """It said "use --raw", which chat does not have, and said it for every line."""
    plain = write_tiny_model(tmp_path / "plain.gguf", seed=0, chat_template=False)
    p = run(["chat", str(plain), "-m", "none", "-n", "4"], env, stdin="Hello\nAgain\n")
    assert_one_line_error(p, "plain.gguf has no chat template", "specli generate --raw")
    assert p.returncode == 1 and p.stdout == ""


def test_a_chat_script_with_windows_line_ends_is_answered_as_with_unix_ones(tiny_paths, env):
    """The turn kept its \r: another prompt, another answer, from the same script."""
    t = str(tiny_paths["target"])
    unix = run(["chat", t, "-m", "none", "-n", "8"], env, stdin="Hello there\n/stats\n")
    windows = run(["chat", t, "-m", "none", "-n", "8"], env,
                  stdin="Hello there\r\n/stats\r\n")
    assert unix.returncode == windows.returncode == 0, windows.stderr
    assert unix.stdout.strip() and windows.stdout == unix.stdout

    def prompt_line(p):
        return next(ln for ln in p.stderr.splitlines() if ln.startswith("prompt ")).split(",")[0]

    assert prompt_line(windows) == prompt_line(unix)  # the same tokens went in


def test_a_long_chat_drops_its_oldest_turns_instead_of_refusing(tiny_paths, env):
    """Once the conversation fills --ctx, every turn used to be refused ("context holds")
    while the script went on, exit 0.  The oldest turns now leave instead."""
    script = "".join(f"Tell me something about the number {i}, please.\n" for i in range(8))
    p = run(["chat", str(tiny_paths["target"]), "-m", "none", "-n", "16", "--ctx", "128"],
            env, stdin=script)
    assert p.returncode == 0, p.stderr
    assert "context holds" not in p.stderr
    assert "left the conversation to fit --ctx 128" in p.stderr
    assert p.stdout.count("\n") >= 8  # every turn answered (an answer may hold more)


def test_a_scripted_chat_turn_that_cannot_fit_fails_the_script(tiny_paths, env):
    """A piped line longer than the context printed an error, went on and exited 0; a
    --system message that leaves no room failed once per line, exit 0."""
    t = str(tiny_paths["target"])
    long = "word " * 400
    p = run(["chat", t, "-m", "none", "-n", "8", "--ctx", "128"], env,
            stdin=f"Hello!\n{long}\nnever answered\n")
    assert_one_line_error(p, "specli: error:", "context holds 128")
    assert p.stdout.count("\n") >= 1  # the first turn was answered, and kept
    p = run(["chat", t, "-m", "none", "-n", "8", "--ctx", "128", "--system", long], env,
            stdin="Hello!\nAgain\n")
    assert_one_line_error(p, "specli: error: the --system message", "context holds 128")
    assert p.stdout == ""


def test_typed_chat_keeps_its_prompt_off_a_redirected_stdout(tiny_paths, env):
    """`specli chat > answers.txt` at a terminal: the `>>> ` prompts went into the file."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([SPECLI, "chat", str(tiny_paths["target"]), "-m", "none", "-n", "8"],
                            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    os.close(follower)
    try:
        os.write(leader, b"Hello there\n")
        os.write(leader, b"\x04")  # Ctrl-D at the next prompt: leave
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() and b">>>" not in out
    assert err.count(b">>> ") == 2 and b"bye" in err


def test_an_answer_the_context_cuts_says_so(tiny_paths, env):
    """It stopped mid-sentence, exit 0, with nothing said unless --stats was asked."""
    t = str(tiny_paths["target"])
    p = run(["generate", t, "-m", "none", "-n", "1000", "--ctx", "48", "-p", "Hello"], env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == ("note: the context is full (--ctx 48): the answer stops "
                                "here; a larger --ctx lets it go on")
    p = run(["chat", t, "-m", "none", "-n", "1000", "--ctx", "64"], env, stdin="Hello\n")
    assert p.returncode == 0 and "(the context is full: the answer stops here" in p.stderr
    assert "--ctx is 64: a larger --ctx lets it go on" in p.stderr


def test_a_context_the_model_caps_does_not_ask_for_a_larger_ctx(tmp_path, env):
    """--ctx above what the model was trained for is capped by the runtime: the note then
    names that limit instead of asking for the --ctx the user already gave."""
    t = write_tiny_model(tmp_path / "short.gguf", seed=1, n_ctx_train=64)
    p = run(["generate", str(t), "-m", "none", "-n", "1000", "--ctx", "4096", "-p", "Hello"],
            env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == ("note: the context is full (--ctx 64): the answer stops here; "
                                "short.gguf was trained for 64 tokens, so a larger --ctx "
                                "cannot help; a shorter prompt can")
    p = run(["generate", str(t), "-m", "none", "--ctx", "4096", "-p", "Hello there " * 40],
            env)
    assert_one_line_error(p, "but the context holds 64; short.gguf was trained for 64 tokens: "
                             "shorten the prompt")


def test_chat_is_scriptable(tiny_paths, env):
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    script = ("Hello!\n/stats\nTell me more.\n/reset\n/stats\n/bogus\nAgain\n/exit\n"
              "never read\n")
    p = run(["chat", t, "-d", d, "-n", "8"], env, stdin=script)
    assert p.returncode == 0, p.stderr
    assert len([ln for ln in p.stdout.splitlines()]) >= 3  # three answers
    assert "method auto" in p.stderr  # /stats
    assert "conversation cleared" in p.stderr
    assert "unknown command /bogus" in p.stderr
    assert "(no answer yet)" in p.stderr  # /stats after /reset: not the forgotten answer


def test_a_bad_flag_or_value_is_one_line_too(env):
    """click's usage errors were four lines (Usage, Try, a blank, Error); --threads had
    no ceiling (10000 on 2 cores did not finish 4 tokens in 5 minutes)."""
    cases = [
        (["generate", "-n", "abc", "-p", "hi"], "'--max-tokens' / '-n'", "generate --help"),
        (["generate", "-n", "-1", "-p", "hi"], "'--max-tokens' / '-n'", "generate --help"),
        (["generate", "--threads", str((os.cpu_count() or 1) + 1), "-p", "hi"],
         "'--threads'", "generate --help"),
        (["chat", "--draft-threads", "100000"], "'--draft-threads'", "chat --help"),
        (["chat", "--json"], "No such option: --json", "chat --help"),
        (["pull"], "Missing argument", "pull --help"),
        (["bogus"], "No such command 'bogus'", "specli --help"),
    ]
    for args, *needles in cases:
        p = run(args, env)
        assert_one_line_error(p, "specli: error:", *needles)
        assert p.returncode == 2 and p.stdout == ""
    p = run([], env)  # no command: the help, as before
    assert p.returncode == 2 and "Usage: specli" in p.stdout + p.stderr


def test_flags_that_would_be_ignored_say_so(tiny_paths, env):
    """--draft '' ran as if absent, --device tpu on a GGUF and -m none --draft X ran
    without a word."""
    t = str(tiny_paths["target"])
    assert_one_line_error(run(["generate", t, "--draft", "", "-p", "hi"], env),
                          "--draft is empty")
    assert_one_line_error(run(["generate", t, "--device", "tpu", "-p", "hi"], env),
                          "unknown --device 'tpu'; choose from auto, cpu, gpu, npu")
    p = run(["generate", t, "-m", "none", "--draft", "nosuch", "-p", "hi", "-n", "2"], env)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    assert p.stderr.strip() == "note: -m none uses no draft model: --draft nosuch is not loaded"
    corpora = Path(env["SPECLI_HOME"]) / "corpora"
    corpora.mkdir(parents=True)
    (corpora / "docs.sqlite").touch()  # never opened by -m none
    p = run(["generate", t, "-m", "none", "--corpus", "docs", "-p", "hi", "-n", "2"], env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == ("note: -m none drafts from no n-gram index: --corpus docs is "
                                "not used (hd, draft+hd and auto use it)")
    # the audit of 2026-11-29: a corpus -m none never opens was still required to exist,
    # and --budget / --branches went unused without a word
    p = run(["generate", t, "-m", "none", "--corpus", "nosuch", "--budget", "fixed:3",
             "--branches", "5", "-p", "hi", "-n", "2"], env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        "note: -m none drafts from no n-gram index: --corpus nosuch is not used (hd, draft+hd "
        "and auto use it)",
        "note: -m none drafts nothing: --budget fixed:3 is not used",
        "note: -m none verifies no candidate trees: --branches 5 is not used (hd, duo and auto "
        "draft them)"]
    p = run(["generate", t, "-m", "hd", "--branches", "5", "-p", "hi", "-n", "2",
             "--no-history"], env)
    assert p.returncode == 0 and not told(p.stderr), p.stderr
    assert_one_line_error(run(["calibrate", t, "--device", "tpu"], env), "unknown --device")
    assert_one_line_error(run(["calibrate", t, "-d", ""], env), "--draft is empty")
    # checked before the models load and calibrate (and not after the answer)
    p = run(["generate", t, "-m", "hd", "--corpus", "nosuch", "-p", "hi"], env)
    assert_one_line_error(p, "no corpus index named 'nosuch'")
    assert "loading" not in p.stderr
    p = run(["generate", t, "-m", "auto", "-p", "hi", "-n", "2"],
            {**env, "SPECLI_TRACE": "/nonexistent/dir/trace"})
    assert_one_line_error(p, "SPECLI_TRACE=/nonexistent/dir/trace cannot be written")
    assert p.stdout == ""  # it generated the whole answer first
    # and before the load's calibration (which a busy machine could also have noted)
    calibrations = Path(env["SPECLI_HOME"]) / "calibration"
    shutil.rmtree(calibrations, ignore_errors=True)
    p = run(["generate", t, "-m", "auto", "-p", "hi", "-n", "2"],
            {**env, "SPECLI_TRACE": "/nonexistent/dir/trace"})
    assert_one_line_error(p, "SPECLI_TRACE=/nonexistent/dir/trace cannot be written")
    assert not calibrations.exists()
    p = run(["generate", t, "-m", "none", "-p", "hi", "-n", "2"],  # -m none writes no trace
            {**env, "SPECLI_TRACE": "/nonexistent/dir/trace"})
    assert p.returncode == 0 and p.stdout.strip(), p.stderr


def test_export_errors_are_one_line_with_nothing_before(env, tmp_path):
    """Every export error began with a blank line (an empty progress display)."""
    p = run(["export", str(tmp_path / "nosuch.gguf")], env)
    assert_one_line_error(p, "model file not found")
    assert p.stderr.startswith("specli: error:"), repr(p.stderr)
    p = run(["export", str(tmp_path / "nosuch.gguf"), "--force", "--reuse"], env)
    assert_one_line_error(p, "give one of them")


def test_help_teaches(env):
    p = run(["--help"], env)
    assert p.returncode == 0 and "speculative" in p.stdout and "generate" in p.stdout
    p = run(["generate", "--help"], env)
    for flag in ("--draft", "--method", "--max-tokens", "--temperature", "--top-k", "--top-p",
                 "--seed", "--system", "--raw", "--draft-max", "--threads", "--ctx", "--stats",
                 "--json"):
        assert flag in p.stdout, flag
    # examples stay one command a line in a narrow terminal (they wrapped mid-command)
    for cmd, example in (
            ("generate", "cat notes.txt | specli generate qwen2.5-coder-1.5b-instruct "
                         "--system 'Summarise.'"),
            ("export", "specli export qwen2.5-coder-1.5b-instruct --static --window 8   "
                       "# Intel NPU"),
            ("bench", "specli bench --categories coding,summarization --limit 2 -n 64 "
                      "--out bench-out")):
        p = run([cmd, "--help"], {**env, "COLUMNS": "60"})
        assert any(ln.strip() == example for ln in p.stdout.splitlines()), p.stdout


def test_models_lists_registry(env):
    p = run(["models"], env)
    assert p.returncode == 0, p.stderr
    assert "qwen2.5-coder-1.5b-instruct" in p.stdout and "qwen2.5-coder-0.5b-instruct" in p.stdout


def test_hd_learns_from_history_across_runs(tiny_paths, env):
    """`-m hd` keeps this user's generations (per tokenizer) and drafts from them later."""
    t = str(tiny_paths["target"])
    args = ["generate", t, "-m", "hd", "-p", "Tell me about the robot", "-n", "24", "--json",
            "--budget", "fixed:4"]
    assert run(args, env).returncode == 0
    history = list((Path(env["SPECLI_HOME"]) / "history").glob("*.sqlite"))
    assert len(history) == 1
    second = json.loads(run(args, env).stdout)
    assert "history" in second["drafter"] and second["stats"]["accepted"] > 0
    p = run([*args, "--no-history"], env)
    assert p.returncode == 0 and "history" not in (json.loads(p.stdout)["drafter"] or "")


def test_lookup_method_and_budget_flags(tiny_paths, env):
    t = str(tiny_paths["target"])
    text = "one two three four. one two three four. one two three"
    p = run(["generate", t, "-m", "lookup", "-p", text, "-n", "12", "--json",
             "--budget", "fixed:3"], env)
    obj = json.loads(p.stdout)
    assert p.returncode == 0 and obj["method"] == "lookup" and obj["budget"] == "fixed:3"
    assert_one_line_error(run(["generate", t, "-m", "lookup", "-p", "x", "--budget", "sometimes"],
                              env), "invalid budget")


def run_bytes(args, env, stdin: bytes, locale: str):
    """stdin as raw bytes, under a given locale (C: Python's stdin then smuggles bad bytes
    through as surrogates; C.UTF-8: it would refuse them while decoding)."""
    e = {**env, "LC_ALL": locale, "LANG": locale}
    e.pop("PYTHONIOENCODING", None)
    e.pop("PYTHONUTF8", None)
    return subprocess.run([SPECLI, *args], input=stdin, capture_output=True, env=e, timeout=120)


@pytest.mark.parametrize("locale", ["C", "C.UTF-8"])
def test_text_that_is_not_utf8_is_one_clean_error_however_it_comes_in(
        tiny_paths, env, tmp_path, locale):
    """Issue 15: the same bytes through -f, -f -, piped stdin and a chat script give the
    same one-line error (it was an internal error, exit 70, through stdin)."""
    t = str(tiny_paths["target"])
    noise = bytes(range(256)) * 4 + "Résumé".encode("latin-1")
    latin = "Résumé of the day\n".encode("latin-1")
    f = tmp_path / "latin1.txt"
    f.write_bytes(latin)
    cases = [
        (["generate", t, "-m", "none", "-n", "4", "-f", str(f)], b""),
        (["generate", t, "-m", "none", "-n", "4", "-f", "-"], latin),
        (["generate", t, "-m", "none", "-n", "4"], latin),
        (["generate", t, "-m", "none", "-n", "4"], noise),
        (["chat", t, "-m", "none", "-n", "4"], latin),
        (["chat", t, "-m", "none", "-n", "4"], b"Hello!\n" + latin),
    ]
    for args, data in cases:
        p = run_bytes(args, env, data, locale)
        p.stderr = p.stderr.decode("utf-8", errors="replace")
        assert p.returncode == 1, (args, p.stderr)
        assert_one_line_error(p, "is not UTF-8 text (byte 0x", "iconv")
    ok = run_bytes(["generate", t, "-m", "none", "-n", "4"], env,
                   "Résumé, naïve café\n".encode(), locale)  # real UTF-8 is fine
    assert ok.returncode == 0, ok.stderr


# -- the plumbing generate, chat, bench and calibrate share (specli.session) -------------


def test_model_options_are_exactly_runtime_loads_arguments(monkeypatch):
    """One loading path: every field reaches runtime.load, and the defaults are
    runtime.load's and LoadOptions' own (a command without an option loads as before)."""
    import inspect

    from specli import runtime
    from specli.backends.base import LoadOptions
    from specli.session import ModelOptions

    load_defaults = {k: p.default for k, p in inspect.signature(runtime.load).parameters.items()}
    calls = []
    monkeypatch.setattr(runtime, "load", lambda *a, **kw: calls.append((a, kw)) or "loaded")
    opts = ModelOptions("t.gguf", "d.gguf", "hd", ctx=512, threads=3, gpu_layers=7, device="npu",
                        branches=2, budget="fixed:4", corpus="docs", history=False, tree=True,
                        draft_threads=2, draft_gpu_layers=5)
    console = object()
    assert opts.load(console) == "loaded"
    (args, kw), = calls
    assert args == ("t.gguf", "d.gguf", "hd",
                    LoadOptions(n_ctx=512, n_threads=3, n_gpu_layers=7, branches=2,
                                device="npu"), console)
    assert kw == {"budget": "fixed:4", "corpus": "docs", "history": False, "tree": True,
                  "draft_threads": 2, "draft_gpu_layers": 5}
    plain = ModelOptions()
    for name in ("budget", "corpus", "history", "tree", "draft_threads", "draft_gpu_layers"):
        assert getattr(plain, name) == load_defaults[name], name
    assert plain.load_options() == LoadOptions()


def test_generate_chat_bench_and_calibrate_load_through_model_options(monkeypatch, tmp_path):
    """Each command builds one ModelOptions from its flags (keeping its own defaults)."""
    from typer.testing import CliRunner

    from specli.cli import app
    from specli.errors import SpecliError
    from specli.session import ModelOptions

    seen: list[ModelOptions] = []

    def stop(self, console):
        seen.append(self)
        raise SpecliError("stop before loading")

    monkeypatch.setattr(ModelOptions, "load", stop)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "c.sqlite").touch()  # --corpus is checked before the load
    shared = ["m.gguf", "-d", "d.gguf", "--threads", "1", "-ngl", "2", "--device", "cpu",
              "--draft-threads", "1", "-ngld", "0"]
    runner = CliRunner()
    for args in (["generate", *shared, "-m", "hd", "-p", "hi", "--branches", "2",
                  "--corpus", "c", "--no-history"],
                 ["chat", *shared, "-m", "draft", "--budget", "fixed:2"],
                 ["bench", *shared, "--methods", "none,hd", "--out", str(tmp_path / "b")],
                 ["calibrate", "m.gguf", "-d", "d.gguf", "--threads", "1", "-ngl", "2",
                  "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, SpecliError), (args, result.output)
    gen, chat, bench, cal = seen
    for o in (gen, chat, bench, cal):
        assert (o.model, o.draft, o.threads, o.gpu_layers, o.device) == \
            ("m.gguf", "d.gguf", 1, 2, "cpu")
    assert (gen.method, gen.ctx, gen.branches, gen.corpus, gen.history, gen.tree) == \
        ("hd", 4096, 2, "c", False, None)
    assert (gen.draft_threads, gen.draft_gpu_layers) == (1, 0)
    assert (chat.method, chat.ctx, chat.budget, chat.history, chat.branches) == \
        ("draft", 8192, "fixed:2", True, 3)
    assert (bench.method, bench.ctx, bench.history, bench.tree) == ("none", 4096, False, True)
    assert (cal.method, cal.budget, cal.branches, cal.history) == ("auto", "fixed:1", 1, False)


def test_stream_text_writes_whole_characters_and_stops_on_ctrl_c():
    """The streaming loop generate and chat share: pieces through `write` (never half a
    UTF-8 character), the whole text returned, Ctrl-C ends the answer, not the caller."""
    from types import SimpleNamespace

    from specli.engine import GenerationConfig, Result
    from specli.session import stream_text

    table = {1: b"caf", 2: "é".encode()[:1], 3: "é".encode()[1:] + b"!", 4: b"\xe2"}

    def loaded(interrupt: bool):
        def stream(tokens, cfg, res):
            yield [1, 2]
            yield [3]
            if interrupt:
                raise KeyboardInterrupt
            yield [4]  # ends mid-character (a length limit): that half is dropped

        return SimpleNamespace(engine=SimpleNamespace(stream=stream),
                               target=SimpleNamespace(token_bytes=table.__getitem__),
                               keep_fit=lambda: None)

    written: list[str] = []
    res = Result(method="none")
    text = stream_text(loaded(False), [0], GenerationConfig(), res, written.append)
    assert written == ["caf", "é!", "", ""] and text == "café!"
    assert res.stop_reason == ""
    res = Result(method="none")
    assert stream_text(loaded(True), [0], GenerationConfig(), res) == "café!"  # --json
    assert res.stop_reason == "interrupted"


def test_generate_json_after_ctrl_c_still_prints_what_was_generated(capsys):
    """--json and Ctrl-C (a script's timeout): one JSON object with the text so far and
    stop_reason "interrupted", not nothing at all."""
    from types import SimpleNamespace

    from specli.cli import _answer
    from specli.engine import GenerationConfig, Result

    def stream(tokens, cfg, res):
        res.tokens += [1, 2]
        yield [1, 2]
        raise KeyboardInterrupt

    table = {1: b"hello", 2: b" world"}
    loaded = SimpleNamespace(engine=SimpleNamespace(stream=stream),
                             target=SimpleNamespace(token_bytes=table.__getitem__),
                             target_name="t.gguf", draft_name=None, placements=lambda: {},
                             keep_fit=lambda: None)
    res = Result(method="none")
    _answer(loaded, [0], GenerationConfig(), res, as_json=True)  # type: ignore[arg-type]
    obj = json.loads(capsys.readouterr().out)
    assert obj["text"] == "hello world" and obj["tokens"] == [1, 2]
    assert obj["stop_reason"] == res.stop_reason == "interrupted"


def test_generate_json_after_ctrl_c_during_the_load_prints_an_object(monkeypatch, tmp_path):
    """A first run loads and calibrates for many seconds: `timeout 5 specli generate
    --json | jq` got empty input.  Now one object, nothing written, and still 130."""
    from typer.testing import CliRunner

    from specli.cli import app
    from specli.session import ModelOptions

    def interrupted(self, console):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelOptions, "load", interrupted)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    model = tmp_path / "t.gguf"
    r = CliRunner().invoke(app, ["generate", str(model), "-m", "none", "-p", "hi", "--json"])
    assert r.exit_code == 130
    obj = json.loads(r.stdout)
    assert obj["stop_reason"] == "interrupted" and obj["text"] == "" and obj["tokens"] == []
    assert obj["model"] == str(model) and obj["method"] == "none"
    r = CliRunner().invoke(app, ["generate", str(model), "-m", "none", "-p", "hi"])
    assert r.exit_code == 130 and r.stdout == ""


def test_generate_and_chat_stream_the_same_answer(tiny_paths, env):
    t = str(tiny_paths["target"])
    common = ["-m", "none", "-n", "16", "--ctx", "512"]
    g = run(["generate", t, *common, "-p", "Tell me a story"], env)
    c = run(["chat", t, *common], env, stdin="Tell me a story\n")
    assert g.returncode == c.returncode == 0, g.stderr + c.stderr
    assert g.stdout.strip() and g.stdout.rstrip("\n") == c.stdout.rstrip("\n")

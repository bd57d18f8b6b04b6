"""The README's and the docstrings' commands, as written: extracted from the files (never a
second copy), every `python -m t5x_lite.X` one parsed the way its entry point parses it (flags,
--module_import, gin files in the order given), and the quickstart's evaluation and inference
lines and the whole "Your own corpus" section run in a fresh directory."""
import glob
import os
import re
import shlex
import subprocess
import sys

import gin
import pytest

from t5x_lite import launch

REPO = launch.REPO_DIR
README = os.path.join(REPO, "README.md")
# An entry point and its arguments: flags (--...) and, for inspect_task, a task name.
COMMAND = re.compile(r"(?:\.venv/bin/)?python -m t5x_lite\.(?:train|eval|infer|inspect_task)"
                     r"(?: +(?:--|(?<=inspect_task )\w)[^\n`]*)")


def code_blocks(text: str, language: str = "") -> list[str]:
    """The fenced blocks of `text` whose fence names `language` ("" for none)."""
    return [body for fence, body in re.findall(r"^```(\w*)\n(.*?)^```$", text,
                                                re.DOTALL | re.MULTILINE) if fence == language]


def commands_in(text: str) -> list[str]:
    """`python -m t5x_lite.X ...` commands, continuation lines joined, optional `[...]`
    parts of a docstring's synopsis dropped."""
    text = re.sub(r"\\{1,2}\n[\s#]*", " ", text)
    return [re.sub(r"\s\[--[^\]]*\]", "", match.split("  #")[0]).strip()
            for match in COMMAND.findall(text)]


def documented_commands() -> list[str]:
    sources = [README, *glob.glob(os.path.join(REPO, "t5x_lite", "*.py")),
               *glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True)]
    commands = []
    for path in sources:
        with open(path) as f:
            text = f.read()
        if path.endswith(".gin"):
            text = "\n".join(line.lstrip("# ") for line in text.splitlines())
        commands += [(os.path.relpath(path, REPO), command) for command in commands_in(text)]
    return commands


def own_corpus_module() -> str:
    with open(README) as f:
        blocks = code_blocks(f.read(), "python")
    (module,) = [block for block in blocks
                 if block.startswith("# my_tasks.py")]
    return module


@pytest.fixture
def fresh_directory(tmp_path, monkeypatch):
    """An empty working directory with the README's `.venv` and my_tasks.py."""
    os.symlink(sys.prefix, tmp_path / ".venv")
    (tmp_path / "my_tasks.py").write_text(own_corpus_module())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_documents_hold_the_commands_this_test_checks():
    where = {source for source, _ in documented_commands()}
    assert {"README.md", "t5x_lite/infer.py", "gin/runs/infer.gin"} <= where
    assert len(documented_commands()) >= 15


@pytest.mark.parametrize("source,command", documented_commands(),
                         ids=[f"{source}:{index}" for index, (source, _) in
                              enumerate(documented_commands())])
def test_every_documented_command_parses(source, command, fresh_directory):
    words = shlex.split(command)
    entry = words[words.index("-m") + 1]
    args = [word for word in words[words.index("-m") + 2:] if word.startswith("--")]
    if entry == "t5x_lite.inspect_task":
        args = [word for word in args if word.startswith(("--gin", "--module_import"))]
    # --module_import runs in test_the_own_corpus_section_runs_as_written, over its corpus.
    parsed = launch.parse_flags(args, entry, require_gin_file=entry != "t5x_lite.inspect_task")
    try:
        if parsed.gin_file:
            launch.parse_gin(parsed.gin_file, parsed.gin_bindings)
    finally:
        gin.clear_config()


def run_line(line: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True,
                            )
    assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def section(title: str) -> str:
    with open(README) as f:
        text = f.read()
    start = text.index(f"### {title}\n")
    return text[start:text.index("\n## ", start)]


def test_the_own_corpus_section_runs_as_written(fresh_directory):
    (lines,) = code_blocks(section("Your own corpus"))
    outputs = [run_line(line, fresh_directory) for line in lines.splitlines()]
    assert "my_text_span_corruption (train)" in outputs[2].stdout
    assert "Finished at step 100" in outputs[3].stdout
    assert "Checkpoint step 100: validation loss" in outputs[4].stdout
    predictions = (fresh_directory / "runs/my_text/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8
    for output in outputs[2:]:
        assert "I0000" not in output.stderr and "oneDNN" not in output.stderr, output.stderr


def test_the_quickstart_eval_and_infer_lines_run_as_written(fresh_directory):
    """On a quickstart run trained two steps: the README's eval (scripts/pretrain.sh's) and
    infer commands, infer.gin after quickstart.gin as written."""
    trained = subprocess.run(
        [sys.executable, "-m", "t5x_lite.train", "--gin_file=gin/quickstart.gin",
         "--gin.TRAIN_STEPS=2", "--gin.EVAL_STEPS=1"], cwd=fresh_directory,
        capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    infer = [command for source, command in documented_commands()
             if source == "README.md" and "t5x_lite.infer --gin_file=gin/quickstart.gin" in command]
    assert infer
    result = run_line(infer[0] + " --gin.INFER_MAX_EXAMPLES=4", fresh_directory)
    assert "wrote 4 predictions" in result.stdout
    # The lengths are the run's (128 / 32): 7 sentinels or fewer per input, not 28.
    predictions = (fresh_directory / "runs/quickstart/predictions.jsonl").read_text()
    assert predictions.count("<extra_id_") < 4 * 2 * 8
    with open(os.path.join(REPO, "scripts", "pretrain.sh")) as f:
        (evaluate,) = [line for line in f if "t5x_lite.eval" in line]
    assert "--gin_file=gin/quickstart.gin" in evaluate

"""scripts/compare_architectures.py on a tiny budget: the four families pretrain at matched
FLOPs, fine-tune and are evaluated; a rerun resumes (here: finds every run done); other
arguments in the same directory are refused."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--budget-tflops", "0.05", "--finetune-steps", "2", "--batch-size", "4",
        "--lengths", "32,8", "--task-lengths", "48,8", "--eval-steps", "1",
        "--metrics-examples", "8"]


def compare(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/compare_architectures.py", "--out",
                           str(out), *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = compare(out, *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_four_families_at_matched_compute(compared):
    out, result = compared
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["family"] for row in rows] == ["encoder-decoder", "decoder-only",
                                               "decoder-only", "encoder-only"]
    flops = [row["pretraining_flops"] for row in rows]
    assert max(flops) <= 1.1 * min(flops), flops
    # Different step costs, hence different step counts, for the same budget.
    assert len({row["steps"] for row in rows}) > 1
    parameters = [row["parameters"] for row in rows]
    assert max(parameters) <= 1.1 * min(parameters), parameters
    for row in rows:
        assert math.isfinite(row["validation_loss"]) and math.isfinite(row["choice_accuracy"])
        assert 0 <= row["choice_accuracy"] <= 100
        generates = row["family"] != "encoder-only"
        assert math.isfinite(row["docstring_bleu"]) == generates
        assert math.isfinite(row["docstring_rouge_l"]) == generates
    table = (out / "comparison.md").read_text()
    assert table.count("\n| ") == 5 and "nan" not in table
    assert (out / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert "Matched parameters and pretraining FLOPs" in result.stdout


def test_a_rerun_resumes_and_other_arguments_are_refused(compared):
    out, _ = compared
    rerun = compare(out, *TINY)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Every run is found done: no stage line ("[3/11] ...").
    assert not [line for line in rerun.stdout.splitlines() if line.startswith("[")]
    other = compare(out, *TINY, "--finetune-steps", "3")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(f"error: {out} holds a comparison")

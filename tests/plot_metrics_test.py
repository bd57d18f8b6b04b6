"""scripts/plot_metrics.py draws a PNG of the expected size and rejects a missing run."""
import json
import os
import struct
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "plot_metrics.py")


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_draws_three_panels(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 5.0 - s / 100, "accuracy": s / 400,
             "tokens_per_second": 1000.0} for s in range(10, 110, 10)]
    rows.append({"step": 100, "split": "validation", "loss": 4.2, "accuracy": 0.2})
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    result = run(str(tmp_path))
    assert result.returncode == 0, result.stderr
    # Three 5 x 3.6 inch panels at 100 dpi.
    assert png_size(tmp_path / "metrics.png") == (1500, 360)


def test_missing_run_is_one_line_error(tmp_path):
    result = run(str(tmp_path / "nothing_here"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_before_after_prints_first_and_last_task_metrics(tmp_path):
    rows = [{"step": 0, "split": "validation", "loss": 7.0, "accuracy": 0.1},
            {"step": 0, "split": "validation", "bleu": 0.5, "rougeL": 2.25},
            {"step": 10, "split": "train", "loss": 5.0, "accuracy": 0.2},
            {"step": 20, "split": "validation", "bleu": 12.0, "rougeL": 30.125},
            {"step": 40, "split": "validation", "bleu": 20.5, "rougeL": 41.0,
             "loss": 3.0, "accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    result = run(str(tmp_path), "--before-after")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == [
        "metric                    step 0     step 40",
        "bleu                        0.50       20.50",
        "rougeL                      2.25       41.00"]

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

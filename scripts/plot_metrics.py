"""Draws loss, accuracy and throughput curves of a run to MODEL_DIR/metrics.png; with
--before-after also prints the task metrics (BLEU, ROUGE, ...) of the first and the last
validation step that computed them.

  python scripts/plot_metrics.py MODEL_DIR [--out FILE] [--before-after]
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("loss", "loss (per target token)"), ("accuracy", "token accuracy"),
          ("tokens_per_second", "tokens / s"))


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Validation keys that are not task metrics.
LOSS_KEYS = {"step", "split", "loss", "accuracy", "z_loss", "target_tokens"}


def before_after(rows: list[dict]) -> str | None:
    """A table of each task metric at the first and last step that has it, or None."""
    scored = [r for r in rows if r.get("split") == "validation"
              and any(key not in LOSS_KEYS and not key.startswith("moe") for key in r)]
    if not scored:
        return None
    first, last = min(scored, key=lambda r: r["step"]), max(scored, key=lambda r: r["step"])
    names = [key for key in first if key not in LOSS_KEYS and not key.startswith("moe")]
    lines = [f"{'metric':<20}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"]
    lines += [f"{name:<20}{first[name]:>12.2f}{last.get(name, float('nan')):>12.2f}"
              for name in names]
    return "\n".join(lines)


def plot(rows: list[dict], out_path: str) -> None:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for axis, (key, title) in zip(axes, PANELS):
        for split, style in (("train", "-"), ("validation", "o-")):
            points = sorted((r["step"], r[key]) for r in rows
                            if r.get("split", "train") == split and key in r)
            if points:
                axis.plot(*zip(*points), style, label=split, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", default=None, help="PNG path (default MODEL_DIR/metrics.png)")
    parser.add_argument("--before-after", action="store_true",
                        help="print the task metrics of the first and last scored steps")
    args = parser.parse_args(argv)
    metrics_path = os.path.join(args.model_dir, "metrics.jsonl")
    if not os.path.exists(metrics_path):
        print(f"error: {metrics_path} does not exist: pass the MODEL_DIR of a training run",
              file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(args.model_dir, "metrics.png")
    rows = read_rows(metrics_path)
    plot(rows, out_path)
    print(f"Wrote {out_path}")
    if args.before_after:
        print(before_after(rows) or "No task metrics in this run (METRICS_PERIOD = 0, or a "
              "task without metric functions).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

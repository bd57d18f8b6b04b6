"""`remat`: the train step under each remat policy (layers scanned or not), as ratios to no
remat."""
import argparse

from bench import flags
from bench import presets
from bench import train

POLICIES = ("none", "minimal", "full")  # The first is what the others are compared with.


def add_parser(commands) -> None:
    parser = commands.add_parser("remat", help="train step time per remat policy")
    flags.add_preset(parser)
    flags.add_sizes(parser)
    parser.add_argument("--scan", action="store_true", help="scan over layers too")
    train.add_step_counts(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    presets.check_preset(args.preset)
    rows = [train.measure_train(args.preset, args.batch, args.inputs, args.targets, args.steps,
                                args.warmup, remat_policy=policy, scan_layers=args.scan)[0]
            for policy in POLICIES]
    for row in rows:
        row["time_ratio_to_none"] = row["step_seconds"] / rows[0]["step_seconds"]
    return rows

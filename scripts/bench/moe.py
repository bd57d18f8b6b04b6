"""`moe`: an MoE preset's train step next to its dense counterpart's (same widths), with the
parameters each holds and those one token passes through."""
import argparse
import dataclasses

from bench import flags
from bench import presets
from bench import train
from t5x_lite import launch

# Each MoE preset's dense model: the same widths and layers, dense MLPs everywhere.
DENSE_COUNTERPARTS = {"switch_tiny": "t5_1_1_tiny", "st_moe_tiny": "t5_1_1_tiny",
                      "switch_base": "t5_1_0_base", "st_moe_base": "t5_1_1_base"}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "moe", help="an MoE preset's train step next to its dense counterpart's")
    parser.add_argument("--preset", default="switch_tiny",
                        help=f"one of {', '.join(DENSE_COUNTERPARTS)}")
    flags.add_sizes(parser)
    parser.add_argument("--group-size", type=flags.int_at_least(1), default=None,
                        help="tokens per routing group (default: the preset's)")
    train.add_step_counts(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    if args.preset not in DENSE_COUNTERPARTS:
        raise launch.UsageError(f"--preset {args.preset!r} is not an MoE preset: choose one of "
                                f"{', '.join(DENSE_COUNTERPARTS)}")
    rows = [moe_row(preset, args) for preset in (DENSE_COUNTERPARTS[args.preset], args.preset)]
    for row in rows:
        row["dispatch_overhead"] = row["step_seconds"] / rows[0]["step_seconds"]
    return rows


def moe_row(preset: str, args: argparse.Namespace) -> dict:
    """The train row of `preset` (dense or MoE, --group-size applied to an MoE's routing)
    with its group size and parameter counts."""
    config, overrides = presets.model_config_of(preset), {}
    if config.moe and args.group_size:
        overrides["moe"] = dataclasses.replace(config.moe, group_size=args.group_size)
    (row,) = train.measure_train(preset, args.batch, args.inputs, args.targets, args.steps,
                                 args.warmup, **overrides)
    row.pop("moe", None)
    row["what"] = "moe"
    row["group_size"] = (overrides.get("moe") or config.moe).group_size if config.moe else ""
    row["parameters"], row["active_parameters"] = parameter_counts(config)
    return row


def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, parameters one token passes through): an expert kernel counts
    num_selected / num_experts of itself (tokens choose; experts choose: capacity decides)."""
    import jax
    from t5x_lite import models

    shapes = jax.eval_shape(models.model_for(config).init, jax.random.key(0))
    idle = 0  # Parameters of the experts a token does not pass through.
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        if any(getattr(key, "key", None) == "experts" for key in path):
            count = models.count_parameters(leaf)
            idle += count - count * config.moe.num_selected // config.moe.num_experts
    total = models.count_parameters(shapes)
    return total, total - idle

"""Benchmarks of the train step and the input pipeline, measured on this machine in this run.

  python scripts/benchmark.py train --preset t5_1_1_small --batch 8 --inputs 512 --targets 114 \\
      [--compare-hf]
  python scripts/benchmark.py --quick     # seconds: the train figures of a tiny model
  python scripts/benchmark.py input --tasks stdlib_span_corruption --cores 1 \\
      --train-preset t5_1_1_small --batch 8 --inputs 512 --targets 114
  python scripts/benchmark.py remat --preset t5_1_1_small --scan
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python scripts/benchmark.py state --preset t5_1_1_small   # 8 CPU devices stand in
  python scripts/benchmark.py moe --preset switch_tiny --batch 8 --inputs 512 --targets 114
  python scripts/benchmark.py decode --preset t5_1_1_small --batch 8 --inputs 512 --targets 114 \\
      [--compare-hf]
  python scripts/benchmark.py checkpoint --preset t5_1_1_small --batch 8 --inputs 512 --targets 114
  python scripts/benchmark.py memory --preset longt5_tglobal_tiny --inputs 2048 4096 8192 16384

Figures (each measured in the run that prints it; add --json for one JSON object per line):
  train  step_seconds         median wall-clock seconds of one train step (forward, backward,
                              Adafactor update; float32) on a device-resident packed-shaped
                              batch, each step waited for; compilation and --warmup steps excluded
         tokens_per_second    batch * (inputs + targets) / step_seconds: token slots per second
         examples_per_second  batch / step_seconds: packed rows consumed per second
         compile_seconds      wall-clock seconds of the first call (compilation plus one step)
         model_flops_per_step matmul FLOPs of one step (forward + backward; formula in
                              t5x_lite/flops.py, as the training loop's MFU)
         peak_flops           FLOP/s of --peak-size square matmuls in --dtype, one on every
                              device at once: the median of calls timed between the train
                              steps
         mfu                  model_flops_per_step / step_seconds / peak_flops
         ratio_to_transformers   with --compare-hf: transformers' step_seconds / ours (both
                              AdamW, float32, no dropout, same shapes, timed A B A B ...)
  input  examples_per_second  packed rows per second from data.pipeline.get_batches on --cores
                              CPU cores: examples / seconds over the timed window, after
                              --warmup batches (start-up and shuffle-buffer fill) are excluded
         cpu_seconds          CPU time (all threads) the pipeline's process spent in that
                              window: at most cores * seconds when the pinning holds
         ratio_to_train       input examples_per_second / train examples_per_second; the
                              project requires >= 5 (at_least_5x)
  remat  time_ratio_to_none   train step_seconds under each remat policy / under "none"
  state  parameter_bytes, optimizer_bytes   what one device holds under each rule table of
                              gin/partitioning/ (from the shardings; nothing is allocated)
         ratio_to_data        that total / the data-parallel total
  decode tokens_per_second    batch * targets / decode_seconds for greedy and beam search
                              (a beam's W hypotheses count once), with a random-weight model
                              forced to decode all `targets` tokens; decode_seconds is the
                              median of --repeats jitted predict_batch calls after compiling
         ratio_to_transformers   with --compare-hf: t5x_lite tokens/s / transformers' (same
                              weights, inputs and lengths; generate forced to `targets` new
                              tokens; the two timed in turn, A B A B ...)
  checkpoint  step_seconds      median plain train step (as train), between saves
         save_step_seconds    median step that starts an asynchronous save, as the training
                              loop does it: train step, the input position's state(), the
                              save call (it copies the state to host memory), then waiting
         save_step_slowdown   save_step_seconds / step_seconds - 1; required < 0.2
         steps_during_save, during_save_slowdown   steps run while the save still wrote in
                              the background (per save), and their median slowdown
         blocking_save_seconds   one save waited for to the end; checkpoint_mib its size
                              on disk, state_mib the parameters and optimizer state's
  memory temp_bytes, total_bytes   XLA's memory_analysis() of the train step compiled (not
                              run) for each --inputs length and encoder attention: its
                              temporaries (activations kept for the backward pass, scratch),
                              and those plus arguments and outputs, as precompile counts them
         temp_growth          temp_bytes / the previous length's (length_growth apart):
                              about 2 per doubling for memory linear in L, 4 for quadratic
  moe    the train figures of an MoE preset and of its dense counterpart (same widths), plus
         parameters, active_parameters   all parameters, and those one token passes through
                              (each sparse MLP counted as its K chosen experts and its router)
         dispatch_overhead    MoE step_seconds / dense step_seconds: with top-1 routing the
                              two do equal work per token, so this is the cost of routing,
                              dispatch and combine (and of the tokens dropped for capacity);
                              the einsum dispatch grows with group_size (--group-size)
"""
import argparse

from bench import checkpoint
from bench import decode
from bench import input_pipeline
from bench import memory
from bench import moe
from bench import remat
from bench import rows as rows_lib
from bench import state
from bench import train
from t5x_lite import launch

# A subcommand is a module with add_parser(commands), whose parser sets run=fn(args) -> rows,
# one dict per measurement; in the order --help lists them.
SUBCOMMANDS = (train, remat, moe, decode, state, checkpoint, memory, input_pipeline)
QUICK_ARGS = ["train", "--preset", "t5_1_1_tiny", "--batch", "2", "--inputs", "64",
              "--targets", "16", "--steps", "2", "--warmup", "1", "--peak-size", "1024",
              "--json"]


def build_parser() -> launch.ArgumentParser:
    parser = launch.ArgumentParser(prog="scripts/benchmark.py",
                                  description=__doc__.splitlines()[0],
                                  epilog=__doc__.split("\n\n", 1)[1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(launch.VERBOSE_FLAG, action="store_true", help=launch.VERBOSE_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="a check of the harness in seconds: " + " ".join(QUICK_ARGS))
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Bad input ends with one `error:` line and status 2; --verbose shows the traceback."""
    launch.quiet_library_logs()
    with launch.bad_input_exits(argv) as argv:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.quick:
            args = parser.parse_args(QUICK_ARGS)
        elif args.command is None:
            raise launch.UsageError("no subcommand: pass one of train, remat, moe, decode, "
                                    "state, checkpoint, memory, input (or --quick)")
        rows = args.run(args)
    rows_lib.print_rows(rows, args.json)

"""`decode`: greedy and beam-search decoding tokens/s of a random-weight preset forced to
decode every target token, optionally beside transformers' generate on the same weights."""
import argparse
import statistics
from typing import Callable

from bench import flags
from bench import hf_compare
from bench import presets
from bench import rows as rows_lib
from bench import timing


def add_parser(commands) -> None:
    parser = commands.add_parser("decode", help="greedy and beam decoding tokens/s")
    flags.add_preset(parser)
    flags.add_sizes(parser)
    parser.add_argument("--beam-size", type=flags.int_at_least(1), default=4)
    parser.add_argument("--compare-hf", action="store_true",
                        help="also time transformers' generate on the same weights")
    parser.add_argument("--repeats", type=flags.int_at_least(1), default=3,
                        help="timed calls after compilation")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    """Greedy and beam-search decoding throughput of a preset, measured in this run."""
    presets.check_preset(args.preset)
    if args.compare_hf:
        hf_compare.check_transformers()
    rows = []
    for method, options in (("greedy", {}), ("beam", {"beam_size": args.beam_size})):
        rows += measure_decode(args.preset, args.batch, args.inputs, args.targets, method,
                               options, args.repeats, args.compare_hf)
    return rows


def measure_decode(preset: str, batch: int, inputs: int, targets: int, method: str,
                   options: dict, repeats: int, compare_hf: bool = False) -> list[dict]:
    """Median seconds of `repeats` decoding calls after a first (compiling) one; with
    `compare_hf` transformers' generate on the same weights and inputs, timed in turn with
    ours (A B A B ...), and the ratio of tokens/s ours / theirs."""
    import numpy as np

    config = presets.model_config_of(preset)
    tokens_BL = np.random.default_rng(0).integers(2, config.vocab_size, (batch, inputs),
                                                  np.int32)
    ours, params = decode_timer(config, tokens_BL, targets, method, options)
    timers = {"t5x_lite": ours}
    if compare_hf:
        timers["transformers"] = hf_compare.hf_decode_timer(config, params, tokens_BL, targets,
                                                            method, options)
    seconds = timing.time_in_turn(timers, 1 + repeats)
    rows = [decode_row(preset, who, method, options, batch, inputs, targets, seconds[who])
            for who in timers]
    if compare_hf:
        rows[0]["ratio_to_transformers"] = (rows[0]["tokens_per_second"]
                                            / rows[1]["tokens_per_second"])
    return rows


def decode_timer(config, tokens_BL, targets: int, method: str,
                 options: dict) -> tuple[Callable[[], float], dict]:
    """(a function timing one call, the model's parameters): one jitted predict_batch call
    on the int32 inputs `tokens_BL` (the encoder's, or a decoder-only model's prompts), decoding exactly `targets` tokens per row (EOS
    is an id no row emits, so no row stops early), waited for."""
    import jax
    from t5x_lite import models

    model = models.model_for(config)
    params = jax.jit(model.init)(jax.random.key(0))
    predict = jax.jit(lambda p, t: model.predict_batch(
        p, {model.inputs_key: t}, max_decode_length=targets, method=method,
        eos_id=config.vocab_size, **options))
    return lambda: timing.timed(lambda: jax.block_until_ready(predict(params, tokens_BL))), params


def decode_row(preset: str, who: str, method: str, options: dict, batch: int, inputs: int,
               targets: int, seconds: list[float]) -> dict:
    """The figures of one implementation from its `seconds` per call (the first compiling)."""
    decode_seconds = statistics.median(seconds[1:])
    return {"what": "decode", "preset": preset, "implementation": who,
            "device": rows_lib.device_name(), "method": method, **options, "batch": batch,
            "inputs": inputs, "targets": targets, "decode_seconds": decode_seconds,
            "tokens_per_second": batch * targets / decode_seconds,
            "first_call_seconds": seconds[0]}

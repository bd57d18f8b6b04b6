"""The command line's shared pieces: checked numbers, the preset and the batch's sizes."""
import argparse

PRESET_HELP = "a model in gin/models/, e.g. t5_1_1_small"


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help=PRESET_HELP)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per measurement, nothing else, on stdout")


def add_sizes(parser: argparse.ArgumentParser) -> None:
    """--batch, --inputs and --targets (the packed batch's shape), and --json."""
    parser.add_argument("--batch", type=int_at_least(1), default=8, help="rows per batch")
    parser.add_argument("--inputs", type=int_at_least(2), default=512,
                        help="encoder length L in tokens")
    parser.add_argument("--targets", type=int_at_least(2), default=114,
                        help="decoder length T in tokens")
    add_json(parser)

"""What every entry point shares: T5X-style flags (--gin_file, --gin.NAME=VALUE,
--gin_bindings, --module_import, and the multi-host --coordinator_address / --num_processes /
--process_id), gin parsing with the repository's gin/ folder on the search path, joining the jax.distributed
system, and the rule that bad input ends the program with one line naming the fix and a
non-zero status."""
import argparse
import contextlib
import functools
import glob
import importlib
import importlib.util
import logging
import os
import re
import sys
from typing import Iterator

import gin
import jax
import sentencepiece
from absl import logging as absl_logging

from t5x_lite import gin_checks
from t5x_lite import startup

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO_DIR, "gin")
DEFAULTS_GIN = os.path.join(GIN_DIR, "defaults.gin")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad flag as a UsageError (one line) instead of argparse's usage text."""

    def error(self, message):
        raise UsageError(f"{message} (see: python {self.prog} --help)")


def parse_flags(argv: list[str], description: str,
                parser: argparse.ArgumentParser | None = None,
                require_gin_file: bool = True, prog: str | None = None) -> argparse.Namespace:
    """Reads --gin_file (repeatable), --gin_bindings (repeatable) and --gin.NAME=VALUE, plus
    the arguments `parser` already declares. `prog` names the program in error lines."""
    parser = parser or ArgumentParser(prog=prog, description=description)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file to parse (repeatable; later files override earlier)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding such as \"TRAIN_STEPS = 100\" (repeatable)")
    parser.add_argument("--module_import", action="append", default=[],
                        help="a Python module to import first, such as one registering your "
                        "own seqio tasks (repeatable; looked up from the current directory)")
    parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)
    # Read as strings and checked in distributed_settings, so bad values get our one line.
    parser.add_argument("--coordinator_address", help="multi-host: HOST:PORT of process 0 "
                        "(omit on TPU pods and SLURM, where jax finds it)")
    parser.add_argument("--num_processes", help="multi-host: number of processes in all")
    parser.add_argument("--process_id", help="multi-host: this process, in [0, num_processes)")
    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        if not arg.startswith("--gin.") or "=" not in arg:
            raise UsageError(f"unknown flag {arg!r}: use --gin_file=FILE, "
                             "--gin.NAME=VALUE or --gin_bindings='NAME = VALUE'")
        name, value = arg[len("--gin."):].split("=", 1)
        args.gin_bindings.append(f"{name} = {value}")
    if require_gin_file and not args.gin_file:
        raise UsageError("no --gin_file given: pass e.g. --gin_file=gin/quickstart.gin")
    args.distributed = distributed_settings(args)
    return args


DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def distributed_settings(args: argparse.Namespace) -> dict | None:
    """The keyword arguments of jax.distributed.initialize from the three multi-host flags,
    or None when none is given; the flags come all together or not at all."""
    given = {name: getattr(args, name, None) for name in DISTRIBUTED_FLAGS}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise UsageError(f"--{missing[0]} is missing: multi-host runs pass all of "
                         "--coordinator_address=HOST:PORT --num_processes=N --process_id=I "
                         "(or none, on a TPU pod or SLURM)")
    host, _, port = given["coordinator_address"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator_address={given['coordinator_address']!r} is not "
                         "HOST:PORT: pass e.g. --coordinator_address=10.0.0.2:8476")
    numbers = {}
    for name in ("num_processes", "process_id"):
        try:
            numbers[name] = int(given[name])
        except ValueError:
            raise UsageError(f"--{name}={given[name]!r} is not an integer") from None
    if numbers["num_processes"] < 1:
        raise UsageError(f"--num_processes must be >= 1, got {numbers['num_processes']}")
    if not 0 <= numbers["process_id"] < numbers["num_processes"]:
        raise UsageError(f"--process_id must be in [0, {numbers['num_processes']}) for "
                         f"--num_processes={numbers['num_processes']}, got "
                         f"{numbers['process_id']}")
    return {"coordinator_address": given["coordinator_address"], **numbers}


def detected_cluster() -> str | None:
    """The multi-process cluster this process runs in, when jax.distributed can find its
    coordinator and process id by itself (see jax/_src/clusters/): a SLURM job step of more
    than one task, a GKE TPU slice (hostnames in the environment), or a Cloud TPU VM (libtpu
    and TPU chips present; jax asks the metadata server, and a single-host VM is a system of
    one process)."""
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if "," in os.environ.get(name, ""):
            return "TPU pod"
    tpu_chips = glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*")
    if tpu_chips and importlib.util.find_spec("libtpu") is not None:
        return "TPU VM"
    return None


def start_distributed(settings: dict | None) -> None:
    """Joins the jax.distributed system before any other JAX use, with the flags' settings
    or, with none, when `detected_cluster` finds one; otherwise a single process."""
    if settings is None and detected_cluster() is None:
        return
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if not platforms or "cpu" in platforms.split(","):
        # CPU devices of different processes reduce over TCP only with a collectives library.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(settings or {}))
    if jax.process_index() == 0:
        print(f"Process 0 of {jax.process_count()}: {jax.local_device_count()} local devices, "
              f"{jax.device_count()} devices in all", flush=True)


# Command-line bindings are parsed apart from the files, so they get their own imports: this
# lets --gin.MIXTURE_OR_TASK_NAME=@tasks.register_task() name project functions.
BINDINGS_PREAMBLE = """from __gin__ import dynamic_registration
from t5x_lite import models
from t5x_lite import moe
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import run_config
from t5x_lite.data import objectives
from t5x_lite.data import tasks
from t5x_lite.data import vocab
import t5x_lite.train"""


def resolve_gin_file(path: str) -> str:
    """An absolute path for a gin file given relative to the current directory, the
    repository root, or gin/ (so --gin_file=quickstart.gin works from anywhere)."""
    for candidate in (path, os.path.join(REPO_DIR, path), os.path.join(GIN_DIR, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise UsageError(f"gin file {path!r} does not exist: pass a path relative to the current "
                     f"directory or to {GIN_DIR}")


@functools.cache
def add_repo_to_gin_search_path() -> None:
    # Gin files include each other as 'gin/...' relative to the repository root, a path no
    # directory of the user's (such as a MODEL_DIR called runs/) can shadow.
    gin.add_config_file_search_path(REPO_DIR)


def parse_gin(gin_files: list[str], gin_bindings: list[str]) -> None:
    """Parses gin/defaults.gin (every macro's default), then `gin_files` in order, then the
    command-line `gin_bindings`; slips (gin_checks.py) are UsageErrors naming the fix."""
    gin.clear_config()
    add_repo_to_gin_search_path()
    gin_files = [DEFAULTS_GIN, *(resolve_gin_file(path) for path in gin_files)]
    # gin's package-resource reader logs an ERROR for every search path that lacks the file.
    logging.disable(logging.ERROR)
    try:
        gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
        known_macros = gin_checks.bound_macros()
        gin.parse_config([BINDINGS_PREAMBLE, *gin_bindings])
        gin_checks.check_macros(gin_bindings, known_macros)
        gin.finalize()
    except ModuleNotFoundError as error:  # a gin file's `import my_tasks`
        # Gin re-raises the import's error without its `name`; the message still holds it.
        named = re.search(r"named '([\w.]+)'", str(error))
        missing = error.name or (named.group(1) if named else str(error))
        raise UsageError(f"gin files import {missing!r}, which is not on the Python path: "
                         "run from the directory holding it, or add it to PYTHONPATH") from error
    except Exception as error:  # Gin raises many types (tokenize errors, IOError, ...).
        raise UsageError(gin_checks.explain(error)) from error
    finally:
        logging.disable(logging.NOTSET)


def import_modules(names: list[str]) -> None:
    """Imports the --module_import modules (a user's task registrations), found in the
    current directory or on the Python path."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not f"{name}.".startswith(f"{error.name}."):
                raise  # the module itself imports something missing: its traceback says what
            raise UsageError(f"--module_import={name}: no module {name!r} in the current "
                             "directory or on the Python path: run from the directory "
                             f"holding {name.replace('.', '/')}.py, or add its directory to "
                             "PYTHONPATH") from error


# Gin reports a missing required binding as a RuntimeError; configs raise ValueError.
BAD_INPUT_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
                    RuntimeError)


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def quiet_library_logs() -> None:
    """Keeps the console to our own lines: seqio warns about uncached sources on every
    shuffled read, and SentencePiece logs each model load."""
    absl_logging.set_verbosity(absl_logging.ERROR)
    sentencepiece.set_min_log_level(2)


def macro_value(name: str, default=None):
    """The value of the gin macro `name` (evaluated, for `@fn()` references), or `default`
    when no parsed file defines it."""
    try:
        gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return default
    with gin.config_scope(name):
        return gin.get_configurable("gin.macro")()


VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = "on bad input, show the traceback as well as the one-line error"


@contextlib.contextmanager
def bad_input_exits(argv: list[str] | None = None) -> Iterator[list[str]]:
    """Yields the command's arguments (sys.argv[1:] when `argv` is None) without --verbose,
    and turns bad input inside the block into one `error:` line and exit status 2; with
    --verbose (or T5X_LITE_DEBUG=1) the error is re-raised to show the traceback."""
    whole_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = VERBOSE_FLAG in argv or bool(os.environ.get("T5X_LITE_DEBUG"))
    try:
        yield [arg for arg in argv if arg != VERBOSE_FLAG]
    except BAD_INPUT_ERRORS as error:
        if verbose:
            raise
        line = f"error: {first_line(error)}\n"
        if not whole_program:
            sys.stderr.write(line)
            sys.exit(2)
        # The line is the whole answer: TensorStore reads abandoned by a failed restore print
        # tracebacks from a closed event loop at any moment until Python exits, so stderr
        # goes to /dev/null first and the line to the terminal's own descriptor. One of those
        # tracebacks may be cut mid-line by the switch: a newline first puts the line at the
        # start of its own line.
        sys.stderr.flush()
        terminal = os.dup(sys.stderr.fileno())
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        os.write(terminal, ("\n" + line).encode())
        sys.exit(2)


def initialize_backends() -> None:
    """Starts JAX's backends quietly: the CUDA plugin without a GPU logs a missing driver
    (or a cuInit error) as it loads."""
    with startup.stderr_shown_only_on_failure():
        jax.devices()


def main(run_name: str, description: str, argv: list[str] | None = None) -> None:
    """Parses flags and gin, then calls the function `run_name` ("module.function") with the
    arguments gin binds to it. Naming it by module path means the gin files' `import
    t5x_lite.train` and `python -m t5x_lite.train` configure the same function object.

    Bad input (flags, gin, configuration values, missing files) ends the program with one
    line and exit status 2; --verbose (or T5X_LITE_DEBUG=1) shows the traceback too.
    """
    quiet_library_logs()
    with bad_input_exits(argv) as argv:
        module_name, function_name = run_name.rsplit(".", 1)
        args = parse_flags(argv, description, prog=f"-m {module_name}")
        import_modules(args.module_import)
        parse_gin(args.gin_file, args.gin_bindings)
        start_distributed(args.distributed)
        initialize_backends()
        run = getattr(importlib.import_module(module_name), function_name)
        gin.get_configurable(run)()

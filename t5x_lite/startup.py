"""The first lines of every command (python -m t5x_lite.X, scripts/*.py), run before
TensorFlow and JAX load: their C++ start-up logging silenced, and SIGINT / SIGTERM ending the
program at once with one line and exit status 128 + the signal number, whatever it is doing.

Python runs a signal handler only between bytecodes of the main thread, so Ctrl-C during an
import or an XLA compilation would wait for it and then raise a traceback from wherever the
main thread was (or crash a library half torn down by the exit). Instead the signal wakes a
watcher thread through signal.set_wakeup_fd; it prints the line and leaves with os._exit,
running no clean-up that could trip on half-built state. Training hands signals over to its
own handler (faults.StopRequest) once the first step may be saved, see `hand_over`.

TensorFlow 2.21 logs its start-up lines (oneDNN, the CUDA stub) through absl before any log
level applies, whatever TF_CPP_MIN_LOG_LEVEL says, and so do jaxlib's CUDA extensions when the
CUDA plugin is installed without a GPU; so TensorFlow and JAX are imported here with the C++
side of stderr captured; the capture is shown only if the import fails.
"""
import contextlib
import os
import signal
import sys
import tempfile
import threading
from typing import Iterator

from t5x_lite import host_memory

# Read by TensorFlow when it loads: its own later C++ lines below ERROR are dropped.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_watch = {"wakeup_fd": None, "stop_line": "", "terminal_fd": 2}


def begin(module_name: str, stop_line: str) -> None:
    """For the program's main module (`module_name` == "__main__"; importing an entry point
    changes nothing): quiets the libraries' start-up logging and makes SIGINT / SIGTERM print
    `stop_line` (after "Stopped by SIGINT: ") and exit 130 / 143."""
    if module_name != "__main__":
        return
    host_memory.reuse_freed_memory_on_cpu()
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    _watch["stop_line"] = stop_line
    _watch["terminal_fd"] = os.dup(sys.stderr.fileno())
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for number in STOP_SIGNALS:
        # A Python handler that does nothing: the watcher thread acts, and the main thread
        # never sees a KeyboardInterrupt.
        signal.signal(number, _ignore)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _watch["wakeup_fd"] = write_fd
    threading.Thread(target=_exit_on_signal, args=(read_fd,), daemon=True,
                     name="t5x_lite-stop-watcher").start()
    with stderr_shown_only_on_failure():
        import tensorflow  # noqa: F401
        # jaxlib's CUDA extensions (the aot extra) log a missing driver as they load.
        import jax  # noqa: F401


@contextlib.contextmanager
def stderr_shown_only_on_failure() -> Iterator[None]:
    """Captures what the block writes to file descriptor 2 (C++ libraries' logging
    included) and shows it only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            capture.seek(0)
            os.write(2, capture.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def hand_over() -> None:
    """From here on the program's own signal handlers decide (training saves a checkpoint
    first): the watcher no longer hears signals. Call it from the main thread."""
    if _watch["wakeup_fd"] is not None:
        signal.set_wakeup_fd(-1)
        _watch["wakeup_fd"] = None


def _ignore(number: int, frame) -> None:
    pass


def _exit_on_signal(read_fd: int) -> None:
    while True:
        received = os.read(read_fd, 1)
        if not received:
            return
        number = received[0]
        if number not in STOP_SIGNALS:
            continue
        line = f"\nStopped by {signal.Signals(number).name}: {_watch['stop_line']}\n"
        os.write(_watch["terminal_fd"], line.encode())
        os._exit(128 + number)

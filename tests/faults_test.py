"""faults.py and choices.py called directly: StopRequest records SIGTERM / SIGINT sent to this
process and gives the previous handlers back; check_finite under each NanPolicy names the step
of the first non-finite row; disk_full_explained turns a full disk (a real write to /dev/full
included) into DiskFull naming the checkpoint a rerun resumes from, and lets every other error
through untouched. tests/nan_policy_test.py and tests/preemption_test.py run the same paths
through whole training runs."""
import dataclasses
import errno
import os
import re
import signal
import threading

import gin
import pytest

from t5x_lite import choices
from t5x_lite import faults
from t5x_lite import launch
from t5x_lite import startup

POLICY_VALUES = ["stop", "skip", "rollback"]  # What gin binds (run_config.LoopConfig).


def unused_checkpoint():
    raise AssertionError("newest_checkpoint read when nothing was raised")


# StopRequest ---------------------------------------------------------------------------------

@pytest.fixture
def sentinel_handlers():
    """Installs a handler of the test's own for SIGTERM and SIGINT (so that "restored" cannot
    be confused with "reset to the default"), and puts the original ones back afterwards."""
    received = []

    def handler(number, frame):
        received.append(number)

    originals = {number: signal.signal(number, handler) for number in faults.StopRequest.SIGNALS}
    yield handler, received
    for number, original in originals.items():
        signal.signal(number, original)


def test_stop_request_records_sigterm_and_sigint_then_restores_the_handlers(sentinel_handlers):
    handler, received = sentinel_handlers
    with faults.StopRequest() as stop:
        assert stop.signal_number is None and not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_number == signal.SIGTERM and stop.requested()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after a preemption notice: the latest.
        assert stop.signal_number == signal.SIGINT and stop.requested()
    assert received == []  # Neither reached the handler that was there before.
    assert all(signal.getsignal(number) is handler for number in faults.StopRequest.SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM] and stop.signal_number == signal.SIGINT


def test_stop_request_restores_the_handlers_when_the_block_raises(sentinel_handlers):
    handler, _ = sentinel_handlers
    with pytest.raises(ZeroDivisionError):
        with faults.StopRequest():
            assert signal.getsignal(signal.SIGTERM) is not handler
            1 / 0
    assert all(signal.getsignal(number) is handler for number in faults.StopRequest.SIGNALS)


def test_stop_request_off_the_main_thread_installs_nothing(sentinel_handlers):
    """Python allows signal handlers only on the main thread: elsewhere StopRequest neither
    raises nor changes them (and never reports a request)."""
    handler, _ = sentinel_handlers
    seen = {}

    def enter():
        try:
            with faults.StopRequest() as stop:
                seen["inside"] = signal.getsignal(signal.SIGTERM)
                seen["requested"] = stop.requested()
        except BaseException as error:  # Reported to the main thread's assertions.
            seen["error"] = error

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"inside": handler, "requested": False}
    assert all(signal.getsignal(number) is handler for number in faults.StopRequest.SIGNALS)


def test_stop_request_takes_signals_from_the_start_up_watcher(sentinel_handlers, monkeypatch):
    """startup.begin makes signals wake a watcher thread that exits the process at once;
    inside StopRequest a SIGTERM must only be recorded (training saves first), so the
    watcher's wake-up descriptor hears nothing."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd)
    monkeypatch.setitem(startup._watch, "wakeup_fd", write_fd)
    try:
        with faults.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_number == signal.SIGTERM
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 1)
        assert startup._watch["wakeup_fd"] is None
        assert signal.set_wakeup_fd(previous_fd) == -1
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)


# check_finite --------------------------------------------------------------------------------

def rows_with(bad: dict[int, tuple[float, float, int]], count: int = 5) -> list[dict]:
    """`count` per-step metric rows, finite except row index -> (loss, grad_norm, skips)."""
    rows = [{"loss": 2.5, "grad_norm": 0.7, "consecutive_skips": 0} for _ in range(count)]
    for index, (loss, grad_norm, skips) in bad.items():
        rows[index] = {"loss": loss, "grad_norm": grad_norm, "consecutive_skips": skips}
    return rows


@pytest.mark.parametrize("policy", list(faults.NanPolicy))
def test_finite_rows_pass_under_every_policy(policy):
    rows = rows_with({}) + [{"loss": 3.4e38, "grad_norm": 0.0, "consecutive_skips": 0}]
    assert faults.check_finite(rows, 20, policy, 0, unused_checkpoint) is None
    assert faults.check_finite([], 20, policy, 0, unused_checkpoint) is None


@pytest.mark.parametrize("policy", [faults.NanPolicy.STOP, faults.NanPolicy.ROLLBACK])
@pytest.mark.parametrize("loss, grad_norm", [(float("nan"), 1.0), (2.0, float("inf")),
                                             (float("-inf"), float("nan"))])
def test_stop_and_rollback_raise_at_the_first_non_finite_row(policy, loss, grad_norm):
    # Rows are steps 16..20 (the log period ending at step 20): index 2 is step 18.
    rows = rows_with({2: (loss, grad_norm, 0), 3: (float("nan"), float("nan"), 1)})
    with pytest.raises(faults.NonFiniteLoss) as raised:
        faults.check_finite(rows, 20, policy, 10, lambda: 15)
    assert raised.value.step == 18
    assert str(raised.value) == (
        f"loss {loss} and gradient norm {grad_norm} at step 18: stopped before saving it (the "
        "newest checkpoint, step 15, is intact); lower the learning rate, or set "
        "t5x_lite.run_config.LoopConfig.nan_policy to 'skip' or 'rollback'")


def test_the_step_counts_back_from_the_last_row():
    for count, index, last_step, step in [(1, 0, 7, 7), (4, 0, 7, 4), (4, 3, 7, 7),
                                          (100, 37, 1000, 938)]:
        with pytest.raises(faults.NonFiniteLoss) as raised:
            faults.check_finite(rows_with({index: (float("nan"), 1.0, 0)}, count), last_step,
                                faults.NanPolicy.STOP, 0, lambda: None)
        assert raised.value.step == step
        assert f"at step {step}: " in str(raised.value)
        assert "(the newest checkpoint, step None, is intact)" in str(raised.value)


def test_skip_tolerates_up_to_max_consecutive_skips_in_a_row():
    skipped = rows_with({1: (float("nan"), 1.0, 1), 2: (float("nan"), 1.0, 2),
                         3: (float("nan"), float("inf"), 3)})
    assert faults.check_finite(skipped, 9, faults.NanPolicy.SKIP, 3, unused_checkpoint) is None
    with pytest.raises(faults.NonFiniteLoss) as raised:
        faults.check_finite(skipped, 9, faults.NanPolicy.SKIP, 2, lambda: 4)
    assert raised.value.step == 8  # Rows are steps 5..9; the third skip in a row is step 8.
    with pytest.raises(faults.NonFiniteLoss) as raised:
        faults.check_finite(skipped, 9, faults.NanPolicy.SKIP, 0, lambda: 4)
    assert raised.value.step == 6


def test_the_policies_the_message_suggests_are_accepted_values():
    with pytest.raises(faults.NonFiniteLoss) as raised:
        faults.check_finite(rows_with({0: (float("nan"), 1.0, 0)}), 5, faults.NanPolicy.STOP,
                            0, lambda: 0)
    suggested = re.findall(r"'(\w+)'", str(raised.value).split("nan_policy", 1)[1])
    assert suggested == ["skip", "rollback"]
    assert [choices.parse(faults.NanPolicy, value, "nan_policy") for value in suggested] == [
        faults.NanPolicy.SKIP, faults.NanPolicy.ROLLBACK]


def test_the_binding_the_message_names_works_as_a_command_line_flag():
    with pytest.raises(faults.NonFiniteLoss) as raised:
        faults.check_finite(rows_with({0: (float("nan"), 1.0, 0)}), 5, faults.NanPolicy.STOP,
                            0, lambda: 0)
    name = re.search(r"set ([\w.]+) to 'skip'", str(raised.value)).group(1)
    try:
        launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/pretrain.gin"], [
            "MODEL_DIR = '/nonexistent/run'", "TRAIN_STEPS = 3", f"{name} = 'skip'"])
        assert gin.query_parameter(name) == "skip"
    finally:
        gin.clear_config()


# disk_full_explained -------------------------------------------------------------------------

@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_or_quota_is_disk_full_naming_the_newest_checkpoint(tmp_path, monkeypatch,
                                                                      number):
    monkeypatch.chdir(tmp_path)
    error = OSError(number, os.strerror(number), "run/checkpoints/3.orbax-checkpoint-tmp")
    with pytest.raises(faults.DiskFull) as raised:
        with faults.disk_full_explained("run", lambda: 2):
            raise error
    assert str(raised.value) == (
        f"no space left on the disk of {tmp_path}/run (writing "
        "run/checkpoints/3.orbax-checkpoint-tmp): free space, then rerun the same command; it "
        "resumes from the newest complete checkpoint, step 2")
    assert raised.value.__cause__ is error


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_write_to_a_full_device_is_disk_full_from_the_start(tmp_path):
    with pytest.raises(faults.DiskFull) as raised:
        with faults.disk_full_explained(str(tmp_path), lambda: None):
            with open("/dev/full", "wb", buffering=0) as full:
                full.write(b"metrics")
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert str(raised.value) == (
        f"no space left on the disk of {tmp_path} (writing a file): free space, then rerun the "
        "same command; it resumes from the start (no checkpoint was completed)")


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/run"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/run"),
    OSError("no errno"),
    ValueError("not an OSError"),
])
def test_other_errors_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised:
        with faults.disk_full_explained(str(tmp_path), unused_checkpoint):
            raise error
    assert raised.value is error


# choices.parse -------------------------------------------------------------------------------

def test_parse_turns_gin_strings_into_members_and_passes_members_through():
    assert [choices.parse(faults.NanPolicy, value, "nan_policy") for value in POLICY_VALUES] == [
        faults.NanPolicy.STOP, faults.NanPolicy.SKIP, faults.NanPolicy.ROLLBACK]
    for member in faults.NanPolicy:
        assert choices.parse(faults.NanPolicy, member, "nan_policy") is member


@pytest.mark.parametrize("value", ["Skip", "skip ", "", None, 1])
def test_parse_refuses_other_values_listing_the_allowed_ones(value):
    with pytest.raises(ValueError) as raised:
        choices.parse(faults.NanPolicy, value, "LoopConfig.nan_policy")
    assert str(raised.value) == ("LoopConfig.nan_policy must be one of 'stop', 'skip', "
                                 f"'rollback', got {value!r}")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    nan_policy: faults.NanPolicy = faults.NanPolicy.STOP

    def __post_init__(self):
        choices.set_parsed(self, "nan_policy", faults.NanPolicy, "PolicyConfig.nan_policy")


def test_set_parsed_stores_the_member_in_a_frozen_config():
    assert PolicyConfig("rollback").nan_policy is faults.NanPolicy.ROLLBACK
    assert PolicyConfig().nan_policy is faults.NanPolicy.STOP
    assert PolicyConfig("skip") == PolicyConfig(faults.NanPolicy.SKIP)
    with pytest.raises(ValueError, match=r"^PolicyConfig.nan_policy must be one of 'stop', "
                                         r"'skip', 'rollback', got 'halt'$"):
        PolicyConfig("halt")

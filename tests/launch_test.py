"""launch.py called in-process: flags become gin bindings in order, bad flags and bad gin are
one-line UsageErrors (exit status 2 from `main`), gin files resolve from the working
directory, the repository or gin/, defaults < files < bindings, --module_import finds the
user's module, and the multi-host flags reach jax.distributed.initialize only when given
(initialize itself replaced here: no distributed runtime starts). The entry points'
subprocess tests (bad_input_test, first_day_test, multihost_test) cover the same paths whole."""
import argparse
import logging
import os
import re
import sys

import gin
import jax
import pytest

from t5x_lite import faults
from t5x_lite import gin_checks
from t5x_lite import launch

PROBE = "launch_test_probe"
# The function `main` runs in these tests, in a module of the user's.
PROBE_SOURCE = """
CALLS = []


def run(value, label="default"):
    CALLS.append((value, label))


def three():
    return 3
"""
PROBE_GIN = f"""from __gin__ import dynamic_registration
import {PROBE}

PROBE_LABEL = 'from file'
{PROBE}.run:
  value = 5
  label = %PROBE_LABEL
"""
UNKNOWN_FLAG = ("unknown flag {!r}: use --gin_file=FILE, --gin.NAME=VALUE or "
                "--gin_bindings='NAME = VALUE'")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The probe module, importable, and a gin file configuring its `run`."""
    directory = tmp_path_factory.mktemp("probe")
    (directory / f"{PROBE}.py").write_text(PROBE_SOURCE)
    (directory / "probe.gin").write_text(PROBE_GIN)
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop(PROBE, None)


@pytest.fixture
def clean_gin():
    yield
    gin.clear_config()


# parse_flags and distributed_settings --------------------------------------------------------

def test_gin_flags_become_bindings_after_gin_bindings_in_command_order():
    args = launch.parse_flags(["--gin_file=a.gin", "--gin.Y=2", "--gin_bindings=X = 1",
                               "--gin.Z='a=b'", "--gin_file=b.gin", "--module_import=m",
                               "--gin.models.T5Config.d_model=8"], "test")
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.gin_bindings == ["X = 1", "Y = 2", "Z = 'a=b'", "models.T5Config.d_model = 8"]
    assert args.module_import == ["m"] and args.distributed is None and not args.verbose


@pytest.mark.parametrize("flag", ["--bogus", "--gin.TRAIN_STEPS", "positional", "-x",
                                  "--gin_file_typo=x"])
def test_unknown_flags_are_usage_errors_naming_the_three_forms(flag):
    with pytest.raises(launch.UsageError) as raised:
        launch.parse_flags(["--gin_file=a.gin", flag], "test")
    assert str(raised.value) == UNKNOWN_FLAG.format(flag)


def test_no_gin_file_names_an_example_that_exists():
    with pytest.raises(launch.UsageError) as raised:
        launch.parse_flags(["--gin.TRAIN_STEPS=3"], "test")
    assert str(raised.value) == "no --gin_file given: pass e.g. --gin_file=gin/quickstart.gin"
    assert os.path.isfile(launch.resolve_gin_file("gin/quickstart.gin"))
    args = launch.parse_flags(["--gin.TRAIN_STEPS=3"], "test", require_gin_file=False)
    assert args.gin_file == [] and args.gin_bindings == ["TRAIN_STEPS = 3"]


def test_an_entry_points_own_parser_keeps_its_arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir")
    args = launch.parse_flags(["--model_dir=runs/x", "--gin.SEED=1"], "test", parser,
                              require_gin_file=False)
    assert args.model_dir == "runs/x" and args.gin_bindings == ["SEED = 1"]


@pytest.mark.parametrize("flags, expected", [
    (["--process_id=0"], "--coordinator_address is missing: multi-host runs pass all of "
     "--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or none, on a TPU pod "
     "or SLURM)"),
    (["--coordinator_address=h:1", "--process_id=0"], "--num_processes is missing"),
    (["--coordinator_address=h:0", "--num_processes=2", "--process_id=0"],
     "--coordinator_address='h:0' is not HOST:PORT: pass e.g. "
     "--coordinator_address=10.0.0.2:8476"),
    (["--coordinator_address=h:65536", "--num_processes=2", "--process_id=0"],
     "--coordinator_address='h:65536' is not HOST:PORT"),
    (["--coordinator_address=:8476", "--num_processes=2", "--process_id=0"],
     "--coordinator_address=':8476' is not HOST:PORT"),
    (["--coordinator_address=h:port", "--num_processes=2", "--process_id=0"],
     "--coordinator_address='h:port' is not HOST:PORT"),
    (["--coordinator_address=h:1", "--num_processes=0", "--process_id=0"],
     "--num_processes must be >= 1, got 0"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=-1"],
     "--process_id must be in [0, 2) for --num_processes=2, got -1"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=1.0"],
     "--process_id='1.0' is not an integer"),
])
def test_multihost_flag_boundaries_are_one_line_usage_errors(flags, expected):
    with pytest.raises(launch.UsageError) as raised:
        launch.parse_flags(["--gin_file=a.gin", *flags], "test")
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)


def test_multihost_flags_at_their_limits_are_accepted():
    args = launch.parse_flags(["--gin_file=a.gin", "--coordinator_address=host-0:65535",
                               "--num_processes=1", "--process_id=0"], "test")
    assert args.distributed == {"coordinator_address": "host-0:65535", "num_processes": 1,
                                "process_id": 0}
    assert launch.distributed_settings(argparse.Namespace()) is None  # A parser without them.


# start_distributed ---------------------------------------------------------------------------

@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize's arguments instead of joining a system; no
    cluster in the environment; the CPU collectives setting put back afterwards."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    collectives = jax.config.jax_cpu_collectives_implementation
    yield calls
    jax.config.update("jax_cpu_collectives_implementation", collectives)


def test_start_distributed_joins_only_with_flags_or_a_detected_cluster(fake_initialize,
                                                                        monkeypatch, capsys):
    launch.start_distributed(None)
    assert fake_initialize == [] and capsys.readouterr().out == ""
    jax.config.update("jax_cpu_collectives_implementation", None)
    settings = {"coordinator_address": "10.0.0.2:8476", "num_processes": 2, "process_id": 1}
    launch.start_distributed(settings)
    assert fake_initialize == [settings]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"  # CPU runs reduce by gloo.
    assert capsys.readouterr().out == (
        f"Process 0 of 1: {jax.local_device_count()} local devices, {jax.device_count()} "
        "devices in all\n")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    launch.start_distributed(None)  # jax finds the coordinator itself: no arguments.
    assert fake_initialize == [settings, {}]


# resolve_gin_file, parse_gin, macro_value ----------------------------------------------------

def test_gin_files_resolve_from_the_working_directory_then_the_repository_then_gin(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_gin = os.path.join(launch.GIN_DIR, "runs", "pretrain.gin")
    assert launch.resolve_gin_file("runs/pretrain.gin") == in_gin
    assert launch.resolve_gin_file("gin/runs/pretrain.gin") == in_gin
    assert launch.resolve_gin_file(in_gin) == in_gin
    (tmp_path / "runs" / "pretrain.gin").mkdir(parents=True)  # A folder does not shadow it.
    assert launch.resolve_gin_file("runs/pretrain.gin") == in_gin
    (tmp_path / "quickstart.gin").write_text("SEED = 3\n")  # A file of the user's does.
    assert launch.resolve_gin_file("quickstart.gin") == str(tmp_path / "quickstart.gin")
    with pytest.raises(launch.UsageError) as raised:
        launch.resolve_gin_file("runs/pretrian.gin")
    assert str(raised.value) == ("gin file 'runs/pretrian.gin' does not exist: pass a path "
                                 f"relative to the current directory or to {launch.GIN_DIR}")


def test_defaults_then_files_in_order_then_bindings(tmp_path, probe, clean_gin):
    (tmp_path / "a.gin").write_text("EVAL_STEPS = 5\nLOG_PERIOD = 7\nSEED = 1\n")
    (tmp_path / "b.gin").write_text(f"from __gin__ import dynamic_registration\nimport {PROBE}\n"
                                    f"EVAL_STEPS = 6\nTHREE = @{PROBE}.three()\n")
    launch.parse_gin([str(tmp_path / "a.gin"), str(tmp_path / "b.gin")], ["LOG_PERIOD = 9"])
    with open(launch.DEFAULTS_GIN) as f:
        keep = int(re.search(r"^KEEP_CHECKPOINTS = (\d+)$", f.read(), re.MULTILINE).group(1))
    assert [launch.macro_value(name) for name in
            ("EVAL_STEPS", "LOG_PERIOD", "SEED", "KEEP_CHECKPOINTS", "THREE")] == [6, 9, 1, keep, 3]
    assert launch.macro_value("NOT_A_MACRO", "fallback") == "fallback"
    assert gin.config_is_locked()


def test_a_binding_may_override_a_macro_only_a_file_sets(probe, clean_gin):
    launch.parse_gin([str(probe / "probe.gin")], ["PROBE_LABEL = 'from flag'"])
    assert launch.macro_value("PROBE_LABEL") == "from flag"


@pytest.mark.parametrize("gin_text, bindings, expected", [
    ("MODEL_DIR = runs/x\n", [],
     "{file}:{line}: a string value needs quotes: MODEL_DIR = 'runs/x'"),
    ("", ["PROBE_LABL = 'x'"], "--gin.PROBE_LABL: no gin file reads the macro PROBE_LABL (did "
     "you mean PROBE_LABEL?); gin/defaults.gin lists the macros"),
    (f"{PROBE}.run.value = %UNSET_VALUE\n", [],
     "UNSET_VALUE is not set: pass --gin.UNSET_VALUE=VALUE (or set it in a gin file)"),
    ("", [f"import {PROBE}", f"{PROBE}.run.valu = 3"],
     f"--gin.{PROBE}.run.valu=3: {PROBE}.run has no parameter 'valu' (did you mean value?)"),
    ("import launch_test_no_such_module\n", [],
     "gin files import 'launch_test_no_such_module', which is not on the Python path: run "
     "from the directory holding it, or add it to PYTHONPATH"),
])
def test_gin_slips_are_one_line_usage_errors(tmp_path, probe, clean_gin, gin_text, bindings,
                                             expected):
    (tmp_path / "slip.gin").write_text(PROBE_GIN + gin_text)  # Which sets PROBE_LABEL.
    with pytest.raises(launch.UsageError) as raised:
        launch.parse_gin([str(tmp_path / "slip.gin")], bindings)
    assert str(raised.value) == expected.format(file=tmp_path / "slip.gin",
                                                line=len(PROBE_GIN.splitlines()) + 1)
    assert logging.root.manager.disable == logging.NOTSET  # gin's ERROR logs are back on.


@pytest.mark.parametrize("old_binding, moved_to", [
    ("t5x_lite.train.LoopConfig.seed = 1", "bind run_config.LoopConfig (from t5x_lite import "
     "run_config)"),
    ("partitioning.MeshConfig.rules = [('batch', None)]", "bind partitioning.MeshConfig."
     "rule_table = 'data', 'fsdp', 'fsdp_tensor' or 'expert', plus rule_overrides"),
])
def test_a_config_gin_from_before_a_move_names_the_new_binding(tmp_path, clean_gin, old_binding,
                                                               moved_to):
    path = tmp_path / "config.gin"
    path.write_text("from __gin__ import dynamic_registration\nimport t5x_lite.train\n"
                    f"from t5x_lite import partitioning\n{old_binding}\n")
    with pytest.raises(launch.UsageError) as raised:
        launch.parse_gin([str(path)], [])
    assert str(raised.value).startswith(f"{path}:4: ")
    assert str(raised.value).endswith(f"; it moved: {moved_to} (edit that line of an older "
                                      "config.gin)")


def test_a_syntax_error_in_a_module_a_gin_file_imports_is_one_line(tmp_path, probe, clean_gin,
                                                                  monkeypatch):
    (tmp_path / "launch_test_broken.py").write_text("def register(:\n    pass\n")
    (tmp_path / "broken.gin").write_text("import launch_test_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(launch.UsageError) as raised:
            launch.parse_gin([str(tmp_path / "broken.gin")], [])
    finally:
        sys.modules.pop("launch_test_broken", None)
    assert "launch_test_broken.py" in str(raised.value) and "\n" not in str(raised.value)


# import_modules ------------------------------------------------------------------------------

@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory for a user's modules; sys.path and sys.modules put back after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [path for path in sys.path if path not in ("", ".")])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("launch_test_"):
            del sys.modules[name]


def test_module_import_finds_the_users_module_in_the_working_directory(user_dir):
    (user_dir / "launch_test_tasks.py").write_text("REGISTERED = ['my_task']\n")
    launch.import_modules(["launch_test_tasks"])
    assert sys.modules["launch_test_tasks"].REGISTERED == ["my_task"]
    assert sys.path[0] == str(user_dir)


def test_a_missing_module_names_where_to_run_from(user_dir):
    with pytest.raises(launch.UsageError) as raised:
        launch.import_modules(["launch_test_pkg.tasks"])
    assert str(raised.value) == (
        "--module_import=launch_test_pkg.tasks: no module 'launch_test_pkg.tasks' in the "
        "current directory or on the Python path: run from the directory holding "
        "launch_test_pkg/tasks.py, or add its directory to PYTHONPATH")


@pytest.mark.parametrize("dependency", [
    "launch_test_absent_dependency",
    "launch_test",  # A prefix of the module's own name.
])
def test_a_module_missing_its_own_import_shows_that_import(user_dir, dependency):
    (user_dir / "launch_test_tasks.py").write_text(f"import {dependency}\n")
    with pytest.raises(ModuleNotFoundError) as raised:
        launch.import_modules(["launch_test_tasks"])
    assert raised.value.name == dependency and not isinstance(raised.value, launch.UsageError)


# bad_input_exits and main --------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    launch.UsageError("bad flag: do this\nsecond line"),
    gin_checks.GinSlip("--gin.X: no gin file reads the macro X"),
    FileNotFoundError("no checkpoint in /x: train first"),
    faults.DiskFull("no space left on the disk of /x"),
    faults.NonFiniteLoss("loss nan and gradient norm 1.0 at step 3", 3),
    launch.UsageError(""),
])
def test_bad_input_is_one_error_line_and_exit_status_2(capsys, error):
    with pytest.raises(SystemExit) as exited:
        with launch.bad_input_exits(["--gin_file=a.gin"]):
            raise error
    assert exited.value.code == 2
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    assert capsys.readouterr() == ("", f"error: {first}\n")


def test_verbose_or_debug_reraises_and_other_errors_pass_through(capsys, monkeypatch):
    monkeypatch.delenv("T5X_LITE_DEBUG", raising=False)
    error = launch.UsageError("bad")
    with pytest.raises(launch.UsageError) as raised:
        with launch.bad_input_exits(["--a", "--verbose", "b"]) as argv:
            assert argv == ["--a", "b"]
            raise error
    assert raised.value is error
    monkeypatch.setenv("T5X_LITE_DEBUG", "1")
    with pytest.raises(launch.UsageError):
        with launch.bad_input_exits([]):
            raise error
    monkeypatch.delenv("T5X_LITE_DEBUG")
    for bug in (KeyError("k"), TypeError("t"), faults.Preempted(143)):  # Not bad input.
        with pytest.raises(type(bug)) as raised:
            with launch.bad_input_exits([]):
                raise bug
        assert raised.value is bug
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("argv, expected", [
    (["--bogus"], UNKNOWN_FLAG.format("--bogus")),
    (["--gin.TRAIN_STEPS=3"], "no --gin_file given: pass e.g. --gin_file=gin/quickstart.gin"),
    (["--gin_file=launch_test_missing.gin"], "gin file 'launch_test_missing.gin' does not "
     f"exist: pass a path relative to the current directory or to {launch.GIN_DIR}"),
    (["--gin_file=quickstart.gin", "--num_processes=2"], "--coordinator_address is missing: "
     "multi-host runs pass all of --coordinator_address=HOST:PORT --num_processes=N "
     "--process_id=I (or none, on a TPU pod or SLURM)"),
    (["--gin_file=quickstart.gin", "--module_import=launch_test_absent"],
     "--module_import=launch_test_absent: no module 'launch_test_absent' in the current "
     "directory or on the Python path: run from the directory holding launch_test_absent.py, "
     "or add its directory to PYTHONPATH"),
    (["--gin_file"], f"argument --gin_file: expected one argument (see: python -m {PROBE} "
     "--help)"),
])
def test_main_with_bad_flags_exits_2_with_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exited:
        launch.main(f"{PROBE}.run", "test", argv)
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", f"error: {expected}\n")
    with pytest.raises(launch.UsageError):
        launch.main(f"{PROBE}.run", "test", [*argv, "--verbose"])


def test_main_calls_the_named_function_with_what_gin_binds(probe, clean_gin, monkeypatch):
    for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    calls = __import__(PROBE).CALLS
    calls.clear()
    launch.main(f"{PROBE}.run", "test", [
        f"--gin_file={probe / 'probe.gin'}", f"--module_import={PROBE}",
        "--gin.PROBE_LABEL='from flag'",
        # Command-line bindings import only BINDINGS_PREAMBLE's modules: the user's own
        # module's parameters need its import among them.
        f"--gin_bindings=import {PROBE}", f"--gin.{PROBE}.run.value=6"])
    assert calls == [(6, "from flag")]

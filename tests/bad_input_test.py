"""Bad input at every entry point: one `error:` line naming the problem and the fix, exit
status 2, and MODEL_DIR left byte for byte as it was, so that the correct command resumes
there exactly as it does in an untouched copy (test_correct_run_resumes_in_a_copy). Where
the bad input changes MODEL_DIR or needs the user to act (a full disk, a damaged checkpoint,
an unwritable directory, another model's checkpoints) the test runs the correct command
afterwards itself. The entry points run in-process (their `main` with an argv) to keep this
quick; the last tests run commands as real processes to check that no traceback is printed
without --verbose."""
import errno
import hashlib
import os
import shutil
import sys

import pytest

from t5x_lite import checkpoints
from t5x_lite import inspect_task
from t5x_lite import launch
from tests import train_test
from tests.train_test import task_name  # noqa: F401  (the fixture registering the task)

sys.path.insert(0, os.path.join(train_test.REPO, "scripts"))
import convert_hf  # noqa: E402

ENTRY_POINTS = {"train": "t5x_lite.train.run", "eval": "t5x_lite.eval.run",
                "infer": "t5x_lite.infer.run"}
FIRST_STEPS = 2  # The shared run's checkpoints: steps 1 and 2.


def flags(model_dir, run: str = "pretrain", steps: int = FIRST_STEPS) -> list[str]:
    """A correct command line for `run` (pretrain, eval or infer) on train_test's byte task."""
    bindings = [binding for binding in train_test.bindings(model_dir, steps)
                if run == "pretrain" or binding.split(" =")[0] in
                ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE",
                 "models.T5Config.vocab_size", *(("EVAL_STEPS",) if run == "eval" else ()))]
    if run == "pretrain":
        bindings += ["CHECKPOINT_PERIOD = 1", "EVAL_PERIOD = 100"]
    return ["--gin_file=models/t5_1_1_tiny.gin", f"--gin_file=runs/{run}.gin",
            *(f"--gin_bindings={binding}" for binding in bindings)]


def main(entry: str, argv: list[str]) -> None:
    if entry in ENTRY_POINTS:
        launch.main(ENTRY_POINTS[entry], entry, argv)
    elif entry == "inspect_task":
        inspect_task.main(argv)
    else:
        convert_hf.main(argv)


def error_line(capsys, entry: str, *argv: str) -> str:
    """The one line an entry point prints for bad input (asserting exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(entry, list(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "".join(lines), lines
    return errors[0]


def snapshot(directory) -> dict[str, str]:
    """{relative path: content hash} of every file under `directory`."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def trained_run(task_name, tmp_path_factory):  # noqa: F811
    """A MODEL_DIR with checkpoints at steps 1 and 2 of the tiny byte-level model."""
    model_dir = tmp_path_factory.mktemp("trained") / "run"
    main("train", flags(model_dir))
    assert checkpoints.complete_steps(model_dir) == [1, FIRST_STEPS]
    return model_dir


@pytest.fixture
def model_dir(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def assert_correct_run_resumes(model_dir, capsys, from_step: int = FIRST_STEPS) -> None:
    capsys.readouterr()
    main("train", flags(model_dir, steps=FIRST_STEPS + 1))
    out = capsys.readouterr().out
    assert f"Resuming from checkpoint at step {from_step}." in out, out
    assert checkpoints.complete_steps(model_dir)[-1] == FIRST_STEPS + 1


def check_train_refuses(capsys, model_dir, *extra: str) -> str:
    """The bad training command's error line, after checking that it left every file of
    MODEL_DIR as it was."""
    before = snapshot(model_dir)
    line = error_line(capsys, "train", *flags(model_dir, steps=FIRST_STEPS + 1), *extra)
    assert snapshot(model_dir) == before
    return line


def test_correct_run_resumes_in_a_copy(model_dir, capsys):
    assert_correct_run_resumes(model_dir, capsys)


def test_unknown_task_names_the_closest(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.MIXTURE_OR_TASK_NAME='train_test_byte'")
    assert line.startswith("error: unknown task or mixture 'train_test_byte': did you mean "
                           "train_test_bytes? (register yours in a module of your own and pass "
                           "--module_import=my_tasks")


def test_unparsable_gin_file(model_dir, capsys, tmp_path):
    (tmp_path / "broken.gin").write_text("TRAIN_STEPS = (3,\n")
    line = check_train_refuses(capsys, model_dir, f"--gin_file={tmp_path / 'broken.gin'}")
    assert line.startswith("error: bad gin configuration: ")


def test_unknown_binding(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.models.T5Config.no_such_field=3")
    assert line == ("error: --gin.models.T5Config.no_such_field=3: models.T5Config has no "
                    "parameter 'no_such_field'")


def test_missing_required_binding(model_dir, capsys):
    before = snapshot(model_dir)
    line = error_line(capsys, "train", *[flag for flag in flags(model_dir, steps=3)
                                         if "MIXTURE_OR_TASK_NAME" not in flag])
    assert line.startswith("error: MIXTURE_OR_TASK_NAME is not set: pass "
                           "--gin.MIXTURE_OR_TASK_NAME=\"'stdlib_span_corruption'\"")
    assert snapshot(model_dir) == before


def test_lengths_too_short_for_the_objective(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir,
                               '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 2}')
    assert line.startswith("error: task_feature_lengths {'inputs': 32, 'targets': 2} are too "
                           "short for span corruption") and "targets >= 3" in line


@pytest.mark.parametrize("extra, expected", [
    (["--gin.models.T5Config.encoder_attention='local'"],
     "error: T5Config.local_radius = 127 does not fit encoder inputs of 32 tokens"),
    (["--gin.models.T5Config.encoder_attention='transient_global'",
      "--gin.models.T5Config.local_radius=7", "--gin.models.T5Config.global_block_size=64"],
     "error: T5Config.global_block_size = 64 does not fit encoder inputs of 32 tokens"),
    (["--gin_file=models/decoder_only_tiny.gin",
      "--gin.models.T5Config.encoder_attention='local'"],
     "error: T5Config.encoder_attention = 'local' is LongT5's encoder attention, but a "
     "decoder_only model has no encoder")])
def test_longt5_attention_that_cannot_apply(model_dir, capsys, extra, expected):
    assert check_train_refuses(capsys, model_dir, *extra).startswith(expected)


def test_bad_objective_setting(model_dir, capsys):
    before = snapshot(model_dir)
    line = error_line(capsys, "train", *flags(model_dir, steps=3),
                      "--gin_file=objectives/span_corruption.gin",
                      "--gin.MIXTURE_OR_TASK_NAME=@tasks.register_task()",
                      "--gin.objectives.SpanCorruption.noise_density=1.5")
    assert line == "error: noise_density must be in (0, 1), got 1.5"
    assert snapshot(model_dir) == before


VOCAB_FLAGS = ["--gin.MIXTURE_OR_TASK_NAME=@tasks.register_task()",
               "--gin.tasks.register_task.name='bad_input_vocab'",
               "--gin.tasks.register_task.vocabulary=@vocab.sentencepiece_vocabulary()"]


def test_missing_vocabulary_file(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, *VOCAB_FLAGS,
                               "--gin.vocab.sentencepiece_vocabulary.model_path='/no/sp.model'")
    assert line.startswith("error: SentencePiece model /no/sp.model does not exist: pass an "
                           "existing .model file")


def test_corrupt_vocabulary_file(model_dir, capsys, tmp_path):
    (tmp_path / "sp.model").write_bytes(b"\x08\x96not a sentencepiece model")
    line = check_train_refuses(capsys, model_dir, *VOCAB_FLAGS,
                               f"--gin.vocab.sentencepiece_vocabulary.model_path="
                               f"'{tmp_path}/sp.model'")
    assert line.startswith(f"error: SentencePiece model {tmp_path}/sp.model is corrupt or not "
                           "a SentencePiece model")


def test_mesh_not_matching_the_devices(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.partitioning.MeshConfig.data=3")
    assert line == ("error: mesh (data=3, fsdp=1, tensor=1, expert=1) needs 3 devices, but 1 "
                    "are available: set one axis to -1 or make the sizes multiply to the "
                    "device count")


def test_batch_not_divisible(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.BATCH_SIZE=7",
                               "--gin.t5x_lite.train.run.num_microbatches=2")
    assert line == ("error: BATCH_SIZE 7 does not divide over data x fsdp x expert = 1 "
                    "devices x num_microbatches = 2: use a multiple of 2")


def test_input_shards_not_dividing_the_batch(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.NUM_INPUT_SHARDS=3")
    assert line == ("error: BATCH_SIZE 8 does not split over NUM_INPUT_SHARDS = 3 input "
                    "shards: use a multiple of 3")


def test_another_input_shard_count_is_not_a_damaged_checkpoint(model_dir, capsys):
    """The checkpoint holds the position of 1 input shard; a run reading 2 refuses it with
    the two ways on, and resumes its state on a new stream when told to, saying so."""
    line = check_train_refuses(capsys, model_dir, "--gin.NUM_INPUT_SHARDS=2")
    assert line == (f"error: checkpoint {model_dir / 'checkpoints'}/{FIRST_STEPS} holds input "
                    "positions for 1 input shard, this run reads NUM_INPUT_SHARDS = 2: bind "
                    "NUM_INPUT_SHARDS = 1 to resume exactly, or bind "
                    "RESUME_WITHOUT_INPUT_POSITION = True to resume its parameters and "
                    "optimizer state on a new input stream")
    main("train", [*flags(model_dir, steps=FIRST_STEPS + 1), "--gin.NUM_INPUT_SHARDS=2",
                   "--gin.RESUME_WITHOUT_INPUT_POSITION=True"])
    out = capsys.readouterr().out
    assert f"Resuming from checkpoint at step {FIRST_STEPS}." in out
    assert out.count("WARNING: resuming step 2's parameters and optimizer state on a NEW input "
                     "stream (seed 0 + 2, 2 input shards), not the saved positions of 1 input "
                     "shard") == 1
    assert checkpoints.complete_steps(model_dir)[-1] == FIRST_STEPS + 1
    saved = model_dir / "checkpoints" / str(FIRST_STEPS + 1) / "data"
    assert sorted(path.name for path in saved.iterdir() if path.is_dir()) == [
        "shard_00000-of-00002", "shard_00001-of-00002"]


def test_positions_saved_per_process_by_an_earlier_version_name_the_way_on(model_dir, capsys):
    data = model_dir / "checkpoints" / str(FIRST_STEPS) / "data"
    os.rename(data / "shard_00000-of-00001", data / "process_0-of-1")
    line = check_train_refuses(capsys, model_dir)
    assert line == (f"error: checkpoint {model_dir / 'checkpoints'}/{FIRST_STEPS} holds input "
                    "positions for each process, as an earlier t5x_lite saved them "
                    "(process_0-of-1): bind RESUME_WITHOUT_INPUT_POSITION = True to resume its "
                    "parameters and optimizer state on a new input stream")


def test_model_dir_not_writable(capsys, task_name, tmp_path):  # noqa: F811
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where MODEL_DIR's parent should be")
    line = error_line(capsys, "train", *flags(blocker / "run"))
    assert line.startswith(f"error: MODEL_DIR '{blocker}/run' cannot be written (Not a "
                           "directory): pass --gin.MODEL_DIR=")
    assert blocker.read_text() == "a file where MODEL_DIR's parent should be"
    blocker.unlink()
    main("train", flags(blocker / "run", steps=1))
    assert checkpoints.complete_steps(blocker / "run") == [1]


def test_model_dir_of_another_model_shape(model_dir, capsys):
    line = check_train_refuses(capsys, model_dir, "--gin.models.T5Config.d_model=64")
    assert line.startswith(f"error: {model_dir} holds checkpoints of another model: parameter ")
    assert " there and 64" in line and "use that run's model settings (its config.gin)" in line
    assert_correct_run_resumes(model_dir, capsys)  # config.gin was not overwritten either.


def damage(model_dir, step: int) -> None:
    """Cuts the largest parameter data file of checkpoint `step` to half its size."""
    files = [os.path.join(root, name) for root, _, names in
             os.walk(os.path.join(model_dir, "checkpoints", str(step), "params"))
             for name in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def test_corrupt_checkpoint_names_the_way_back(model_dir, capsys):
    damage(model_dir, FIRST_STEPS)
    before = snapshot(model_dir)
    line = error_line(capsys, "train", *flags(model_dir, steps=3))
    damaged = model_dir / "checkpoints" / str(FIRST_STEPS)
    moved = model_dir / f"damaged_checkpoint_{FIRST_STEPS}"
    assert line.startswith(f"error: checkpoint {damaged} cannot be read (")
    assert line.endswith(f"it is damaged; move it out of checkpoints/ (mv {damaged} {moved}) "
                         "to go on from step 1, the newest before it")
    assert snapshot(model_dir) == before
    # Evaluation says the same, and doing what the line says lets training go on.
    eval_line = error_line(capsys, "eval", *flags(model_dir, "eval"))
    assert eval_line.split(" (")[0] == line.split(" (")[0]
    assert eval_line.split("): ")[-1] == line.split("): ")[-1]
    os.rename(damaged, moved)
    assert_correct_run_resumes(model_dir, capsys, from_step=1)


def test_empty_corpus(model_dir, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    line = check_train_refuses(capsys, model_dir,
                               "--gin.MIXTURE_OR_TASK_NAME=@tasks.register_text_task()",
                               "--gin.tasks.register_text_task.name='bad_input_empty'",
                               f"--gin.tasks.register_text_task.files=['{tmp_path}/empty.txt']")
    assert line == (f"error: the train files hold no text ({tmp_path}/empty.txt): add documents, "
                    "one per line (.txt) or one JSON object per line (.jsonl)")


def test_disk_full_while_saving(model_dir, capsys, monkeypatch):
    """ENOSPC in the middle of the asynchronous save of step 3 (its input-position item):
    the run stops with one line, the unfinished save stays under Orbax's temporary name,
    and the rerun resumes from step 2, skipping it."""
    write = checkpoints.DataStateHandler.save

    def full_disk(self, directory, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(checkpoints.DataStateHandler, "save", full_disk)
    line = error_line(capsys, "train", *flags(model_dir, steps=3))
    assert line.startswith(f"error: no space left on the disk of {model_dir} (writing "
                           f"{model_dir}/checkpoints/3.orbax-checkpoint-tmp")
    assert line.endswith("free space, then rerun the same command; it resumes from the "
                         "newest complete checkpoint, step 2")
    assert checkpoints.complete_steps(model_dir) == [1, 2]
    monkeypatch.setattr(checkpoints.DataStateHandler, "save", write)
    assert_correct_run_resumes(model_dir, capsys)


def test_eval_and_infer_refuse_another_model_shape(model_dir, capsys, tmp_path):
    before = snapshot(model_dir)
    for entry, run in (("eval", "eval"), ("infer", "infer")):
        extra = [f"--gin.INFER_OUTPUT='{tmp_path}/out.jsonl'"] if entry == "infer" else []
        line = error_line(capsys, entry, *flags(model_dir, run), *extra,
                          "--gin.models.T5Config.num_heads=2")
        assert line.startswith(f"error: {model_dir} holds checkpoints of another model: "
                               "parameter ") and "x2x32 in the gin model" in line
    assert snapshot(model_dir) == before and not (tmp_path / "out.jsonl").exists()
    capsys.readouterr()
    main("eval", flags(model_dir, "eval"))
    assert f"Checkpoint step {FIRST_STEPS}: validation loss" in capsys.readouterr().out


def test_eval_unknown_task_and_no_checkpoint(model_dir, capsys, tmp_path):
    line = error_line(capsys, "eval", *flags(model_dir, "eval"),
                      "--gin.MIXTURE_OR_TASK_NAME='train_test_bites'")
    assert line.startswith("error: unknown task or mixture 'train_test_bites': did you mean "
                           "train_test_bytes? (register yours in a module of your own and pass "
                           "--module_import=my_tasks")
    line = error_line(capsys, "eval", *flags(tmp_path / "never_trained", "eval"))
    assert "no checkpoints in" in line and "train first" in line


def test_inspect_task_bad_input(capsys, task_name):  # noqa: F811
    assert error_line(capsys, "inspect_task", "train_test_byts").startswith(
        "error: unknown task or mixture 'train_test_byts': did you mean train_test_bytes? ")
    line = error_line(capsys, "inspect_task", "train_test_bytes", "--targets", "1")
    assert line == "error: task_feature_lengths['targets'] must be >= 2, got 1"


def test_convert_hf_refuses_another_model_shape(model_dir, capsys, tmp_path):
    (tmp_path / "other.gin").write_text(
        "include 'gin/models/t5_1_1_tiny.gin'\nmodels.T5Config.vocab_size = 512\n")
    line = error_line(capsys, "convert_hf", "to-hf", "--model_dir", str(model_dir), "--out",
                      str(tmp_path / "hf"), "--gin_file", str(tmp_path / "other.gin"))
    assert line.startswith(f"error: {model_dir} holds checkpoints of another model: ")
    assert not (tmp_path / "hf").exists()


def test_a_real_process_prints_one_line_and_verbose_the_traceback(tmp_path):
    bad = [*train_test.QUICK, f"--gin.MODEL_DIR='{tmp_path}'",
           "--gin.MIXTURE_OR_TASK_NAME='stdlib_span_corruptio'"]
    result = train_test.run_train_command(*bad)
    assert "Traceback" not in result.stderr
    assert train_test.error_line(result).startswith(
        "error: unknown task or mixture 'stdlib_span_corruptio': did you mean "
        "stdlib_span_corruption or stdlib_span_corruption_bytes? ")
    verbose = train_test.run_train_command(*bad, "--verbose")
    assert verbose.returncode != 0 and "Traceback (most recent call last)" in verbose.stderr
    assert not os.listdir(tmp_path)


def test_a_damaged_checkpoint_is_one_line_from_a_real_process(model_dir, tmp_path):
    """The line is the last thing on stderr. TensorStore's reads abandoned by the failed
    restore can still print "Event loop is closed" tracebacks from their own threads before
    it (seen in about one run in four); from the line on, stderr is silenced."""
    damage(model_dir, FIRST_STEPS)
    train_test.register_sentences_task(tmp_path)  # The same task, from files a child reads.
    task = ["--gin.MIXTURE_OR_TASK_NAME=@tasks.register_text_task()",
            f"--gin.tasks.register_text_task.name='{train_test.TASK}'",
            f"--gin.tasks.register_text_task.files=['{tmp_path}/train.txt']",
            f"--gin.tasks.register_text_task.validation_files=['{tmp_path}/validation.txt']",
            "--gin.tasks.register_text_task.vocabulary=@vocab.byte_vocabulary()"]
    result = train_test.run_train_command(*flags(model_dir, steps=3), *task)
    assert train_test.error_line(result) == result.stderr.strip().splitlines()[-1]
    assert "it is damaged; move it out of checkpoints/" in result.stderr

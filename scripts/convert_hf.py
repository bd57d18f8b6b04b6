"""Converts between t5x_lite checkpoints and Hugging Face T5 / LongT5 directories (safetensors
only).

  # A MODEL_DIR's newest checkpoint -> a directory transformers' from_pretrained loads. The
  # model's architecture comes from the run's MODEL_DIR/config.gin unless --gin_file is given;
  # a SentencePiece vocabulary of its task goes along as a tokenizer AutoTokenizer loads.
  python scripts/convert_hf.py to-hf --model_dir /tmp/run --out /tmp/run_hf

  # A Hugging Face T5 / T5 v1.1 / mT5 / LongT5 directory -> a MODEL_DIR with a step-0 parameter
  # checkpoint and model.gin (its architecture and, given a spiece.model, its vocabulary),
  # for t5x_lite.eval / infer or INIT_FROM.
  python scripts/convert_hf.py from-hf --hf_dir /tmp/t5-small --model_dir /tmp/t5_small
  python -m t5x_lite.eval --gin_file=/tmp/t5_small/model.gin --gin_file=gin/runs/eval.gin ...
"""
import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from t5x_lite import checkpoints  # noqa: E402
from t5x_lite import hf  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import models  # noqa: E402
from t5x_lite.data import tasks  # noqa: E402
from t5x_lite.data import vocab  # noqa: E402

MODEL_GIN = "model.gin"


def model_config_from_gin(gin_files: list[str]) -> models.T5Config:
    launch.parse_gin(gin_files, [])
    try:
        return gin.get_configurable(models.T5Config)()
    finally:
        gin.clear_config()


def run_vocabulary(gin_files: list[str]) -> seqio.Vocabulary | None:
    """The vocabulary of the run's task (MIXTURE_OR_TASK_NAME) or, in a from-hf model.gin,
    the one it binds to tasks.register_task; None when the files name neither."""
    launch.parse_gin(gin_files, [])
    try:
        name = launch.macro_value("MIXTURE_OR_TASK_NAME")
        if name is not None:
            return tasks.targets_vocabulary(name)
        try:
            reference = gin.query_parameter("tasks.register_task.vocabulary")
        except ValueError:
            return None
        return reference.scoped_configurable_fn() if reference.evaluate else None
    finally:
        gin.clear_config()


def tokenizer_of(gin_files: list[str]) -> tuple[dict[str, bytes], str]:
    """(files, what they are) of the run's tokenizer (hf.tokenizer_files); ({}, why none)
    when its vocabulary cannot be found or is not SentencePiece."""
    try:
        vocabulary = run_vocabulary(gin_files)
    except (ValueError, OSError) as error:  # an unregistered task, a missing model file
        return {}, f"without a tokenizer: {launch.first_line(error)}"
    if vocabulary is None:
        return {}, (f"without a tokenizer: {' '.join(gin_files)} name no task "
                    "(MIXTURE_OR_TASK_NAME)")
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        return {}, (f"without a tokenizer: the task's {type(vocabulary).__name__} is not a "
                    "SentencePiece vocabulary")
    vocabulary.load_model()  # the stdlib vocabulary trains its model file on first use
    with tf.io.gfile.GFile(vocabulary.sentencepiece_model_file, "rb") as f:
        try:
            files = hf.tokenizer_files(f.read(), vocabulary.extra_ids)
        except hf.HFFormatError as error:
            return {}, f"without a tokenizer: {error}"
    return files, (f"with its tokenizer ({vocabulary.sentencepiece_model_file}, "
                   f"{vocabulary.extra_ids} sentinels)")


def restored_params(model: models.Model, model_dir: str) -> tuple[int, dict]:
    if not os.path.isdir(checkpoints.checkpoint_dir(model_dir)):
        raise FileNotFoundError(f"no checkpoints in {os.path.abspath(model_dir)}: pass the "
                                f"MODEL_DIR of a training run")
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    manager = checkpoints.create_manager(model_dir, read_only=True)
    return checkpoints.restore_params(manager, abstract)


def to_hf(args: argparse.Namespace) -> None:
    gin_files = args.gin_file or [os.path.join(args.model_dir, "config.gin")]
    if not args.gin_file and not os.path.isfile(gin_files[0]):
        raise FileNotFoundError(f"{gin_files[0]} does not exist: pass the run's model gin "
                                f"file with --gin_file")
    model = models.model_for(model_config_from_gin(gin_files))
    hf.config_to_hf(model.config)  # an unexportable model fails before the restore
    tokenizer, tokenizer_note = tokenizer_of(gin_files)
    step, params = restored_params(model, args.model_dir)
    hf.save_t5(model, params, args.out, tokenizer)
    count = models.count_parameters(params)
    architecture = hf.config_to_hf(model.config)["architectures"][0]
    print(f"Wrote the step-{step} parameters of {args.model_dir} ({count:,} parameters) to "
          f"{args.out} as a transformers {architecture}, {tokenizer_note}.")


def gin_of(config: models.T5Config, spiece: tuple[str, int] | None = None) -> str:
    """Gin bindings for the architecture fields of `config` (a Hugging Face import) and, given
    `spiece` (model path, extra_ids), the vocabulary of the tasks gin registers."""
    activation = {"relu": "@jax.nn.relu", "gelu_new": "@jax.nn.gelu"}[
        hf.config_to_hf(config)["feed_forward_proj"].removeprefix("gated-")]
    lines = ["from __gin__ import dynamic_registration", "import jax",
             "from t5x_lite import models"]
    if spiece:
        lines += ["from t5x_lite.data import tasks", "from t5x_lite.data import vocab"]
    lines += ["", "models.T5Config:"]
    for field in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                  "num_encoder_layers", "num_decoder_layers", "gated_mlp", "tie_embeddings",
                  "dropout_rate", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "layer_norm_epsilon"):
        lines.append(f"  {field} = {getattr(config, field)!r}")
    lines.append(f"  activation = {activation}")
    if config.long_encoder:  # LongT5
        lines += [f"  encoder_attention = {config.encoder_attention.value!r}",
                  f"  local_radius = {config.local_radius!r}",
                  f"  global_block_size = {config.global_block_size!r}"]
    if spiece:
        # The README's way to name a SentencePiece model: every task registered from gin
        # (MIXTURE_OR_TASK_NAME = @tasks.register_task(), gin/objectives/) tokenizes with it.
        lines += ["", "# Its tokenizer's vocabulary.",
                  "tasks.register_task.vocabulary = @vocab.sentencepiece_vocabulary()",
                  f"vocab.sentencepiece_vocabulary.model_path = {spiece[0]!r}",
                  f"vocab.sentencepiece_vocabulary.extra_ids = {spiece[1]!r}"]
    return "\n".join(lines) + "\n"


def from_hf(args: argparse.Namespace) -> None:
    model_dir = os.path.abspath(args.model_dir)
    if os.path.isdir(checkpoints.checkpoint_dir(model_dir)):
        raise FileExistsError(f"{model_dir} already holds checkpoints: choose a new MODEL_DIR")
    model, params = hf.load_t5(args.hf_dir)
    tokenizer = hf.read_tokenizer(args.hf_dir)
    if tokenizer:  # checked before anything is written
        size = vocab.sentencepiece_vocabulary(model_path=tokenizer[0],
                                              extra_ids=tokenizer[1]).vocab_size
        if size > model.config.vocab_size:
            raise hf.HFFormatError(f"{tokenizer[0]} and its {tokenizer[1]} extra ids make {size} "
                                   f"ids, more than the model's vocab_size "
                                   f"{model.config.vocab_size}: tokenizer and model do not match")
    manager = checkpoints.create_manager(model_dir)
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    spiece, written = None, "its architecture"
    if tokenizer:
        spiece = (os.path.join(model_dir, hf.SPIECE_FILE), tokenizer[1])
        shutil.copyfile(tokenizer[0], spiece[0])
        written = f"its architecture and vocabulary ({spiece[0]}, {spiece[1]} sentinels)"
    with open(os.path.join(model_dir, MODEL_GIN), "w") as f:
        f.write(f"# The architecture of the Hugging Face T5 in {os.path.abspath(args.hf_dir)}\n"
                + gin_of(model.config, spiece))
    print(f"Wrote {models.count_parameters(params):,} parameters of {args.hf_dir} to "
          f"{model_dir}/checkpoints/0 and {written} to {model_dir}/{MODEL_GIN}.")


def main(argv: list[str] | None = None) -> None:
    parser = launch.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-hf", help="MODEL_DIR checkpoint -> Hugging Face directory")
    export.add_argument("--model_dir", required=True)
    export.add_argument("--out", required=True, help="a new directory for the HF files")
    export.add_argument("--gin_file", action="append", default=[],
                        help="model gin file(s); default MODEL_DIR/config.gin")
    export.set_defaults(run=to_hf)
    import_ = commands.add_parser("from-hf", help="Hugging Face directory -> MODEL_DIR")
    import_.add_argument("--hf_dir", required=True)
    import_.add_argument("--model_dir", required=True, help="a new MODEL_DIR")
    import_.set_defaults(run=from_hf)
    for sub in (export, import_):
        sub.error = parser.error
    parser.add_argument(launch.VERBOSE_FLAG, action="store_true", help=launch.VERBOSE_HELP)
    launch.quiet_library_logs()
    with launch.bad_input_exits(argv) as argv:
        args = parser.parse_args(argv)
        args.run(args)


if __name__ == "__main__":
    main()

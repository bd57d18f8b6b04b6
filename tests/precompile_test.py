"""t5x_lite.precompile compiles the exact train step for a TPU or GPU topology this machine
lacks (libtpu and the CUDA plugin, the aot extra) and reports what the run needs; runs that do
not fit, unknown topologies, missing compilers and meshes that do not match the topology end
in one line, exit 2."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from t5x_lite import launch
from t5x_lite import models

REPO = os.path.dirname(launch.GIN_DIR)
TINY = ["--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}"]
BFLOAT16 = ["--gin.models.T5Config.activation_dtype='bfloat16'"]


def precompile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5x_lite.precompile", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def report(*args: str) -> dict:
    result = precompile(*args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_parameter_shapes() -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """(shape, logical axes) of every t5_1_1_tiny parameter, from the model definition."""
    model = models.EncoderDecoderModel(models.T5Config(
        vocab_size=32128, d_model=128, num_heads=4, head_dim=32, d_ff=512,
        num_encoder_layers=2, num_decoder_layers=2))
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return [(leaf.shape, tuple(axes)) for leaf, axes in
            zip(jax.tree_util.tree_leaves(shapes),
                jax.tree_util.tree_leaves(model.logical_axes(),
                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))]


def test_tiny_on_v5e_uses_pallas_and_leaves_no_scatter():
    result = report(*TINY, "--gin.BATCH_SIZE=16", "--topology=v5e:2x2")
    assert (result["platform"], result["devices"], result["attention_kernel"]) == (
        "tpu", 4, "pallas_tpu")
    assert result["hazards"] == [] and result["eval_step_hazards"] == []
    assert result["collectives"].get("all-reduce", 0) >= 1  # the gradients' sum over rows
    per_device = result["per_device_bytes"]
    assert result["fits"] and per_device["total"] >= (per_device["parameters"]
                                                      + per_device["optimizer_state"])
    # Data parallel: every chip holds every parameter, float32.
    params = sum(math.prod(shape) for shape, _ in tiny_parameter_shapes())
    assert result["per_device_bytes"]["parameters"] == 4 * params
    for key in ("xla_flops", "xla_bytes_accessed", "roofline_step_seconds", "roofline_mfu",
                "model_flops_per_step"):
        assert result[key] > 0, key


def test_tiny_on_h100_calls_cudnn_attention_and_leaves_no_bfloat16_scatter():
    result = report(*TINY, *BFLOAT16, "--gin.BATCH_SIZE=16", "--topology=h100:8")
    assert (result["platform"], result["devices"], result["attention_kernel"]) == (
        "gpu", 8, "cudnn")
    # Forward and backward for the encoder's, the decoder's and the cross-attention of each
    # of the two layers.
    assert result["custom_calls"]["__cudnn$fmhaScaleBiasSoftmax"] == 6
    assert result["custom_calls"]["__cudnn$fmhaScaleBiasSoftmaxBackward"] == 6
    scatters = result["hazards"] + result["eval_step_hazards"]
    assert not [hazard for hazard in scatters if hazard["type"].startswith("bf16")], scatters
    params = sum(math.prod(shape) for shape, _ in tiny_parameter_shapes())
    assert result["per_device_bytes"]["parameters"] == 4 * params
    assert result["fits"] and result["usable_memory_bytes"] == int(
        0.75 * result["device_memory_bytes"])
    assert result["xla_flops"] is None and result["model_flops_per_step"] > 0


def test_decoder_only_base_on_h100_calls_cudnn_once_per_layer_and_pass():
    """The decoder-only family compiles for GPUs with the same kernels: a 128 + 32 token
    prefix-LM row through 12 layers, FSDP over 8 H100s."""
    result = report("--gin_file=gin/models/decoder_only_base.gin",
                    "--gin_file=gin/runs/pretrain.gin", "--gin_file=gin/partitioning/fsdp.gin",
                    "--gin.MIXTURE_OR_TASK_NAME='stdlib_prefix_lm'",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
                    *BFLOAT16, "--gin.BATCH_SIZE=16", "--topology=h100:8")
    assert (result["devices"], result["attention_kernel"], result["fits"]) == (8, "cudnn", True)
    assert result["custom_calls"]["__cudnn$fmhaScaleBiasSoftmax"] == 12
    assert result["custom_calls"]["__cudnn$fmhaScaleBiasSoftmaxBackward"] == 12
    scatters = result["hazards"] + result["eval_step_hazards"]
    assert not [hazard for hazard in scatters if hazard["type"].startswith("bf16")], scatters
    # Per row token: 12 layers of 8 D A + 6 D F + 4 R A, and the 2 D V output projection.
    d, a, f, row = 768, 768, 2048, 160
    per_token = 12 * (8 * d * a + 6 * d * f + 4 * row * a) + 2 * d * 32128
    assert result["model_flops_per_step"] == 3 * 16 * row * per_token


def test_a_scanned_step_reports_no_roofline_as_xla_counts_a_loop_once():
    result = report(*TINY, "--gin.models.T5Config.scan_layers=True", "--gin.BATCH_SIZE=16",
                    "--topology=v5e:2x2")
    assert result["fits"] and result["roofline_mfu"] is None
    assert "counts a loop's body once" in result["roofline_note"]


def test_four_hosts_of_eight_gpus_compile_as_one_program_over_32_devices():
    result = report(*TINY, *BFLOAT16, "--gin_file=gin/partitioning/fsdp.gin",
                    "--gin.BATCH_SIZE=64", "--topology=h100:4x8")
    assert (result["devices"], result["hosts"], result["mesh"]["fsdp"]) == (32, 4, 32)
    assert result["fits"] and result["collectives"].get("all-gather", 0) > 0
    # The bfloat16 weight gradients leave through reduce-scatters, which are no scatter.
    assert result["collectives"].get("reduce-scatter", 0) > 0
    assert [hazard["type"] for hazard in result["hazards"]] == ["f32[32128,4]"]


@pytest.mark.parametrize("topology", ["v5e:2x4", "h100:8"])
def test_fsdp_over_eight_chips_holds_an_eighth_of_each_embed_dimension(topology):
    """AdamW's two moments follow their parameters' shardings; fsdp.gin splits every "embed"
    dimension (128 wide here) over the 8 chips and leaves the others whole."""
    result = report(*TINY, "--gin_file=gin/partitioning/fsdp.gin", "--gin.BATCH_SIZE=16",
                    "--gin.t5x_lite.train.run.optimizer=@optimizers.adamw",
                    f"--topology={topology}")
    per_chip = sum(math.prod(shape) // (8 if "embed" in axes else 1)
                   for shape, axes in tiny_parameter_shapes())
    assert result["mesh"]["fsdp"] == 8
    assert result["per_device_bytes"]["parameters"] == 4 * per_chip
    # mu and nu, plus AdamW's step count.
    assert 0 <= result["per_device_bytes"]["optimizer_state"] - 2 * 4 * per_chip <= 64
    assert result["collectives"].get("all-gather", 0) > 0


@pytest.mark.parametrize("model_file, partitioning_file, topology", [
    ("switch_tiny", "expert", "v5e:2x4"), ("t5_1_1_tiny", "fsdp_tensor", "v5e:2x4"),
    ("switch_tiny", "expert", "h100:8"), ("t5_1_1_tiny", "fsdp_tensor", "h100:8")])
def test_partitioned_runs_compile_and_report_their_collectives(model_file, partitioning_file,
                                                               topology):
    result = report(f"--gin_file=gin/models/{model_file}.gin",
                    "--gin_file=gin/runs/pretrain.gin",
                    f"--gin_file=gin/partitioning/{partitioning_file}.gin",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
                    *BFLOAT16, "--gin.BATCH_SIZE=16", f"--topology={topology}")
    assert result["fits"] and sum(result["collectives"].values()) > 0
    if partitioning_file == "expert":
        assert result["collectives"].get("all-to-all", 0) > 0


@pytest.mark.parametrize("topology", ["v5e:2x2", "h100:1"])
def test_xxl_without_fsdp_does_not_fit_and_says_what_would(topology):
    """11.3B float32 parameters and as many gradients: 84 GiB per device before anything
    else, past a v5e's 16 GiB and an H100's 80 (60 usable); nothing is compiled."""
    result = precompile("--gin_file=gin/models/t5_1_1_xxl.gin",
                        "--gin_file=gin/runs/pretrain.gin", "--gin.BATCH_SIZE=4",
                        f"--topology={topology}")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: does not fit: parameters, gradients and optimizer state "
                           "alone take")
    assert "gin/partitioning/fsdp.gin" in line and "more than" in line


def test_a_step_the_tpu_compiler_refuses_is_one_line_naming_remat_first():
    """4,096 rows of 512/114 tokens: the step's temporaries exceed a v5e chip's memory, and
    libtpu refuses to compile it."""
    result = precompile("--gin_file=gin/models/t5_1_1_tiny.gin",
                        "--gin_file=gin/runs/pretrain.gin", "--gin.BATCH_SIZE=4096",
                        "--topology=v5e:2x2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: does not fit on v5e:2x2: "
                                                   "RESOURCE_EXHAUSTED"), lines
    assert lines[0].index("remat_policy") < lines[0].index("fsdp.gin")


@pytest.mark.parametrize("args, message", [
    (["--topology=h800:8"], "unknown topology 'h800:8': known chips are v4:2x2"),
    (["--topology=v5e"], "has no grid"),
    (["--topology=h100:2x2x2"], "has no grid: write it as h100:8"),
    (["--topology=v5e:2x2", "--gin.partitioning.MeshConfig.tensor=3"], "tensor"),
    (["--topology=h100:8", "--gin.partitioning.MeshConfig.tensor=3"], "tensor"),
    (["--topology=h100:8", "--gin.models.T5Config.attention='cudnn'"],
     "cudnn attention needs bfloat16 activations (activation_dtype float32); "
     "T5Config.attention='auto' falls back to XLA's attention"),
])
def test_bad_topologies_are_one_line(args, message):
    result = precompile(*TINY, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_gpu_topology_without_the_cuda_plugin_names_the_pip_command(monkeypatch):
    # Importing the entry point sets these two for its own process; keep the suite's.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    from t5x_lite import accelerators
    from t5x_lite import precompile as precompile_module

    monkeypatch.setattr(precompile_module.importlib.util, "find_spec",
                        lambda name: None if name.startswith("jax_plugins") else True)
    with pytest.raises(launch.UsageError, match=r"needs the CUDA plugin and cuDNN: pip "
                                                r"install -e '\.\[aot\]'"):
        precompile_module.topology_devices(accelerators.parse_topology("h100:8"))

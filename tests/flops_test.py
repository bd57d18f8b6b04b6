"""flops.py: the chips' peaks by device kind, and the MoE FLOPs in closed form against the
dense model's (the dense formula is checked against XLA's cost analysis in
tests/benchmark_test.py)."""
import dataclasses

import pytest

from t5x_lite import flops
from t5x_lite import models
from t5x_lite import moe


@pytest.mark.parametrize("device_kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12), ("TPU v4", 275e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_published_peaks_by_device_kind(device_kind, peak):
    assert flops.peak_bf16_flops(device_kind) == peak


def test_a_top_1_expert_layer_costs_a_dense_mlp_and_its_router():
    dense = models.T5Config(num_encoder_layers=4, num_decoder_layers=4)
    switch = dataclasses.replace(dense, moe=moe.MoeConfig(num_experts=8, num_selected=1,
                                                          sparse_every=2))
    batch, inputs, targets = 2, 64, 16
    sparse_layers = 2  # per stack: layers 1 and 3
    router = 3 * 2 * dense.d_model * 8  # forward and backward, per token
    extra = batch * (inputs + targets) * sparse_layers * router
    assert (flops.model_flops_per_step(switch, batch, inputs, targets)
            == flops.model_flops_per_step(dense, batch, inputs, targets) + extra)
    top_2 = dataclasses.replace(switch, moe=dataclasses.replace(switch.moe, num_selected=2))
    mlp = 3 * 2 * 3 * dense.d_model * dense.d_ff  # one more gated MLP per token and layer
    assert (flops.model_flops_per_step(top_2, batch, inputs, targets)
            == flops.model_flops_per_step(switch, batch, inputs, targets)
            + batch * (inputs + targets) * sparse_layers * mlp)

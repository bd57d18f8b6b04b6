"""flops.py: the chips' peaks by device kind, the MoE FLOPs in closed form against the dense
model's, and the encoder-only family's against the decoder-only one's (each family's formula is
checked against XLA's cost analysis in tests/benchmark_test.py)."""
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


def test_an_encoder_only_masked_lm_costs_a_decoder_only_model_of_its_rows():
    """The same layers (attention over the whole row, the MLP) and logits at every position:
    only the masks differ, which skip no work."""
    shared = dict(d_model=256, num_heads=4, head_dim=64, d_ff=1024, tie_embeddings=True)
    decoder_only = models.T5Config(architecture="decoder_only", num_encoder_layers=0,
                                   num_decoder_layers=6, **shared)
    encoder_only = models.T5Config(architecture="encoder_only", num_encoder_layers=6,
                                   num_decoder_layers=0, **shared)
    batch, length = 4, 128
    masked_lm = flops.model_flops_per_step(encoder_only, batch, length, 0)
    assert masked_lm == flops.model_flops_per_step(decoder_only, batch, length, 0)
    # A classifier's head sees one pooled row, not the vocabulary at every position: its
    # FLOPs do not depend on the vocabulary, and stay below the masked LM's.
    classifier = dataclasses.replace(encoder_only, num_classes=5)
    small_vocabulary = dataclasses.replace(classifier, vocab_size=128)
    assert (flops.model_flops_per_step(classifier, batch, length, 0)
            == flops.model_flops_per_step(small_vocabulary, batch, length, 0) < masked_lm)

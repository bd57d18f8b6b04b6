"""Model FLOPs of a train step and the chips' published peaks: MFU, as the training loop logs
it (model_tflops_per_device, mfu) and scripts/benchmark.py and t5x_lite.precompile report it.

The convention is MaxText's and PaLM's: matmul FLOPs only, 2 per multiply-add, the backward
pass twice the forward, rematerialised recomputation not counted.
"""
from t5x_lite import accelerators
from t5x_lite import models

# Published dense bf16 peaks in FLOP/s per device, by the start of jax's `device_kind` (the
# first match wins: more specific names first); TPUs from accelerators.CHIPS.
PEAK_BF16_FLOPS = (
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),  # SXM (the 80GB HBM3 parts)
    ("NVIDIA H200", 989e12),
    ("NVIDIA H20", 148e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    *((chip.device_kind, chip.peak_bf16_flops) for chip in accelerators.CHIPS.values()),
    ("TPU v3", 123e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """The published bf16 peak of one device of `device_kind` (jax.Device.device_kind), or
    None when it is not listed (CPUs among them)."""
    for prefix, flops in PEAK_BF16_FLOPS:
        if device_kind.startswith(prefix):
            return flops
    return None


def _mlp_forward_per_token(config: models.T5Config, d_ff: int) -> int:
    gated = 3 if config.gated_mlp else 2
    return 2 * gated * config.d_model * d_ff


def _mlp_forward(config: models.T5Config, layer_index: int) -> int:
    """Forward FLOPs per token of layer `layer_index`'s MLP: a sparse one counts its K
    chosen experts, its router and any extra dense MLP."""
    moe = config.moe
    if moe is None or not moe.is_sparse(layer_index):
        return _mlp_forward_per_token(config, config.d_ff)
    experts = moe.num_selected * _mlp_forward_per_token(config, moe.expert_d_ff or config.d_ff)
    extra = _mlp_forward_per_token(config, config.d_ff) if moe.extra_dense_mlp else 0
    return experts + 2 * config.d_model * moe.num_experts + extra


def encoder_attention_per_row(config: models.T5Config, inputs: int) -> int:
    """Forward FLOPs of one encoder layer's attention products (scores and weighted values)
    for a row of L = `inputs` tokens: 4 L^2 A for full attention. LongT5's queries, padded
    to whole blocks of C = local_radius + 1, each see 3C keys and, with transient-global
    attention, the G = L // global_block_size global tokens, whose keys and values cost
    4 G D A more."""
    a = config.num_heads * config.head_dim
    if not config.long_encoder:
        return 4 * inputs * inputs * a
    block = config.local_radius + 1
    padded = -(-inputs // block) * block
    globals_ = 0
    if config.transient_global:
        globals_ = inputs // config.global_block_size
    return 4 * padded * (3 * block + globals_) * a + 4 * globals_ * config.d_model * a


def model_flops_per_step(config: models.T5Config, batch: int, inputs: int,
                         targets: int) -> float:
    """Matmul FLOPs of one train step (forward + backward = 3 x forward) for `batch` rows of
    `inputs` encoder and `targets` decoder tokens. With D = d_model, A = num_heads * head_dim,
    L = inputs, T = targets, V = vocab_size and M a layer's MLP (2 G D F for a dense one, G = 3
    gated, 2 plain; an MoE layer's K chosen experts plus its router), the forward pass costs
      per encoder layer, per encoder token:   8 D A + M + 4 L A
      per decoder layer, per decoder token:   12 D A + M + 4 T A + 4 L A
                         per encoder token:   4 D A  (the cross-attention keys and values)
      output projection, per decoder token:   2 D V
    Attention counts the whole L x L and T x T products: packing and causal masks skip no
    work. A LongT5 encoder's 4 L A per token is encoder_attention_per_row / L instead. A
    decoder-only model's rows hold R = L + T tokens (L = 0 for a causal LM), each costing
    8 D A + M + 4 R A per layer and 2 D V for the output projection. An encoder-only model's
    rows hold L tokens (T = 0): the encoder's cost plus its head, 2 D V per token for a
    masked LM, 2 D C per row for a classifier of C = num_classes."""
    d, a = config.d_model, config.num_heads * config.head_dim
    if config.decoder_only:
        row = inputs + targets
        token = sum(8 * d * a + _mlp_forward(config, i) + 4 * row * a
                    for i in range(config.num_decoder_layers)) + 2 * d * config.vocab_size
        return 3.0 * batch * row * token
    encoder_token = sum(8 * d * a + _mlp_forward(config, i)
                        for i in range(config.num_encoder_layers))
    encoder_attention = config.num_encoder_layers * encoder_attention_per_row(config, inputs)
    if config.encoder_only:
        # The head: masked-LM logits at every position, or a classifier's C logits per row.
        head = (2 * d * config.num_classes if config.num_classes
                else inputs * 2 * d * config.vocab_size)
        return 3.0 * batch * (inputs * encoder_token + encoder_attention + head)
    decoder_token = sum(12 * d * a + _mlp_forward(config, i) + 4 * targets * a + 4 * inputs * a
                        for i in range(config.num_decoder_layers)) + 2 * d * config.vocab_size
    cross_keys_values = config.num_decoder_layers * 4 * d * a
    forward = batch * (inputs * (encoder_token + cross_keys_values) + encoder_attention
                       + targets * decoder_token)
    return 3.0 * forward

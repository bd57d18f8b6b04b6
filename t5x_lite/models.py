"""The T5 model families, encoder-decoder, decoder-only and encoder-only: their configuration
and the model objects that training, evaluation and decoding use (loss, logits, score_batch,
predict_batch) around the Flax networks of networks.py. Knows nothing of meshes or gin.

Batches are dicts of int32 arrays. Encoder-decoder: encoder_input_tokens / encoder_segment_ids
[B, L] and decoder_input_tokens / decoder_target_tokens / decoder_loss_weights /
decoder_segment_ids [B, T]. Decoder-only: the decoder_* keys alone, over inputs and targets
concatenated (T = L + targets for prefix-LM), plus decoder_causal_attention [B, T], 1 on the
positions that attend bidirectionally (the inputs; all 0 for a causal LM). Encoder-only, masked
LM: encoder_input_tokens / encoder_target_tokens / encoder_loss_weights / encoder_segment_ids
[B, L], the loss on the masked positions; classification (num_classes > 0): encoder_input_tokens
/ encoder_segment_ids [B, L] of one example per row, and classification_labels /
classification_weights [B, 1] (each row's label as a one-position target, so the loss and
metrics of every family apply unchanged). Segment id 0 marks padding; packed rows hold several
examples with ids 1, 2, ...
"""
import dataclasses
import enum
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import choices
from t5x_lite import decoding
from t5x_lite import kernels as kernels_lib
from t5x_lite import layers
from t5x_lite import moe as moe_lib
from t5x_lite import networks
from t5x_lite import ops

Params = Any
Batch = dict[str, jax.Array]


class Architecture(enum.Enum):
    """T5Config.architecture: which model family the layers form."""

    # An encoder over the inputs and a decoder that attends to it (T5).
    ENCODER_DECODER = "encoder_decoder"
    # One stack of self-attention layers over inputs and targets concatenated: a causal LM,
    # or a prefix-LM whose inputs attend bidirectionally (T5X's DecoderOnlyModel).
    DECODER_ONLY = "decoder_only"
    # T5's encoder alone (bidirectional self-attention), BERT-style: a masked-LM head over
    # every position, or with num_classes > 0 a pooled classification head.
    ENCODER_ONLY = "encoder_only"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 model. Defaults are T5 v1.1 small (an encoder-decoder); a
    decoder-only model binds architecture = 'decoder_only', num_encoder_layers = 0 and its
    stack's depth as num_decoder_layers (gin/models/decoder_only_*.gin); an encoder-only one
    architecture = 'encoder_only', num_decoder_layers = 0 and its depth as num_encoder_layers
    (gin/models/encoder_only_*.gin)."""

    architecture: Architecture = Architecture.ENCODER_DECODER
    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu
    gated_mlp: bool = True
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    activation_dtype: Any = jnp.float32  # float32 or bfloat16; parameters stay float32.
    z_loss: float = 1e-4
    # Memory: what each layer keeps for the backward pass (layers.RematPolicy), and whether
    # the stacks run as one nn.scan over parameters stacked on a leading "layers" axis
    # (compiles one layer instead of all of them; the parameter tree changes shape).
    remat_policy: layers.RematPolicy = layers.RematPolicy.NONE
    scan_layers: bool = False
    # The hot path's kernels (kernels.py), chosen for `kernel_platform` (None or "auto": the
    # backend this process runs on; precompile names its target's). `attention` overrides
    # the platform's choice: "einsum", "xla", "cudnn" or "pallas_tpu" (None or "auto": none).
    attention: kernels_lib.Attention | None = None
    kernel_platform: kernels_lib.Platform | None = None
    # Sparse Mixture-of-Experts MLPs in every moe.sparse_every-th layer; None: a dense model.
    moe: moe_lib.MoeConfig | None = None
    # Decoder-only: the inputs (decoder_causal_attention positions, a prompt when decoding)
    # attend to each other, as a prefix-LM trains; False makes every position causal, as a
    # causal LM trains (gin/objectives/causal_lm.gin; T5X's inputs_bidirectional_attention).
    bidirectional_inputs: bool = True
    # Encoder-only: 0 gives the masked-LM head (logits over the vocabulary at every position);
    # > 0 a classification head of that many classes over each row's pooled encoding.
    num_classes: int = 0
    # LongT5 (Guo et al. 2022; long_attention.py): the encoder's self-attention, 'full' (T5),
    # 'local' (each token sees its segment's tokens within local_radius, in blocks of
    # local_radius + 1 tokens: memory linear in the length) or 'transient_global' (that, and
    # one global token per global_block_size tokens of its segment). The decoder is T5's.
    encoder_attention: layers.EncoderAttention = layers.EncoderAttention.FULL
    local_radius: int = 127
    global_block_size: int = 16

    def __post_init__(self):
        choices.set_parsed(self, "architecture", Architecture, "T5Config.architecture")
        positive = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                    "relative_attention_num_buckets",
                    "relative_attention_max_distance")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        self._check_architecture()
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.z_loss < 0:
            raise ValueError(f"T5Config.z_loss must be >= 0, got {self.z_loss}")
        if jnp.dtype(self.activation_dtype) not in (jnp.dtype(jnp.float32),
                                                    jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"T5Config.activation_dtype must be float32 or bfloat16, got "
                             f"{self.activation_dtype}")
        choices.set_parsed(self, "remat_policy", layers.RematPolicy, "T5Config.remat_policy")
        self._check_encoder_attention()
        for name, choice_type in (("attention", kernels_lib.Attention),
                                  ("kernel_platform", kernels_lib.Platform)):
            choices.set_parsed(self, name, choice_type, f"T5Config.{name}", auto=True)
        forced = self.attention not in (None, kernels_lib.Attention.EINSUM)
        if forced and self.dropout_rate > 0:
            raise ValueError(f"T5Config.attention = {self.attention.value!r} has no dropout on "
                             "the attention weights: use 'einsum' with dropout_rate > 0")
        if self.moe is not None and self.scan_layers:
            raise ValueError("T5Config.scan_layers needs identical layers, but moe makes some "
                             "sparse: set T5Config.scan_layers = False for MoE models")

    def _check_encoder_attention(self) -> None:
        choices.set_parsed(self, "encoder_attention", layers.EncoderAttention,
                           "T5Config.encoder_attention")
        for name in ("local_radius", "global_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_only and self.long_encoder:
            raise ValueError(
                f"T5Config.encoder_attention = {self.encoder_attention.value!r} is LongT5's "
                "encoder attention, but a decoder_only model has no encoder (LongT5's decoder "
                "attends fully): bind encoder_attention = 'full', or use an encoder_decoder "
                "model (gin/models/longt5_*.gin)")

    def check_encoder_length(self, length: int) -> None:
        """ValueError unless LongT5's blocks fit encoder inputs of `length` tokens. The model
        itself takes any length (a short one is padded to a block, as Hugging Face's LongT5
        does, and has no global token when shorter than a global block); a run whose inputs
        are that short is misconfigured: its attention costs more than full attention, or its
        transient-global attention is local attention."""
        if not self.long_encoder:
            return
        if self.local_radius >= length:
            raise ValueError(
                f"T5Config.local_radius = {self.local_radius} does not fit encoder inputs of "
                f"{length} tokens (its blocks of local_radius + 1 tokens would be longer than "
                f"the inputs): bind local_radius < {length}, or encoder_attention = 'full'")
        if self.transient_global and self.global_block_size > length:
            raise ValueError(
                f"T5Config.global_block_size = {self.global_block_size} does not fit encoder "
                f"inputs of {length} tokens (no global token would exist): bind "
                f"global_block_size <= {length}")

    @property
    def long_encoder(self) -> bool:
        """Whether the encoder attends as LongT5's does (local or transient-global)."""
        return self.encoder_attention is not layers.EncoderAttention.FULL

    @property
    def transient_global(self) -> bool:
        """Whether the encoder's LongT5 attention also attends to global tokens."""
        return self.encoder_attention is layers.EncoderAttention.TRANSIENT_GLOBAL

    def _check_architecture(self) -> None:
        if self.decoder_only and self.num_encoder_layers:
            raise ValueError(
                f"T5Config.num_encoder_layers = {self.num_encoder_layers}, but a decoder_only "
                "model has no encoder: bind num_encoder_layers = 0 (its depth is "
                "num_decoder_layers), or architecture = 'encoder_decoder'")
        if not self.decoder_only and not self.bidirectional_inputs:
            raise ValueError("T5Config.bidirectional_inputs = False (a causal LM, "
                             "gin/objectives/causal_lm.gin) is for decoder_only models: use a "
                             "decoder-only preset (gin/models/decoder_only_*.gin)")
        if not self.decoder_only and self.num_encoder_layers < 1:
            raise ValueError(
                f"T5Config.num_encoder_layers must be >= 1 for an {self.architecture.value} "
                f"model, got {self.num_encoder_layers}: bind architecture = 'decoder_only' for "
                "a model without an encoder")
        if self.encoder_only and self.num_decoder_layers:
            raise ValueError(
                f"T5Config.num_decoder_layers = {self.num_decoder_layers}, but an encoder_only "
                "model has no decoder: bind num_decoder_layers = 0 (its depth is "
                "num_encoder_layers), or architecture = 'encoder_decoder'")
        if not self.encoder_only and self.num_decoder_layers < 1:
            raise ValueError(
                f"T5Config.num_decoder_layers must be >= 1 for an {self.architecture.value} "
                f"model, got {self.num_decoder_layers}: bind architecture = 'encoder_only' for "
                "a model without a decoder")
        if self.num_classes < 0 or (self.num_classes and not self.encoder_only):
            raise ValueError(
                f"T5Config.num_classes = {self.num_classes}: a classification head (> 0) is "
                "for encoder_only models (gin/models/encoder_only_*.gin); 0 keeps the "
                "model's language-model head")

    @property
    def decoder_only(self) -> bool:
        return self.architecture is Architecture.DECODER_ONLY

    @property
    def encoder_only(self) -> bool:
        return self.architecture is Architecture.ENCODER_ONLY

    def kernels(self) -> kernels_lib.Kernels:
        return kernels_lib.resolve(self.kernel_platform, self.attention, self.activation_dtype,
                                   self.head_dim, self.dropout_rate)

    def layer_config(self) -> layers.LayerConfig:
        return layers.LayerConfig(
            d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim,
            d_ff=self.d_ff, activation=self.activation, gated_mlp=self.gated_mlp,
            dropout_rate=self.dropout_rate, dtype=self.activation_dtype,
            layer_norm_epsilon=self.layer_norm_epsilon, kernels=self.kernels())


def segment_ids_of(tokens: jax.Array) -> jax.Array:
    """Segment ids for an unpacked batch: 1 on real tokens, 0 on padding."""
    return (tokens > 0).astype(jnp.int32)


def with_segment_ids(batch: Batch) -> Batch:
    """Fills in segment ids for callers that pass unpacked token arrays only."""
    batch = dict(batch)
    if "encoder_input_tokens" in batch:
        batch.setdefault("encoder_segment_ids", segment_ids_of(batch["encoder_input_tokens"]))
    if "decoder_segment_ids" not in batch and "decoder_input_tokens" in batch:
        if "decoder_target_tokens" in batch:
            batch["decoder_segment_ids"] = segment_ids_of(batch["decoder_target_tokens"])
        else:
            # Decoder inputs begin with the start token 0, so zeros cannot mark padding; as
            # the decoder is causal, trailing padding cannot affect earlier positions anyway.
            batch["decoder_segment_ids"] = jnp.ones_like(batch["decoder_input_tokens"])
    return batch


def cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                       z_loss: float, cross_entropy: Callable = ops.softmax_cross_entropy
                       ) -> dict[str, jax.Array]:
    """Summed (not averaged) loss terms over weighted target tokens, in float32.

    z_loss adds z_loss * log(Z)^2 per token (Chowdhery et al. 2022) to keep logits from
    drifting; it is part of `loss` and reported alone as `z_loss`. `cross_entropy` is the
    backend's (kernels.Kernels.cross_entropy).
    """
    cross_entropy_BT, log_normalizer_BT, correct_BT = cross_entropy(logits_BTV, targets_BT)
    z_loss_BT = z_loss * jnp.square(log_normalizer_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return {
        "loss": jnp.sum((cross_entropy_BT + z_loss_BT) * weights_BT),
        "z_loss": jnp.sum(z_loss_BT * weights_BT),
        "correct": jnp.sum(correct_BT * weights_BT),
        "weight": jnp.sum(weights_BT),
    }


@dataclasses.dataclass(frozen=True)
class Model:
    """What the families share: pure functions of (params, batch) around the Flax module
    (init, logits, loss, score_batch, predict_batch). Each family adds its `module` and
    `cached_decoder` (the encoder-only family, which generates nothing, its own
    predict_batch) and names its targets' keys; model_for picks the family."""

    config: T5Config
    # The predict_batch key of the inputs [B, L] (EOS-terminated, zero-padded).
    inputs_key: ClassVar[str] = "encoder_input_tokens"
    # The batch keys of the targets the loss and score_batch count, and of their weights.
    targets_key: ClassVar[str] = "decoder_target_tokens"
    weights_key: ClassVar[str] = "decoder_loss_weights"

    def targets_and_weights(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """The batch's targets and loss weights in this family's keys; a batch of another
        family's layout is a one-line error."""
        missing = [key for key in (self.targets_key, self.weights_key) if key not in batch]
        if missing:
            raise ValueError(f"{type(self).__name__} reads its targets from "
                             f"{self.targets_key} and {self.weights_key}, but the batch has "
                             f"{', '.join(sorted(batch))}: build it for this model family")
        return batch[self.targets_key], batch[self.weights_key]

    def _init_batch(self) -> Batch:
        # Two tokens: a length every attention kernel takes (cuDNN's backward needs even).
        tokens = jnp.ones((1, 2), jnp.int32)
        return {"encoder_input_tokens": tokens, "encoder_segment_ids": tokens,
                "decoder_input_tokens": tokens, "decoder_segment_ids": tokens}

    def _boxed_init(self, rng: jax.Array) -> Params:
        """Parameters wrapped in Flax's logical-axis boxes; shapes do not depend on lengths."""
        return self.module.init(rng, self._init_batch())["params"]

    def init(self, rng: jax.Array) -> Params:
        return nn.unbox(self._boxed_init(rng))

    def logical_axes(self) -> Params:
        """A PartitionSpec of logical axis names for every parameter, computed abstractly."""
        boxed = jax.eval_shape(self._boxed_init, jax.random.key(0))
        return nn.get_partition_spec(boxed)

    def logits_and_moe_metrics(self, params: Params, batch: Batch,
                               dropout_rng: jax.Array | None = None
                               ) -> tuple[jax.Array, dict[str, dict[str, jax.Array]]]:
        """Float32 logits [B, T, V] and each sparse layer's routing metrics and losses
        ({} for a dense model); dropout is applied only when dropout_rng is given."""
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        logits_BTV, state = self.module.apply(
            {"params": params}, with_segment_ids(batch), deterministic=dropout_rng is None,
            rngs=rngs, mutable=["intermediates"])
        return logits_BTV, moe_lib.layer_metrics(state.get("intermediates", {}))

    def logits(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
               ) -> jax.Array:
        return self.logits_and_moe_metrics(params, batch, dropout_rng)[0]

    def loss_sums(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
                  ) -> dict[str, jax.Array]:
        """Summed loss terms (see cross_entropy_sums); an MoE model's auxiliary losses and
        routing metrics are added as per-batch values times the target weight, so that
        dividing by the weight, as for every other sum, gives them back."""
        targets_BT, weights_BT = self.targets_and_weights(batch)
        logits_BTV, layer_metrics = self.logits_and_moe_metrics(params, batch, dropout_rng)
        sums = cross_entropy_sums(logits_BTV, targets_BT, weights_BT, self.config.z_loss,
                                  self.config.kernels().cross_entropy)
        if layer_metrics:
            moe_sums = moe_lib.metric_sums(layer_metrics, self.config.moe, sums["weight"])
            sums["loss"] = sums["loss"] + moe_sums.pop("moe_loss")
            sums.update(moe_sums)
        return sums

    def loss(self, params: Params, batch: Batch, dropout_rng: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean loss per target token (the sums divided by the number of target tokens)."""
        sums = self.loss_sums(params, batch, dropout_rng)
        return sums["loss"] / jnp.maximum(sums["weight"], 1.0), sums

    def score_batch(self, params: Params, batch: Batch) -> jax.Array:
        """Float32 [B]: each row's summed log-probability (natural log) of its target tokens
        under teacher forcing, counting the positions its weights (weights_key) mark (a packed
        row sums over its examples). A masked LM: the masked positions' original tokens given
        the masked row; a classifier: the label's log-probability."""
        targets_BT, weights_BT = self.targets_and_weights(batch)
        log_probs_BTV = jax.nn.log_softmax(self.logits(params, batch))
        token_BT = jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return jnp.sum(token_BT * weights_BT.astype(jnp.float32), axis=1)

    def predict_batch(self, params: Params, batch: Batch, max_decode_length: int = 64,
                      method: decoding.Method | str = decoding.Method.GREEDY, eos_id: int = 1,
                      **options
                      ) -> tuple[jax.Array, jax.Array]:
        """Decodes targets for the batch's inputs (batch[inputs_key], [B, L]): the inputs
        run once, then one position at a time over a key/value cache.

        `method` is a decoding.Method or its name ("greedy", "beam", "sample"); `options` are
        decoding.DecodeOptions fields (beam_size, alpha, temperature, top_k, top_p, seed).
        Returns tokens int32 [B, max_decode_length] (no start token; 0 after EOS) and scores
        float32 [B]: the summed log-probability of each sequence up to and including EOS
        (for beam search, divided by the length penalty).
        """
        method = decoding.parse_method(method)
        try:
            settings = decoding.DecodeOptions(**options)
        except TypeError:
            raise ValueError(f"unknown decoding option in {sorted(options)}: options are "
                             f"{', '.join(decoding.DecodeOptions.__dataclass_fields__)}"
                             ) from None
        copies = settings.beam_size if method is decoding.Method.BEAM else 1
        step_fn, cache = self.cached_decoder(params, batch, max_decode_length, copies)
        batch_size = batch[self.inputs_key].shape[0]
        # Scanned layers stack their caches on a leading layers axis.
        return decoding.decode(method, step_fn, cache, batch_size, max_decode_length, eos_id,
                               settings, cache_batch_axis=1 if self.config.scan_layers else 0)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(Model):
    """A T5 encoder-decoder."""

    @property
    def module(self) -> networks.Transformer:
        return networks.Transformer(self.config)

    def encode(self, params: Params, batch: Batch) -> jax.Array:
        batch = with_segment_ids(batch)
        return self.module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["encoder_segment_ids"],
                                 method=networks.Transformer.encode)

    def cached_decoder(self, params: Params, batch: Batch, max_decode_length: int,
                       copies: int = 1) -> tuple[decoding.StepFn, Any]:
        """(step_fn, initial cache) for decoding the batch's encoder inputs: the encoder and
        the decoder's projections of its output run here, once; step_fn(tokens [R, 1],
        position, cache) -> (logits [R, V], cache) runs the decoder on one position, where
        R = B * copies (each row repeated `copies` times in a row, for beam search)."""
        batch = with_segment_ids(batch)
        encoded_RLD = jnp.repeat(self.encode(params, batch), copies, axis=0)
        segment_ids = jnp.repeat(batch["encoder_segment_ids"], copies, axis=0)
        module = networks.Transformer(self.config, decode_cache_length=max_decode_length)

        def run_decoder(tokens, cache=None, position=None):
            variables = {"params": params} if cache is None else {"params": params,
                                                                   "cache": cache}
            return module.apply(variables, encoded_RLD, segment_ids, tokens,
                                jnp.ones_like(tokens), decode_position=position,
                                method=networks.Transformer.decode, mutable=["cache"])

        # A call on one position creates the cache; its logits are not used.
        cache = run_decoder(jnp.zeros((encoded_RLD.shape[0], 1), jnp.int32))[1]["cache"]

        def step_fn(tokens_R1, position, cache):
            logits_R1V, state = run_decoder(tokens_R1, cache, position)
            return logits_R1V[:, 0], state["cache"]

        return step_fn, cache


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(Model):
    """A decoder-only T5: a causal LM, or a prefix-LM over inputs and targets concatenated
    (decoder_causal_attention marks the inputs)."""

    inputs_key: ClassVar[str] = "decoder_prompt_tokens"

    @property
    def module(self) -> networks.DecoderOnlyTransformer:
        return networks.DecoderOnlyTransformer(self.config)

    def _init_batch(self) -> Batch:
        tokens = jnp.ones((1, 2), jnp.int32)
        return {"decoder_input_tokens": tokens, "decoder_segment_ids": tokens,
                "decoder_causal_attention": tokens}

    def cached_decoder(self, params: Params, batch: Batch, max_decode_length: int,
                       copies: int = 1) -> tuple[decoding.StepFn, Any]:
        """(step_fn, initial cache) for continuing the prompts batch[inputs_key] [B, L] (the
        inputs, EOS-terminated, zero-padded), as the prefix-LM converter lays out training
        rows: a start token, then the inputs, attending bidirectionally. Each prompt is
        right-aligned to P = L + 1 positions, the padding before it masked, so every row's
        first target is at P (relative position biases see only distances, so the shift
        changes nothing); the prompts run in one pass, here. step_fn at position 0 returns
        the last prompt position's logits; position p > 0 writes its token at P + p - 1."""
        prompt_RP, valid_RP = right_aligned_prompts(batch[self.inputs_key])
        prompt_RP, valid_RP = (jnp.repeat(prompt_RP, copies, axis=0),
                               jnp.repeat(valid_RP, copies, axis=0))
        rows, prompt_length = prompt_RP.shape
        module = networks.DecoderOnlyTransformer(self.config,
                                        decode_cache_length=prompt_length + max_decode_length)
        keys_valid_RS = jnp.concatenate(
            [valid_RP, jnp.ones((rows, max_decode_length), bool)], axis=1)

        def run(tokens, cache, offset):
            return module.apply({"params": params, "cache": cache}, tokens, offset,
                                keys_valid_RS, prompt_length,
                                method=networks.DecoderOnlyTransformer.cached_positions,
                                mutable=["cache"])

        ones = jnp.ones((rows, 1), jnp.int32)
        empty = module.apply({"params": params}, {
            "decoder_input_tokens": ones, "decoder_segment_ids": ones}, mutable=["cache"])[1]
        logits_RPV, state = run(prompt_RP, empty["cache"], 0)
        # Named prompt_*: the same for every beam of a row (decoding.gather_cache).
        cache = {"layers": state["cache"], "prompt_last_logits": logits_RPV[:, -1]}

        def step_fn(tokens_R1, position, cache):
            def next_position(cache):
                logits_R1V, state = run(tokens_R1, cache["layers"],
                                        prompt_length + position - 1)
                return logits_R1V[:, 0], {**cache, "layers": state["cache"]}

            return jax.lax.cond(position == 0, lambda cache: (cache["prompt_last_logits"],
                                                              cache), next_position, cache)

        return step_fn, cache


@dataclasses.dataclass(frozen=True)
class EncoderOnlyModel(Model):
    """An encoder-only T5 trained as a masked LM (BERT's objective,
    gin/objectives/bert_mlm.gin): logits [B, L, V] at every position, the loss on the
    masked ones (encoder_loss_weights). It generates nothing."""

    targets_key: ClassVar[str] = "encoder_target_tokens"
    weights_key: ClassVar[str] = "encoder_loss_weights"

    @property
    def module(self) -> networks.EncoderOnlyTransformer:
        return networks.EncoderOnlyTransformer(self.config)

    def _init_batch(self) -> Batch:
        tokens = jnp.ones((1, 2), jnp.int32)
        return {"encoder_input_tokens": tokens, "encoder_segment_ids": tokens}

    def predict_batch(self, params: Params, batch: Batch, max_decode_length: int = 64,
                      method: decoding.Method | str = decoding.Method.GREEDY,
                      eos_id: int | None = 1, **options) -> tuple[jax.Array, jax.Array]:
        raise ValueError("an encoder_only masked LM does not generate text: evaluate it by "
                         "its validation loss and accuracy (t5x_lite.eval), fine-tune it for "
                         "classification (models.T5Config.num_classes), or use an "
                         "encoder_decoder or decoder_only model to generate")


@dataclasses.dataclass(frozen=True)
class EncoderClassifierModel(EncoderOnlyModel):
    """An encoder-only T5 with a classification head (T5Config.num_classes > 0): class
    logits [B, 1, C] per row, the loss the mean cross-entropy over the rows
    (classification_weights: 1 on real rows, 0 on padding rows)."""

    targets_key: ClassVar[str] = "classification_labels"
    weights_key: ClassVar[str] = "classification_weights"

    def predict_batch(self, params: Params, batch: Batch, max_decode_length: int = 1,
                      method: decoding.Method | str = decoding.Method.GREEDY,
                      eos_id: int | None = None, **options) -> tuple[jax.Array, jax.Array]:
        """Each row's most likely class as tokens int32 [B, 1], and its log-probability
        float32 [B] (what evaluation's accuracy reads). A class is picked, not decoded:
        `max_decode_length` and `eos_id` play no part, and only greedy picking exists."""
        if decoding.parse_method(method) is not decoding.Method.GREEDY or options:
            raise ValueError("a classifier predicts each row's most likely class: decode with "
                             "method 'greedy' and no options (DECODE_METHOD = 'greedy')")
        log_probs_BC = jax.nn.log_softmax(self.logits(params, batch)[:, 0])
        return (jnp.argmax(log_probs_BC, axis=-1)[:, None].astype(jnp.int32),
                jnp.max(log_probs_BC, axis=-1))


def right_aligned_prompts(inputs_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Prompts [B, L + 1]: a start token 0 and each row's inputs (its non-zero tokens, which
    come first), moved to end at the last position; and a bool [B, L + 1], True from the
    start token on."""
    batch, length = inputs_BL.shape
    shift_B1 = length - jnp.sum(inputs_BL > 0, axis=1, keepdims=True)
    with_start_BP = jnp.concatenate([jnp.zeros((batch, 1), inputs_BL.dtype), inputs_BL], 1)
    source_BP = jnp.arange(length + 1)[None, :] - shift_B1
    valid_BP = source_BP >= 0
    prompt_BP = jnp.take_along_axis(with_start_BP, jnp.maximum(source_BP, 0), axis=1)
    return jnp.where(valid_BP, prompt_BP, 0), valid_BP


def model_for(config: T5Config) -> Model:
    """The model object of config's family."""
    if config.encoder_only:
        return (EncoderClassifierModel if config.num_classes else EncoderOnlyModel)(config)
    family = DecoderOnlyModel if config.decoder_only else EncoderDecoderModel
    return family(config)


def count_parameters(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

"""Hugging Face T5 import and export: a `transformers` T5 / T5 v1.1 / mT5 / LongT5 checkpoint
directory (config.json + safetensors) to a t5x_lite model and parameters, and back.

Only safetensors are read or written: a directory holding only pytorch_model.bin (a pickle)
is refused. Torch Linear weights are [out, in]; t5x_lite kernels are [in, out] with the
attention projections split into heads ([D, H, K] in, [H, K, D] out). A SentencePiece
vocabulary travels as spiece.model plus the files of a transformers tokenizer that encodes
like it (`tokenizer_files`).
"""
import base64
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util
from sentencepiece import sentencepiece_model_pb2

from t5x_lite import layers
from t5x_lite import models

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SPIECE_FILE = "spiece.model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SUPPORTED_MODEL_TYPES = ("t5", "mt5", "longt5")
# LongT5's encoder_attention_type <-> T5Config.encoder_attention.
LONGT5_ATTENTION = {"local": layers.EncoderAttention.LOCAL,
                    "transient-global": layers.EncoderAttention.TRANSIENT_GLOBAL}
# The name of an encoder layer's self-attention module, by its kind.
_ENCODER_ATTENTION_MODULES = {layers.EncoderAttention.FULL: "SelfAttention",
                              layers.EncoderAttention.LOCAL: "LocalSelfAttention",
                              layers.EncoderAttention.TRANSIENT_GLOBAL:
                                  "TransientGlobalSelfAttention"}

# HF dense_act_fn name <-> the activation t5x_lite applies. HF's "gated-gelu" means gated
# "gelu_new", the tanh approximation, which is jax.nn.gelu's default.
ACTIVATIONS = {"relu": jax.nn.relu, "gelu_new": jax.nn.gelu}
_HF_ACTIVATION_NAMES = {id(fn): name for name, fn in ACTIVATIONS.items()}


class HFFormatError(ValueError):
    """The directory is not a T5 checkpoint t5x_lite can read."""


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face directory {hf_dir!r} does not exist: pass a "
                                f"directory written by save_pretrained")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir!r} has no {CONFIG_FILE}: pass a directory written "
                                f"by transformers' save_pretrained")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise HFFormatError(f"{path} is not valid JSON ({error})") from None


def _activation(hf_config: dict) -> tuple[Any, bool]:
    """(activation, gated) from HF's feed_forward_proj ("relu", "gated-gelu", ...)."""
    projection = hf_config.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    name = projection.removeprefix("gated-")
    if projection == "gated-gelu":
        name = "gelu_new"
    if name not in ACTIVATIONS:
        raise HFFormatError(f"feed_forward_proj {projection!r} is not supported: t5x_lite reads "
                            f"relu, gated-relu, gelu_new, gated-gelu and gated-gelu_new")
    return ACTIVATIONS[name], gated


def _tied_head(hf_config: dict, tensor_names: set[str]) -> bool:
    """Whether the output projection is the embedding scaled by d_model**-0.5 (T5 v1.0).

    Hub v1.1 and mT5 configs say tie_word_embeddings=false and carry lm_head.weight.
    transformers 5 always ties, writes tie_word_embeddings=true, and records in
    scale_decoder_outputs whether it scales; unscaled, its head is the embedding itself,
    which t5x_lite holds as an untied head initialised to the embedding.
    """
    scaled = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    if scaled and "lm_head.weight" in tensor_names and not hf_config.get(
            "tie_word_embeddings", True):
        raise HFFormatError("the checkpoint scales decoder outputs by d_model**-0.5 but has its "
                            "own lm_head: t5x_lite has no such model")
    return bool(scaled)


def config_from_hf(hf_config: dict, tensor_names: set[str] = frozenset(),
                   **overrides) -> models.T5Config:
    """The t5x_lite T5Config of a transformers T5 config.json (dict) whose safetensors hold
    `tensor_names`."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"model_type {model_type!r} is not supported: t5x_lite reads "
                            f"{' and '.join(SUPPORTED_MODEL_TYPES)} encoder-decoders")
    activation, gated = _activation(hf_config)
    num_layers = hf_config.get("num_layers", 6)
    fields = dict(
        vocab_size=hf_config.get("vocab_size", 32128), d_model=hf_config.get("d_model", 512),
        num_heads=hf_config.get("num_heads", 8), head_dim=hf_config.get("d_kv", 64),
        d_ff=hf_config.get("d_ff", 2048), num_encoder_layers=num_layers,
        num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
        activation=activation, gated_mlp=gated,
        tie_embeddings=_tied_head(hf_config, set(tensor_names)),
        dropout_rate=hf_config.get("dropout_rate", 0.1),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6))
    if model_type == "longt5":
        fields.update(_longt5_fields(hf_config))
    fields.update(overrides)
    return models.T5Config(**fields)


def _longt5_fields(hf_config: dict) -> dict:
    """The T5Config fields of a LongT5 config.json's encoder attention."""
    kind = hf_config.get("encoder_attention_type", "local")
    if kind not in LONGT5_ATTENTION:
        raise HFFormatError(f"encoder_attention_type {kind!r} is not LongT5's: t5x_lite reads "
                            f"{' and '.join(LONGT5_ATTENTION)}")
    return {"encoder_attention": LONGT5_ATTENTION[kind],
            "local_radius": hf_config.get("local_radius", 127),
            "global_block_size": hf_config.get("global_block_size", 16)}


def activation_name(activation) -> str | None:
    """HF's dense_act_fn name of a t5x_lite activation, or None where HF has none."""
    # Gin's dynamic registration wraps the functions a config names (@jax.nn.gelu) and
    # jax.nn.relu is itself a wrapper (custom_jvp): try the object, then what it wraps.
    for candidate in (activation, getattr(activation, "__wrapped__", None)):
        if id(candidate) in _HF_ACTIVATION_NAMES:
            return _HF_ACTIVATION_NAMES[id(candidate)]
    return None


def config_to_hf(config: models.T5Config) -> dict:
    """A transformers T5 config.json (dict) for a t5x_lite T5Config; LongT5's for a model
    whose encoder attends as LongT5's does."""
    if config.architecture is not models.Architecture.ENCODER_DECODER:
        raise HFFormatError(f"transformers' T5 is an encoder-decoder: a "
                            f"{config.architecture.value} model has no T5 checkpoint to export "
                            "to (its parameters stay in MODEL_DIR)")
    if config.moe is not None:
        raise HFFormatError("transformers' T5 has no Mixture-of-Experts layers: only dense "
                            "models can be exported")
    name = activation_name(config.activation)
    if name is None:
        raise HFFormatError(f"activation {config.activation} has no transformers T5 "
                            f"equivalent: use jax.nn.relu or jax.nn.gelu")
    projection = ("gated-" if config.gated_mlp else "") + name
    longt5 = {}
    if config.long_encoder:
        kind = {value: key for key, value in LONGT5_ATTENTION.items()}[config.encoder_attention]
        longt5 = {"architectures": ["LongT5ForConditionalGeneration"], "model_type": "longt5",
                  "encoder_attention_type": kind, "local_radius": config.local_radius,
                  "global_block_size": config.global_block_size}
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.head_dim,
        "d_ff": config.d_ff, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": projection, "tie_word_embeddings": config.tie_embeddings,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, **longt5,
    }


# (HF name inside one attention block, t5x_lite name) for the four projections.
_PROJECTIONS = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))


def _layer_names(config: models.T5Config, stack: str, index: int) -> dict[str, tuple]:
    """HF tensor name -> t5x_lite parameter path for one encoder or decoder layer."""
    prefix, ours = f"{stack}.block.{index}.layer", f"{stack}_layer_{index}"
    names = {}
    if stack == "encoder":
        module = _ENCODER_ATTENTION_MODULES[config.encoder_attention]
        attentions = ((f"0.{module}", "attention", "0", "pre_attention_norm"),)
        mlp_index = 1
        if config.transient_global:
            names[f"{prefix}.0.{module}.global_input_layer_norm.weight"] = (
                ours, "attention", "global_input_norm", "scale")
    else:
        attentions = (("0.SelfAttention", "self_attention", "0", "pre_self_attention_norm"),
                      ("1.EncDecAttention", "encoder_decoder_attention", "1",
                       "pre_cross_attention_norm"))
        mlp_index = 2
    for hf_block, our_block, norm_index, our_norm in attentions:
        for hf_proj, our_proj in _PROJECTIONS:
            names[f"{prefix}.{hf_block}.{hf_proj}.weight"] = (ours, our_block, our_proj,
                                                              "kernel")
        names[f"{prefix}.{norm_index}.layer_norm.weight"] = (ours, our_norm, "scale")
    mlp_inputs = ("wi_0", "wi_1") if config.gated_mlp else ("wi",)
    for name in mlp_inputs + ("wo",):
        names[f"{prefix}.{mlp_index}.DenseReluDense.{name}.weight"] = (ours, "mlp", name,
                                                                       "kernel")
    names[f"{prefix}.{mlp_index}.layer_norm.weight"] = (ours, "pre_mlp_norm", "scale")
    return names


def parameter_names(config: models.T5Config) -> dict[str, tuple]:
    """Every HF tensor name of a T5 checkpoint -> the t5x_lite parameter path it fills."""
    names = {"shared.weight": ("token_embedder", "embedding"),
             "encoder.final_layer_norm.weight": ("encoder_norm", "scale"),
             "decoder.final_layer_norm.weight": ("decoder_norm", "scale")}
    encoder_attention = ("encoder.block.0.layer.0."
                         + _ENCODER_ATTENTION_MODULES[config.encoder_attention])
    names[f"{encoder_attention}.relative_attention_bias.weight"] = ("encoder_relative_bias",
                                                                    "rel_embedding")
    names["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        "decoder_relative_bias", "rel_embedding")
    if config.transient_global:
        names[f"{encoder_attention}.global_relative_attention_bias.weight"] = (
            "encoder_global_relative_bias", "rel_embedding")
    for index in range(config.num_encoder_layers):
        names.update(_layer_names(config, "encoder", index))
    for index in range(config.num_decoder_layers):
        names.update(_layer_names(config, "decoder", index))
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("logits_dense", "kernel")
    return names


def _to_ours(path: tuple, weight: np.ndarray, config: models.T5Config) -> np.ndarray:
    """A torch-layout tensor in t5x_lite's layout."""
    heads = (config.num_heads, config.head_dim)
    if path[-1] != "kernel":
        return weight  # embeddings [V, D], norm scales [D], bias tables [R, H]
    if path[-2] in ("query", "key", "value"):
        return weight.T.reshape(config.d_model, *heads)
    if path[-2] == "out":
        return weight.T.reshape(*heads, config.d_model)
    return weight.T


def _hf_shape(path: tuple, shape: tuple, config: models.T5Config) -> tuple:
    """The torch-layout shape of a t5x_lite parameter of `shape`."""
    inner = config.num_heads * config.head_dim
    if path[-1] != "kernel":
        return tuple(shape)
    if path[-2] in ("query", "key", "value"):
        return (inner, config.d_model)
    if path[-2] == "out":
        return (config.d_model, inner)
    return tuple(reversed(shape))


def _to_hf(path: tuple, kernel: np.ndarray, config: models.T5Config) -> np.ndarray:
    """The inverse of _to_ours."""
    inner = config.num_heads * config.head_dim
    if path[-1] != "kernel":
        return kernel
    if path[-2] in ("query", "key", "value"):
        return kernel.reshape(config.d_model, inner).T
    if path[-2] == "out":
        return kernel.reshape(inner, config.d_model).T
    return kernel.T


def _weight_files(hf_dir: str) -> list[str]:
    index_path = os.path.join(hf_dir, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(hf_dir, shard) for shard in shards]
    path = os.path.join(hf_dir, WEIGHTS_FILE)
    if os.path.isfile(path):
        return [path]
    if any(os.path.isfile(os.path.join(hf_dir, name))
           for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")):
        raise HFFormatError(f"{hf_dir!r} holds no {WEIGHTS_FILE}, only pickled or framework "
                            f"weights, which t5x_lite never loads: re-save it with "
                            f"save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{hf_dir!r} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}: pass "
                            f"a directory written by transformers' save_pretrained")


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the directory's safetensors files as float32 NumPy arrays (bf16 and
    fp16 checkpoints are upcast)."""
    tensors = {}
    for path in _weight_files(hf_dir):
        try:
            with safetensors.safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
        except (safetensors.SafetensorError, OSError) as error:
            raise HFFormatError(f"cannot read {path} as safetensors ({error}): the file is "
                                f"corrupt or truncated; download or save it again") from None
    return tensors


def params_from_tensors(tensors: dict[str, np.ndarray], config: models.T5Config) -> dict:
    """t5x_lite parameters from HF tensors; checks that every parameter is present with the
    shape the config implies."""
    names = parameter_names(config)
    missing = [name for name in names if tensors.get(name) is None]
    if missing:
        raise HFFormatError(f"the checkpoint lacks {len(missing)} tensor(s) its config.json "
                            f"implies (first: {missing[0]}): config and weights do not match")
    expected = traverse_util.flatten_dict(
        jax.eval_shape(models.EncoderDecoderModel(config).init, jax.random.key(0)))
    flat = {}
    for name, path in names.items():
        hf_shape = _hf_shape(path, expected[path].shape, config)
        if tensors[name].shape != hf_shape:
            raise HFFormatError(f"{name} has shape {tensors[name].shape}, but config.json "
                                f"implies {hf_shape}: config and weights do not match")
        flat[path] = _to_ours(path, tensors[name], config)
    return traverse_util.unflatten_dict(flat)


def load_t5(hf_dir: str, **config_overrides) -> tuple[models.EncoderDecoderModel, dict]:
    """(model, params) of a transformers T5 / T5 v1.1 / mT5 / LongT5 directory.
    `config_overrides` replace T5Config fields that do not change parameter shapes
    (dropout_rate, activation_dtype, remat_policy, z_loss)."""
    hf_config = read_config(hf_dir)
    config_from_hf(hf_config)  # an unsupported architecture is reported before any reading
    tensors = read_tensors(hf_dir)
    config = config_from_hf(hf_config, tensors.keys(), **config_overrides)
    if not config.tie_embeddings:
        tensors.setdefault("lm_head.weight", tensors.get("shared.weight"))
    params = params_from_tensors(tensors, config)
    return models.EncoderDecoderModel(config), params


def tensors_from_params(params: dict, config: models.T5Config) -> dict[str, np.ndarray]:
    """HF tensors (torch layout, float32) from t5x_lite parameters."""
    if config.scan_layers:
        raise HFFormatError("scanned parameters (T5Config.scan_layers) are stacked per layer: "
                            "export from a model built with scan_layers = False")
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {name: np.ascontiguousarray(_to_hf(path, np.asarray(flat[path], np.float32), config))
            for name, path in parameter_names(config).items()}


# --- the tokenizer ---------------------------------------------------------------------------
#
# Why transformers' T5Tokenizer on our spiece.model gives other ids: it takes only the pieces
# and scores and builds T5's own pipeline, ignoring the model's normalizer spec. Its
# WhitespaceSplit pre-tokenizer deletes every space, tab and run of indentation, its Metaspace
# (prepend_scheme "always", T5's add_dummy_prefix) puts "▁" before every word where our
# models (add_dummy_prefix=False) have none: "def" becomes "▁" + "def". Its Unigram has no byte
# fallback (an unseen character is <unk>, not UTF-8 bytes), and its "<extra_id_N>" tokens
# match anywhere, where seqio's sentinels are the pieces "▁<extra_id_N>" (after a space).
# tokenizer.json below follows the model's own spec, and the generic fast tokenizer runs it.
#
# SentencePiece never matches control, unknown, unused or byte pieces against text; the
# tokenizers Unigram matches every piece, so those get a score no segmentation prefers ("</s>"
# or "<0x41>" in a text are characters, as in SentencePiece; with split_special_tokens the
# special tokens are not cut out of the text first either).
_UNMATCHED_SCORE = -1e4
_MATCHED_PIECE_TYPES = (sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL,
                        sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def _tokenizer_json(proto, special: dict[str, str]) -> dict:
    """A tokenizers.Tokenizer (as JSON) that segments like SentencePiece with `proto`: the
    same normalization, the model's user-defined pieces (newline, mode tokens, sentinels)
    always whole, the same Unigram scores and byte fallback, EOS appended."""
    spec = proto.normalizer_spec
    normalizers = []
    if spec.precompiled_charsmap:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap":
                            base64.b64encode(spec.precompiled_charsmap).decode("ascii")})
    if spec.remove_extra_whitespaces:
        normalizers += [_replace({"Regex": r"\A +| +\z"}, ""), _replace({"Regex": " {2,}"}, " ")]
    if spec.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": " "})
    if spec.escape_whitespaces:
        normalizers.append(_replace({"String": " "}, "▁"))
    user_defined = sorted((piece.piece for piece in proto.pieces if piece.type ==
                           sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED),
                          key=len, reverse=True)
    decoders = [_replace({"String": "▁"}, " "), {"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    eos = {"id": special["eos_token"], "type_id": 0}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": index, "content": proto.pieces[index].piece, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True} for index in (0, 1, 2)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "|".join(
            map(re.escape, user_defined))}, "behavior": "Isolated", "invert": False}
        if user_defined else None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": eos}],
            "special_tokens": {eos["id"]: {"id": eos["id"], "ids": [1], "tokens": [eos["id"]]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "Unigram", "unk_id": 2,
                  "vocab": [[piece.piece, piece.score if piece.type in _MATCHED_PIECE_TYPES
                             else _UNMATCHED_SCORE] for piece in proto.pieces],
                  "byte_fallback": proto.trainer_spec.byte_fallback},
    }


def tokenizer_files(sp_model: bytes, extra_ids: int) -> dict[str, bytes]:
    """The files of a tokenizer that `transformers.AutoTokenizer` loads (its fast
    `tokenizers` backend) and that encodes, EOS appended, and decodes as
    seqio.SentencePieceVocabulary(sp_model, extra_ids) does: the model as spiece.model with
    `extra_ids` in tokenizer_config.json (T5's convention, read back by `read_tokenizer`), and
    tokenizer.json holding the model with seqio's sentinels, "▁<extra_id_N>" at id
    vocab_size - 1 - N. The same ids but where SentencePiece's float32 path scores cannot tell
    two segmentations apart and tokenizers' float64 ones can or keep the first found: exact
    ties (a run of one repeated character: 20 spaces as 16 + 4 or 4 + 16) and, thousands of
    tokens into a text, near-ties within float32 rounding (0.003% of the tokens of whole
    stdlib files with the stdlib's 8000-piece vocabulary).
    """
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model)
    trainer = proto.trainer_spec
    if trainer.model_type != trainer.UNIGRAM or (trainer.pad_id, trainer.eos_id,
                                                 trainer.unk_id) != (0, 1, 2):
        raise HFFormatError("only a unigram SentencePiece model with pad=0, eos=1, unk=2 (as "
                            "T5's and t5x_lite's) converts to a transformers tokenizer")
    for index in reversed(range(extra_ids)):  # seqio's sentinels: <extra_id_0> is the last id
        proto.pieces.add(piece=f"▁<extra_id_{index}>", score=0.0,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    special = {"eos_token": trainer.eos_piece, "pad_token": trainer.pad_piece,
               "unk_token": trainer.unk_piece}
    # tokenizer_class: the generic fast tokenizer, which runs tokenizer.json as written;
    # T5Tokenizer would rebuild T5's pipeline around its vocabulary. transformers 5 has no
    # other (slow) T5 tokenizer: AutoTokenizer ignores use_fast.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "extra_ids": extra_ids,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False}

    def to_json(value) -> bytes:
        return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")

    return {SPIECE_FILE: sp_model, TOKENIZER_FILE: to_json(_tokenizer_json(proto, special)),
            TOKENIZER_CONFIG_FILE: to_json(config), SPECIAL_TOKENS_FILE: to_json(special)}


def read_tokenizer(hf_dir: str) -> tuple[str, int] | None:
    """(spiece.model path, extra_ids) of a Hugging Face directory's SentencePiece tokenizer,
    extra_ids from tokenizer_config.json (T5Tokenizer's default 100 when it says none), or
    None when the directory has no spiece.model."""
    path = os.path.join(hf_dir, SPIECE_FILE)
    if not os.path.isfile(path):
        return None
    config_path = os.path.join(hf_dir, TOKENIZER_CONFIG_FILE)
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as error:
                raise HFFormatError(f"{config_path} is not valid JSON ({error})") from None
    extra_ids = config.get("extra_ids", 100)
    if not isinstance(extra_ids, int) or extra_ids < 0:
        raise HFFormatError(f"{config_path}: extra_ids is {extra_ids!r}, not a count")
    return path, extra_ids


def save_t5(model: models.Model, params: dict, out_dir: str,
            extra_files: dict[str, bytes] | None = None) -> None:
    """Writes config.json and model.safetensors that transformers' T5ForConditionalGeneration
    loads, and `extra_files` ({name: contents}, e.g. `tokenizer_files`). Written to a
    temporary directory first: `out_dir` never holds half a checkpoint."""
    hf_config = config_to_hf(model.config)
    tensors = tensors_from_params(params, model.config)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, CONFIG_FILE)):
        raise FileExistsError(f"{out_dir} already holds a {CONFIG_FILE}: choose an empty "
                              f"output directory")
    partial = out_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    with open(os.path.join(partial, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(partial, WEIGHTS_FILE),
                                metadata={"format": "pt"})
    for name, contents in (extra_files or {}).items():
        with open(os.path.join(partial, name), "wb") as f:
            f.write(contents)
    os.makedirs(out_dir, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, *(extra_files or {})):
        os.replace(os.path.join(partial, name), os.path.join(out_dir, name))
    os.rmdir(partial)


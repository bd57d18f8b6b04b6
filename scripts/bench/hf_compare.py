"""Hugging Face transformers' T5 timed on the same shapes as ours (--compare-hf): a train step
and generate. The only module that imports torch and transformers, and only when called."""
import dataclasses
import importlib.util
from typing import Callable

from bench import timing
from t5x_lite import launch


def check_transformers() -> None:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise launch.UsageError(f"--compare-hf needs {' and '.join(missing)}: pip install -e "
                                f"'.[test]' installs them")


def hf_model(config):
    """A randomly initialized transformers T5ForConditionalGeneration of `config`'s shape."""
    import transformers
    from t5x_lite import hf

    hf_config = transformers.T5Config(**hf.config_to_hf(config))
    return transformers.T5ForConditionalGeneration(hf_config)


def hf_train_timer(config, arrays: dict) -> Callable[[], float]:
    """A function running one transformers T5ForConditionalGeneration train step (forward,
    backward, torch AdamW; float32, no dropout) on the batch's tokens; returns its seconds."""
    import torch

    model = hf_model(dataclasses.replace(config, dropout_rate=0.0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8,
                                  weight_decay=0.01)
    tokens = {name: torch.from_numpy(arrays[key]).long() for name, key in (
        ("input_ids", "encoder_input_tokens"), ("decoder_input_ids", "decoder_input_tokens"),
        ("labels", "decoder_target_tokens"))}

    def step() -> None:
        model(**tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # As optimizers.adamw does.
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return lambda: timing.timed(step)


def hf_decode_timer(config, params, tokens_BL, targets: int, method: str,
                    options: dict) -> Callable[[], float]:
    """transformers' generate on our weights `params` and encoder tokens `tokens_BL` (int,
    float32, CPU): greedy or beam search with num_beams = beam_size, forced to `targets` new
    tokens; returns its seconds."""
    import numpy as np
    import torch
    from t5x_lite import hf

    model = hf_model(config).eval()
    tensors = {name: torch.from_numpy(np.array(value))
               for name, value in hf.tensors_from_params(params, config).items()}
    model.load_state_dict(tensors, strict=False)
    if not config.tie_embeddings:  # transformers 5 ties the head whatever the config says
        model.lm_head.weight = torch.nn.Parameter(tensors["lm_head.weight"])
    tokens = torch.from_numpy(tokens_BL).long()
    search = ({"num_beams": options.get("beam_size", 4), "length_penalty": options.get(
        "alpha", 0.6)} if method == "beam" else {"num_beams": 1})

    def run() -> None:
        with torch.inference_mode():
            model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                           max_new_tokens=targets, min_new_tokens=targets, do_sample=False,
                           **search)

    return lambda: timing.timed(run)

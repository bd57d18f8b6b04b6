"""Pretraining objectives as settings: each is a frozen dataclass whose fields gin can bind
(`gin/objectives/*.gin`) and which lists the seqio preprocessors that turn tokenized documents
into `{"inputs", "targets"}` examples. `tasks.py` puts tokenization before them and EOS after.

Every objective cuts as T5 does by default: the documents' tokens are concatenated into one
stream, then cut into chunks of the length the objective computes from the requested lengths
(568 tokens for span corruption at 512 / 114), so every example is full whatever the documents'
lengths. T5 first keeps one random window of at most 65,536 tokens per document
(`select_random_chunk`); we keep whole documents, which is the same for every document under
that size and, for longer ones, reads all of their text rather than a window of it.
`concatenate_documents=False` cuts each document on its own instead: chunks never cross a
document's end, and short documents give short examples.

UL2 (Tay et al. 2022) is a mixture: one task per denoiser, sampled at the denoiser's rate, so
the rates hold exactly per example and each denoiser cuts documents to the lengths it needs.
"""
import dataclasses
import functools
import re
from typing import ClassVar, Mapping, Sequence

from t5x_lite.data import preprocessors


def _mode_token_steps(mode_token: str | None) -> tuple[int, list]:
    """(tokens the mode token takes in the inputs, the preprocessor that prepends it)."""
    if mode_token is None:
        return 0, []
    return 1, [functools.partial(preprocessors.prepend_mode_token, mode_token=mode_token)]


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """T5 span corruption; with `mode_token`, a UL2 R- or X-denoiser."""

    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    mode_token: str | None = None
    concatenate_documents: bool = True
    name: ClassVar[str] = "span_corruption"

    def __post_init__(self):
        preprocessors.check_noise_args(self.noise_density, self.mean_noise_span_length)

    def preprocessors(self) -> list:
        noise = dict(noise_density=self.noise_density,
                     mean_noise_span_length=self.mean_noise_span_length)
        num_prefix_tokens, mode_steps = _mode_token_steps(self.mode_token)
        return [functools.partial(preprocessors.split_tokens_for_span_corruption, **noise,
                                  num_prefix_tokens=num_prefix_tokens,
                                  concatenate_documents=self.concatenate_documents),
                functools.partial(preprocessors.span_corruption, **noise), *mode_steps]


@dataclasses.dataclass(frozen=True)
class PrefixLM:
    """Inputs are a prefix of the chunk, targets its continuation; with `mode_token`, UL2's
    S-denoiser."""

    mode_token: str | None = None
    concatenate_documents: bool = True
    name: ClassVar[str] = "prefix_lm"

    def preprocessors(self) -> list:
        num_prefix_tokens, mode_steps = _mode_token_steps(self.mode_token)
        return [functools.partial(preprocessors.split_tokens_for_prefix_lm,
                                  num_prefix_tokens=num_prefix_tokens,
                                  concatenate_documents=self.concatenate_documents),
                functools.partial(preprocessors.prefix_lm, num_prefix_tokens=num_prefix_tokens),
                *mode_steps]


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """Every chunk is a target and nothing an input: a decoder-only model predicts each
    token from those before it (no encoder-decoder can train on it)."""

    concatenate_documents: bool = True
    name: ClassVar[str] = "causal_lm"

    def preprocessors(self) -> list:
        return [functools.partial(preprocessors.split_tokens_for_causal_lm,
                                  concatenate_documents=self.concatenate_documents)]


@dataclasses.dataclass(frozen=True)
class BartNoise:
    """BART's noise (see `preprocessors.bart_noise`); defaults are BART's best combination,
    text infilling of 30% of the tokens plus sentence permutation."""

    text_infilling_rate: float = 0.3
    poisson_lambda: float = 3.0
    token_masking_rate: float = 0.0
    token_deletion_rate: float = 0.0
    sentence_permutation: bool = True
    document_rotation: bool = False
    sentence_end_chars: str = ".!?\n"
    concatenate_documents: bool = True
    name: ClassVar[str] = "bart"

    def __post_init__(self):
        preprocessors.check_bart_args(self.text_infilling_rate, self.poisson_lambda,
                                      self.token_masking_rate, self.token_deletion_rate)

    def preprocessors(self) -> list:
        settings = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                    if field.name != "concatenate_documents"}
        return [functools.partial(preprocessors.split_tokens_for_bart,
                                  concatenate_documents=self.concatenate_documents),
                functools.partial(preprocessors.bart_noise, **settings)]


@dataclasses.dataclass(frozen=True)
class BertMlm:
    """BERT's masked LM, for encoder-only models (see `preprocessors.bert_mlm`): noise_density
    of each chunk's tokens are chosen; of those, mask_rate become the mask token (T5's
    vocabulary has no [MASK]: the first sentinel, <extra_id_0>), random_rate a random real
    token, and the rest (0.1 by default) stay; the loss is on the chosen positions only.
    Inputs and targets are the same chunk, TASK_FEATURE_LENGTHS['inputs'] tokens with EOS (a
    'targets' length is ignored)."""

    noise_density: float = 0.15
    mask_rate: float = 0.8
    random_rate: float = 0.1
    concatenate_documents: bool = True
    name: ClassVar[str] = "bert_mlm"

    def __post_init__(self):
        preprocessors.check_mlm_args(self.noise_density, self.mask_rate, self.random_rate)

    def preprocessors(self) -> list:
        return [functools.partial(preprocessors.split_tokens_for_mlm,
                                  concatenate_documents=self.concatenate_documents),
                functools.partial(preprocessors.bert_mlm, noise_density=self.noise_density,
                                  mask_rate=self.mask_rate, random_rate=self.random_rate)]


# The paper's UL2 configuration: R-denoisers 0.4, X-denoisers 0.4, S-denoiser 0.2.
DEFAULT_UL2_DENOISERS = (
    {"mode_token": "[NLU]", "noise_density": 0.15, "mean_noise_span_length": 3.0, "rate": 0.2},
    {"mode_token": "[NLU]", "noise_density": 0.15, "mean_noise_span_length": 8.0, "rate": 0.2},
    {"mode_token": "[NLG]", "noise_density": 0.5, "mean_noise_span_length": 3.0, "rate": 0.1},
    {"mode_token": "[NLG]", "noise_density": 0.5, "mean_noise_span_length": 8.0, "rate": 0.1},
    {"mode_token": "[NLG]", "noise_density": 0.15, "mean_noise_span_length": 64.0, "rate": 0.1},
    {"mode_token": "[NLG]", "noise_density": 0.5, "mean_noise_span_length": 64.0, "rate": 0.1},
    {"mode_token": "[S2S]", "prefix_lm": True, "rate": 0.2},
)
_SPAN_KEYS = frozenset({"rate", "mode_token", "noise_density", "mean_noise_span_length"})
_PREFIX_LM_KEYS = frozenset({"rate", "mode_token", "prefix_lm"})


def _denoiser(index: int, settings: Mapping, concatenate_documents: bool
              ) -> tuple[str, float, SpanCorruption | PrefixLM]:
    """(label, rate, objective) of one UL2 denoiser given as a dict (see DEFAULT_UL2_DENOISERS)."""
    where = f"UL2 denoiser {index} ({dict(settings)})"
    allowed = _PREFIX_LM_KEYS if settings.get("prefix_lm") else _SPAN_KEYS
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]!r}: allowed keys are "
                         f"{', '.join(sorted(allowed))}")
    missing = sorted(allowed - set(settings) - {"mode_token", "prefix_lm"})
    if missing:
        raise ValueError(f"{where} needs key {missing[0]!r}")
    rate = float(settings["rate"])
    if rate <= 0:
        raise ValueError(f"{where}: rate must be > 0, got {rate}")
    mode_token = settings.get("mode_token")
    # Task names allow only word characters and dots: "[NLU]" -> "nlu_".
    mode = re.sub(r"\W", "", mode_token).lower() + "_" if mode_token else ""
    if settings.get("prefix_lm"):
        return f"{mode}prefix_lm", rate, PrefixLM(mode_token, concatenate_documents)
    objective = SpanCorruption(settings["noise_density"], settings["mean_noise_span_length"],
                               mode_token, concatenate_documents)
    label = (f"{mode}span{objective.mean_noise_span_length:g}_"
             f"density{objective.noise_density:g}")
    return label, rate, objective


@dataclasses.dataclass(frozen=True)
class UL2:
    """The mixture of denoisers: each dict names a `rate` (relative; normalised over the
    denoisers), an optional `mode_token`, and either `prefix_lm: True` (S-denoiser) or a
    `noise_density` and `mean_noise_span_length` (R- and X-denoisers). Each denoiser cuts
    its own stream to its own chunk length; `concatenate_documents` applies to all of them."""

    denoisers: Sequence[Mapping] = DEFAULT_UL2_DENOISERS
    concatenate_documents: bool = True
    name: ClassVar[str] = "ul2"

    def __post_init__(self):
        if not self.denoisers:
            raise ValueError("UL2 needs at least one denoiser")
        self.components()  # Validates every denoiser now, not when data is first read.

    def components(self) -> list[tuple[str, float, SpanCorruption | PrefixLM]]:
        """(label, rate, objective) per denoiser; labels are unique, such as
        "nlu_span3_density0.15" or "s2s_prefix_lm"."""
        components, seen = [], {}
        for index, settings in enumerate(self.denoisers):
            label, rate, objective = _denoiser(index, settings, self.concatenate_documents)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}_{seen[label]}"
            components.append((label, rate, objective))
        return components


Objective = SpanCorruption | PrefixLM | CausalLM | BartNoise | BertMlm | UL2
OBJECTIVES = {cls.name: cls for cls in (SpanCorruption, PrefixLM, CausalLM, BartNoise, BertMlm,
                                        UL2)}


def get_objective(objective: "str | Objective") -> Objective:
    """An objective given by name (its default settings) or as a settings object."""
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: allowed values are "
                             f"{', '.join(OBJECTIVES)}")
        return OBJECTIVES[objective]()
    if not isinstance(objective, tuple(OBJECTIVES.values())):
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} or an "
                         f"objectives.{'/'.join(c.__name__ for c in OBJECTIVES.values())} "
                         f"object, got {objective!r}")
    return objective

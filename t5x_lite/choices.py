"""Settings that pick one of a fixed set of behaviours (NaN policy, attention kernel, router,
decoding method, remat policy) are enums, turned from the strings gin binds into members once,
when the config object is built; the hot path only ever sees a member or the callable it
names."""
import enum
from typing import TypeVar

Choice = TypeVar("Choice", bound=enum.Enum)


AUTO = "auto"


def parse(choice_type: type[Choice], value, setting: str, *, auto: bool = False
          ) -> Choice | None:
    """`value` (a member, or its value as gin binds it: 'skip') as a member of `choice_type`;
    with `auto`, None or 'auto' (left to the platform) is None. A ValueError naming
    `setting` and every allowed value otherwise."""
    if isinstance(value, choice_type) or (auto and value in (None, AUTO)):
        return None if value == AUTO else value
    try:
        return choice_type(value)
    except ValueError:
        allowed = ", ".join(repr(v) for v in ([AUTO] if auto else []) +
                            [member.value for member in choice_type])
        raise ValueError(f"{setting} must be one of {allowed}, got {value!r}") from None


def set_parsed(config, field: str, choice_type: type[Choice], setting: str, *,
               auto: bool = False) -> None:
    """Replaces the frozen dataclass `config`'s `field` by its parsed member (__post_init__)."""
    object.__setattr__(config, field, parse(choice_type, getattr(config, field), setting,
                                            auto=auto))

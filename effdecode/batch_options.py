"""transformers' own ``generate_batch`` arguments, mapped onto effdecode's.

``continuous_batching_config`` (a ``transformers.ContinuousBatchingConfig`` or a dict of its fields),
``record_timestamps``, ``persistent_manager`` and ``warmup``: what has a meaning here is honoured, the rest is
named in one warning.

==============================  ===========================================================================
transformers                    effdecode
==============================  ===========================================================================
``max_requests_per_batch``      ``DecodeConfig.max_slots`` (requests decoded at once)
``seed``                        the sampling seed of the call (the caller's RNG state is left as it was)
``warmup``                      accepted: effdecode has no warm-up pass (compiled steps and CUDA graphs are
                                built on first use and kept on the model)
anything else set               ignored, named in one warning (paged-cache sizing, compile levels, ...:
                                effdecode sizes its slot cache itself, ``DecodeConfig`` holds its options)
==============================  ===========================================================================
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# transformers' generate_batch arguments besides inputs / generation_config / progress_bar, with defaults.
HF_ARGUMENTS = {"continuous_batching_config": None, "record_timestamps": False, "persistent_manager": False}
_ACCEPTED = ("warmup",)  # meaningful to transformers only; effdecode behaves the same either way
TRANSFORMERS_ARGUMENTS = (*HF_ARGUMENTS, *_ACCEPTED)


@dataclass
class BatchOptions:
    """What transformers' arguments mean for one effdecode call.

    Attributes
    ----------
    max_slots : int, optional
        Slot count from ``max_requests_per_batch`` (None: not given).
    seed : int, optional
        Sampling seed from ``continuous_batching_config.seed``.
    ignored : list of str
        Arguments (and config fields) given with a non-default value that effdecode does not honour.
    """

    max_slots: int | None = None
    seed: int | None = None
    ignored: list[str] = dataclasses.field(default_factory=list)


def pop_batch_options(kwargs: dict[str, Any]) -> BatchOptions:
    """Remove transformers' ``generate_batch`` arguments from ``kwargs`` and map them.

    Raises
    ------
    ValueError
        For a ``continuous_batching_config`` that is neither a ``ContinuousBatchingConfig`` nor a dict of its
        fields, or a ``max_requests_per_batch`` < 1.
    """
    options = BatchOptions()
    for name in _ACCEPTED:
        kwargs.pop(name, None)
    for name, default in HF_ARGUMENTS.items():
        value = kwargs.pop(name, default)
        if name == "continuous_batching_config":
            _map_cb_config(value, options)
        elif value != default:
            options.ignored.append(f"{name}={value!r}")
    return options


def warn_ignored(options: BatchOptions, stacklevel: int = 3) -> None:
    """One warning naming every ignored argument (none when nothing was ignored)."""
    if options.ignored:
        warnings.warn(
            f"effdecode generate_batch ignores {', '.join(options.ignored)}: they configure transformers' "
            "paged cache and manager; effdecode sizes its slot cache itself (DecodeConfig.max_slots)",
            stacklevel=stacklevel,
        )


def _cb_fields(config: Any) -> dict[str, Any]:
    """The fields of a ContinuousBatchingConfig that differ from its defaults (all keys of a dict)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(
            "continuous_batching_config must be a transformers.ContinuousBatchingConfig or a dict of its "
            f"fields, got {type(config).__name__}"
        )
    default = type(config)()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def _map_cb_config(config: Any, options: BatchOptions) -> None:
    for name, value in _cb_fields(config).items():
        if name == "max_requests_per_batch" and value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"continuous_batching_config.max_requests_per_batch={value!r}; expected an int >= 1"
                )
            options.max_slots = value
        elif name == "seed" and value is not None:
            options.seed = int(value)
        else:
            options.ignored.append(f"continuous_batching_config.{name}={value!r}")

"""Wiring posenc into transformers: the registered architectures, `with_posenc`, and `posenc=` on the stock Auto
classes."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import transformers
from transformers import AutoConfig, PreTrainedConfig

from . import archs
from .convert import load_converted
from .modeling import posenc_factory
from .modeling.posenc_attention import STOCK_NAMES
from .modeling.posenc_factory import auto_model_classes, posenc_config_class, posenc_model_classes
from .modeling.posenc_schemes import PosencConfigMixin, kernel_of

logger = logging.getLogger(__name__)

#: stock model_type -> posenc config class, for every architecture registered in this process: the verified ones at
#: import, any other supported one when it is first used (`register_architecture`)
ARCHITECTURES: dict[str, type] = {}


def register_architecture(model_type: str) -> type:
    """The posenc config class of `model_type`, registered with AutoConfig as `posenc_<model_type>` (once).

    Raises ValueError naming the reason where hf_posenc refuses the architecture, and logs a warning for one it
    supports but has not verified (see `hf-posenc archs`)."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    status, reason = archs.status(model_type)
    if status not in (archs.VERIFIED_STATUS, archs.UNTRIED_STATUS):
        raise ValueError(f"hf_posenc does not support architecture {model_type!r}: {reason} (see `hf-posenc archs`)")
    if status == archs.UNTRIED_STATUS:
        logger.warning(
            "hf_posenc has not verified architecture %r (%s): it is built by the generic adapter, but its contract "
            "(identity, cache, save/load) is not tested; check its outputs",
            model_type,
            reason,
        )
    config_class = posenc_config_class(model_type)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    ARCHITECTURES[model_type] = config_class
    return config_class


posenc_factory.SCHEME_CHECKS.append(archs.check_site)  # a refused site fails when any posenc config is built
for _model_type in archs.verified():
    register_architecture(_model_type)


def model_classes(model_type: str) -> dict[str, type]:
    """Class name -> posenc model class of every head of `model_type` (e.g. `model_classes("gpt2")
    ["PosencGPT2DoubleHeadsModel"]`, a head without an Auto class)."""
    return posenc_model_classes(register_architecture(model_type))


def with_posenc(config: PreTrainedConfig, posenc: str | Mapping) -> PreTrainedConfig:
    """A new posenc config for `config`'s architecture with scheme `posenc`; `config` itself is not changed.

    Args:
        config: a stock config (e.g. `LlamaConfig`) or a posenc config whose scheme is replaced.
        posenc: a scheme name (`"alibi"`) or a dict with a `type` key and the scheme's parameters.

    Returns:
        A config that the stock Auto classes turn into a posenc model.
    """
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"with_posenc needs a transformers config, got {type(config).__name__}")
    base_type = config.base_model_type if isinstance(config, PosencConfigMixin) else config.model_type
    config_class = register_architecture(base_type)
    archs.check_scheme(base_type, posenc)
    values = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "posenc"):
        values.pop(key, None)
    if isinstance(config, PosencConfigMixin):
        values["rope_parameters"] = config.rope_parameters_to_hand_on()
        if values["rope_parameters"] is None:
            values.pop("rope_parameters")
    new = config_class(**values, posenc=posenc)
    implementation = config._attn_implementation_internal  # not in to_dict; the model maps it for bias schemes
    if kernel_of(implementation) is not None:  # back to the stock name the new scheme understands
        implementation = STOCK_NAMES.get(kernel_of(implementation), implementation)
    new._attn_implementation_internal = implementation
    return new


# Keyword arguments of `from_pretrained` that concern reading the files, needed by the config and the model alike.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# Keyword arguments that are for the model even though the config has an attribute of the same name.
_MODEL_KWARGS = ("dtype", "torch_dtype", "quantization_config")


def _read_config(path, kwargs: dict) -> tuple[PreTrainedConfig, dict]:
    """Read a checkpoint's config as the stock Auto `from_pretrained` does: keyword arguments naming config
    attributes (num_labels, use_cache, ...) override it; the rest is returned for the model."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    model = {k: kwargs[k] for k in _MODEL_KWARGS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in hub and k not in model}
    config, unused = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **hub, **rest)
    return config, {**unused, **hub, **model}


def _register_saved(path, kwargs: dict) -> None:
    """Register the architecture of a saved posenc folder before transformers reads it, so that supported
    architectures beyond the verified ones (registered when first used) load in a new process too."""
    if isinstance(path, PreTrainedConfig) or path is None or kwargs.get("trust_remote_code"):
        return
    folder = Path(path) / kwargs.get("subfolder", "")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, TypeError):
        return  # not a local folder with a config: transformers reads (and reports on) it
    if isinstance(model_type, str) and model_type.startswith("posenc_"):
        register_architecture(model_type.removeprefix("posenc_"))


def _add_posenc_keyword(auto_class: type) -> None:
    """Give a stock Auto class `from_config(config, posenc=...)` and `from_pretrained(path, posenc=...)`.

    Each Auto class carries its own copies of these classmethods, so each is wrapped; without `posenc` they are the
    stock methods, untouched (a saved posenc folder's architecture is registered first, see `_register_saved`).
    """
    if getattr(auto_class, "_hf_posenc_keyword", False):
        return
    stock_from_config = auto_class.from_config.__func__
    stock_from_pretrained = auto_class.from_pretrained.__func__

    @functools.wraps(stock_from_config)
    def from_config(cls, config, *args, posenc=None, **kwargs):
        if posenc is not None:
            config = with_posenc(config, posenc)
        return stock_from_config(cls, config, *args, **kwargs)

    @functools.wraps(stock_from_pretrained)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, posenc=None, **kwargs):
        _register_saved(pretrained_model_name_or_path, kwargs)
        if posenc is None:
            return stock_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
        config = kwargs.pop("config", None)
        if config is None or isinstance(config, (str, os.PathLike)):
            config, kwargs = _read_config(config or pretrained_model_name_or_path, kwargs)
        return load_converted(
            functools.partial(stock_from_pretrained, cls, pretrained_model_name_or_path, *args),
            pretrained_model_name_or_path,
            config,
            with_posenc(config, posenc),
            ARCHITECTURES,
            with_posenc,
            kwargs,
        )

    auto_class.from_config = classmethod(from_config)
    auto_class.from_pretrained = classmethod(from_pretrained)
    auto_class._hf_posenc_keyword = True


def _register_saved_configs() -> None:
    """`AutoConfig.from_pretrained` registers a saved posenc folder's architecture first, as the model classes do."""
    if getattr(AutoConfig, "_hf_posenc_keyword", False):
        return
    stock = AutoConfig.from_pretrained.__func__

    @functools.wraps(stock)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        _register_saved(pretrained_model_name_or_path, kwargs)
        return stock(cls, pretrained_model_name_or_path, *args, **kwargs)

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    AutoConfig._hf_posenc_keyword = True


#: every Auto model class of transformers gets the keyword (heads are discovered per architecture, so any may be used)
AUTO_CLASSES = sorted(auto_model_classes())
for _name in AUTO_CLASSES:
    _add_posenc_keyword(getattr(transformers, _name))
_register_saved_configs()

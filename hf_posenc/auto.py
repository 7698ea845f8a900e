"""Wiring posenc into transformers: the architecture table, `with_posenc`, and `posenc=` on the stock Auto classes."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import transformers
from transformers import AutoConfig, PreTrainedConfig

from .convert import load_converted
from .modeling import (
    modeling_posenc_bert,
    modeling_posenc_gpt2,
    modeling_posenc_gpt_neox,
    modeling_posenc_llama,
    modeling_posenc_mistral,
    modeling_posenc_qwen2,
    modeling_posenc_roberta,
)
from .modeling.posenc_attention import STOCK_NAMES
from .modeling.posenc_schemes import PosencConfigMixin

#: stock model_type -> posenc config class. Adding an architecture is one entry here plus its two shipped files.
ARCHITECTURES: dict[str, type] = {}


def register_architecture(config_class: type) -> type:
    """Register a posenc model type with AutoConfig and the table (its modeling file registers the model classes)."""
    if not issubclass(config_class, PosencConfigMixin):
        raise TypeError(f"{config_class.__name__} must subclass PosencConfigMixin")
    if config_class.model_type != f"posenc_{config_class.base_model_type}":
        raise ValueError(f"{config_class.__name__}.model_type must be 'posenc_{config_class.base_model_type}'")
    if config_class.base_model_type in ARCHITECTURES:
        raise ValueError(f"architecture {config_class.base_model_type!r} is already registered")
    AutoConfig.register(config_class.model_type, config_class)
    ARCHITECTURES[config_class.base_model_type] = config_class
    return config_class


register_architecture(modeling_posenc_gpt2.PosencGPT2Config)
register_architecture(modeling_posenc_llama.PosencLlamaConfig)
register_architecture(modeling_posenc_mistral.PosencMistralConfig)
register_architecture(modeling_posenc_qwen2.PosencQwen2Config)
register_architecture(modeling_posenc_gpt_neox.PosencGPTNeoXConfig)
register_architecture(modeling_posenc_bert.PosencBertConfig)
register_architecture(modeling_posenc_roberta.PosencRobertaConfig)


def _native_rope_parameters(posenc: Mapping) -> dict:
    """The RoPE settings a rope posenc config hands on as the 'native' ones when its scheme is replaced."""
    params = {k: v for k, v in posenc.items() if k != "type"}
    if params["rope_type"] == "ntk":  # not a transformers rope_type: hand on the unscaled base
        return {k: params[k] for k in ("rope_theta", "partial_rotary_factor")} | {"rope_type": "default"}
    return params


def with_posenc(config: PreTrainedConfig, posenc: str | Mapping) -> PreTrainedConfig:
    """A new posenc config for `config`'s architecture with scheme `posenc`; `config` itself is not changed.

    Args:
        config: a stock config (e.g. `GPT2Config`) or a posenc config whose scheme is replaced.
        posenc: a scheme name (`"alibi"`) or a dict with a `type` key and the scheme's parameters.

    Returns:
        A config that the stock Auto classes turn into a posenc model.
    """
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"with_posenc needs a transformers config, got {type(config).__name__}")
    base_type = config.base_model_type if isinstance(config, PosencConfigMixin) else config.model_type
    if base_type not in ARCHITECTURES:
        raise ValueError(
            f"hf_posenc does not support architecture {base_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    values = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "posenc"):
        values.pop(key, None)
    if isinstance(config, PosencConfigMixin) and config.posenc["type"] == "rope":
        values["rope_parameters"] = _native_rope_parameters(config.posenc)
    new = ARCHITECTURES[base_type](**values, posenc=posenc)
    implementation = config._attn_implementation_internal  # not in to_dict; the model maps it for bias schemes
    if implementation and implementation.startswith("posenc_"):  # back to the stock name the new scheme understands
        implementation = STOCK_NAMES.get(implementation.removeprefix("posenc_"), implementation)
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


def _add_posenc_keyword(auto_class: type) -> None:
    """Give a stock Auto class `from_config(config, posenc=...)` and `from_pretrained(path, posenc=...)`.

    Each Auto class carries its own copies of these classmethods, so each is wrapped; without `posenc` they are the
    stock methods, untouched.
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


AUTO_CLASSES = sorted({name for cls in ARCHITECTURES.values() for name in cls.auto_map_entries} - {"AutoConfig"})
for _name in AUTO_CLASSES:
    _add_posenc_keyword(getattr(transformers, _name))

"""The factory: a posenc config class and one posenc class per head for any transformers architecture, made from the
stock classes transformers registers for it.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files. A saved folder holds this
closure plus two generated stubs per architecture (`configuration_posenc_<type>.py`, `modeling_posenc_<type>.py`) that
call the factory, so a folder loads without hf_posenc exactly as it does with it.

- `posenc_config_class(model_type)`: `Posenc<StockConfig>`, the stock config plus the `posenc` field;
- `posenc_model_classes(config_class)`: `Posenc<StockClass>` for every head the Auto classes map the type to (found in
  transformers' own Auto mappings, never listed by hand), registered with those Auto classes;
- `stub_sources(config_class)`: the two generated files of a saved folder.

Which adapter places the scheme: `ADAPTERS` for the architectures without a rotary module (GPT-2, BERT, RoBERTa),
`RotarySlotAdapter` for every other one (the Llama pattern: a rotary module and attention through AttentionInterface).
"""

from __future__ import annotations

import functools

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .posenc_bert_like import BertAdapter, RobertaAdapter
from .posenc_gpt2 import GPT2Adapter
from .posenc_layers import (
    PosencPreTrainedMixin,
    RotarySlotAdapter,
    inherit_conversion_mapping,
    keep_stock_signature,
    publish,
)
from .posenc_schemes import PosencConfigMixin, posenc_schemes, stock_class_of
from .posenc_version import (
    PLUGIN_VERSION,
    UntestedTransformersError,
    broken_on_release,
    check_scheme_on_release,
    raised_by_this_code,
    release_status,
)

#: model_type -> the adapter of an architecture without a rotary module; every other one takes `RotarySlotAdapter`
ADAPTERS: dict[str, type] = {"gpt2": GPT2Adapter, "bert": BertAdapter, "roberta": RobertaAdapter}


def adapter_of(model_type: str) -> type:
    return ADAPTERS.get(model_type, RotarySlotAdapter)


@functools.cache
def auto_model_classes() -> dict[str, type]:
    """Every `AutoModel*` class of transformers, by name."""
    classes = {}
    for name in dir(transformers):
        if name.startswith("AutoModel"):
            value = getattr(transformers, name)
            if isinstance(value, type) and hasattr(value, "_model_mapping"):
                classes[name] = value
    return classes


def stock_heads(model_type: str, config_class: type) -> dict[str, type]:
    """Auto class name -> the stock class transformers maps `model_type` to, read from the Auto mappings, keeping the
    classes built from `config_class` (an Auto class may map a type to another architecture's class, e.g.
    AutoModelForDecision: qwen2 -> JevForDecision), plus the adapter's heads that have no Auto class."""
    heads = {}
    for auto_name, auto_class in auto_model_classes().items():
        name = auto_class._model_mapping._model_mapping.get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name is not None:
            heads[auto_name] = stock_class(model_type, name)
    for name in adapter_of(model_type).extra_heads:  # heads without an Auto class (GPT2DoubleHeadsModel)
        heads[f"+{name}"] = stock_class(model_type, name)
    return {auto_name: cls for auto_name, cls in heads.items() if getattr(cls, "config_class", None) is config_class}


def stock_class(model_type: str, name: str) -> type:
    """The stock class `name` of `model_type`'s modeling file."""
    return transformers.AutoModel._model_mapping._load_attr_from_module(model_type, name)


def posenc_name(stock_name: str) -> str:
    return f"Posenc{stock_name}"


@functools.cache
def posenc_config_class(model_type: str) -> type:
    """`Posenc<StockConfig>` for `model_type`: the stock config class plus `posenc` (model_type `posenc_<type>`).

    Does not register it with AutoConfig: the plugin does (a config loaded as remote code must not, or a later folder
    of the same type would load without `trust_remote_code`).
    """
    stock = CONFIG_MAPPING[model_type]
    adapter = adapter_of(model_type)
    namespace = {
        "__doc__": (
            f"A `{stock.__name__}` plus `posenc`: a scheme name or `{{'type': name, **params}}` (see "
            f"`hf_posenc.SCHEMES`). Without `posenc` it takes the architecture's own scheme, `{adapter.native_posenc}`."
        ),
        "__annotations__": {"posenc": dict | str | None},
        "posenc": None,
        "model_type": f"posenc_{model_type}",
        "base_model_type": model_type,
        "native_posenc": adapter.native_posenc,
        "_rotates_part": adapter.rotates_part,
    }
    return publish(type(posenc_name(stock.__name__), (FactoryConfigMixin, stock), namespace), __name__)


#: checks every factory-made config runs on its scheme: `check(model_type, scheme_name)` raises for a scheme the
#: architecture cannot take. The plugin adds its support matrix's (hf_posenc.archs.check_site); a folder loaded as
#: remote code has none (the plugin checked when it was made)
SCHEME_CHECKS: list = []


class FactoryConfigMixin(PosencConfigMixin):
    """A factory-made config makes (and registers with the Auto classes) its architecture's model classes when it is
    first built, so neither importing hf_posenc nor making the config class imports a modeling file; `auto_map_entries`
    is known from then on. It runs `SCHEME_CHECKS` on its scheme.

    On a transformers release newer than the tested range (which only a saved folder's code reaches without
    `HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS`), the config loads only a scheme transformers' own modules compute."""

    def __post_init__(self, **kwargs):
        try:
            posenc_model_classes(type(self))
            super().__post_init__(**kwargs)
        except Exception as error:
            # a refusal of a setting (a ValueError, or a TypeError the plugin raised: a scheme given as a number) is
            # the user's to fix on any release; anything else on a newer release is likely the release's doing, a
            # TypeError from code the plugin called too (the way a moved signature shows): say so, with the cause
            refused = isinstance(error, ValueError) or (isinstance(error, TypeError) and raised_by_this_code(error))
            if release_status() == "newer" and not refused:
                raise UntestedTransformersError(broken_on_release("this posenc model's code", error)) from error
            raise
        check_scheme_on_release(self.posenc["type"], self.stock_guard() is None)
        for check in SCHEME_CHECKS:
            for name in {self.posenc["type"], *(spec["type"] for spec in posenc_schemes(self.posenc))}:
                check(self.base_model_type, name)  # a pattern, and each of its entries


_MODEL_CLASSES: dict[type, dict[str, type]] = {}


def posenc_model_classes(config_class: type) -> dict[str, type]:
    """`Posenc<StockClass>` for every head of `config_class`'s architecture, by class name, each registered with the
    Auto classes that map the architecture to its stock class.

    Run for the plugin's configs and, through the generated modeling stub, by a `trust_remote_code` load alike: heads
    such as `LlamaForSequenceClassification` build their base model through `AutoModel`, which must know the class.
    """
    if config_class in _MODEL_CLASSES:
        return _MODEL_CLASSES[config_class]
    model_type = config_class.base_model_type
    adapter = adapter_of(model_type)
    stock_config = stock_class_of(config_class)
    heads = stock_heads(model_type, stock_config)
    if "AutoModel" not in heads:
        raise ValueError(f"transformers maps no base model (AutoModel) of {stock_config.__name__} to {model_type!r}")
    base = heads["AutoModel"]
    base_class = publish(
        type(posenc_name(base.__name__), (PosencPreTrainedMixin, adapter, base), {"config_class": config_class}),
        __name__,
    )
    classes: dict[str, type] = {base_class.__name__: base_class}
    for stock in heads.values():
        if posenc_name(stock.__name__) not in classes:
            head = type(posenc_name(stock.__name__), (PosencPreTrainedMixin, stock), {"config_class": config_class})
            classes[head.__name__] = publish(head, __name__)
    for cls in classes.values():
        cls.posenc_base_class = base_class
        keep_stock_signature(cls)  # the adapter's forward (base model) takes the stock signature
        stock = stock_class_of(cls)
        inherit_conversion_mapping(cls.__name__, stock.__name__)
    inherit_conversion_mapping(config_class.model_type, model_type)
    configuration, modeling = stub_module_names(model_type)
    entries = {"AutoConfig": f"{configuration}.{config_class.__name__}"}
    for auto_name, stock in heads.items():
        if not auto_name.startswith("+"):
            getattr(transformers, auto_name).register(config_class, classes[posenc_name(stock.__name__)], exist_ok=True)
            entries[auto_name] = f"{modeling}.{posenc_name(stock.__name__)}"
    config_class.auto_map_entries = entries
    _MODEL_CLASSES[config_class] = classes
    return classes


# --------------------------------------------------------------------------------------------------------------------
# The generated files of a saved folder
# --------------------------------------------------------------------------------------------------------------------


def stub_module_names(model_type: str) -> tuple[str, str]:
    """The module names of an architecture's two generated files: configuration, modeling."""
    name = model_type.replace("-", "_")
    return f"configuration_posenc_{name}", f"modeling_posenc_{name}"


# transformers finds a shipped file's relative imports with a regex over its lines; the generated import lines are
# built from this prefix so that no line of this file itself reads as a relative import
_FROM_HERE = "from ."


def stub_sources(config_class: type) -> dict[str, str]:
    """File name -> source of the two files that make `config_class`'s architecture loadable as remote code."""
    model_type = config_class.base_model_type
    config_module, modeling_module = stub_module_names(model_type)
    config_name = config_class.__name__
    header = f'"""Generated by hf_posenc {PLUGIN_VERSION} for model type posenc_{model_type}: {{}}."""\n\n'
    config_source = header.format("the config class, made by the shipped factory from transformers' own") + "\n".join(
        [
            f"{_FROM_HERE}posenc_factory import posenc_config_class",
            f"{_FROM_HERE}posenc_version import check_transformers_version",
            "",
            "# a newer release than the tested ones loads only a scheme transformers' classes compute (see the config)",
            'check_transformers_version(newer="scheme")',
            f"{config_name} = posenc_config_class({model_type!r})",
            "",
        ]
    )
    lines = [
        f"{_FROM_HERE}{config_module} import {config_name}",
        f"{_FROM_HERE}posenc_factory import posenc_model_classes",
        "",
        "# one class per head of the transformers release that loads this folder (the heads it was saved with:",
        *(f"#   {name}" for name in posenc_model_classes(config_class)),
        "# an older release may have fewer)",
        f"globals().update(posenc_model_classes({config_name}))",
    ]
    modeling_source = header.format("one model class per head, made by the shipped factory") + "\n".join([*lines, ""])
    return {f"{config_module}.py": config_source, f"{modeling_module}.py": modeling_source}

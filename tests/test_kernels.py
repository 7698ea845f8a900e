"""Hub kernels (`kernels`, which transformers 5.25 requires and `from_pretrained` turns on by default): a posenc model
computes the same function kernelized or not.

`kernelize` replaces the forward of modules whose class carries a kernel layer name (RMSNorm, activations, linear
attention pieces, ...) and functions an attention class lists (`apply_rotary_pos_emb`), on the devices the kernel
mapping names: transformers' own mapping names none on the CPU and, on CUDA, the flash-attn rotary kernel for
`rotary_pos_emb` among the rest. So:
- no class the plugin makes may carry a kernel layer name (then `kernelize` never replaces a plugin site);
- the rotation function may be replaced, and it receives the plugin's tables: RoPE's come from the stock rotary
  modules (as in the stock model), every other scheme's are the identity rotation (cos 1, sin 0), which any rotary
  kernel leaves exact. A CPU mapping with a kernel of the flash-attn wrapper's arithmetic (only the first half of
  cos/sin read) shows it here.
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
import transformers
from packaging.version import Version
from test_archs import ARCHS, SMOKE, arch_pattern, auto_class, build, logits, tiny, tokens
from torch import nn
from transformers.utils.import_utils import is_kernels_available

from hf_posenc import archs

KERNELS_BY_DEFAULT = Version(transformers.__version__).release[:2] >= (5, 25)
HUB_KERNELS_ON = os.environ.get("USE_HUB_KERNELS", "YES").lower() in ("true", "1", "y", "yes", "on")  # as transformers
pytestmark = pytest.mark.skipif(
    not (KERNELS_BY_DEFAULT and is_kernels_available() and HUB_KERNELS_ON),
    reason="from_pretrained kernelizes by default from transformers 5.25, with a compatible `kernels` package and "
    "USE_HUB_KERNELS not off; here not so",
)

#: calls of the CPU rotary kernel below (a kernel layer may hold no state of its own)
ROTARY_CALLS = []


def flash_style_rotary(signature: inspect.Signature) -> type:
    """A kernel layer computing `apply_rotary_pos_emb` as the flash-attn rotary kernel's transformers wrapper does
    (the first `cos.shape[-1]` dimensions rotate as two halves, only the first half of cos and sin read), with the
    forward signature of the architecture's own function (kernelize checks that they match)."""

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        q, k, cos, sin = (bound.arguments[name] for name in ("q", "k", "cos", "sin"))
        unsqueeze = bound.arguments.get("unsqueeze_dim", 1)
        cos, sin = cos.unsqueeze(unsqueeze), sin.unsqueeze(unsqueeze)
        width = min(cos.shape[-1], q.shape[-1])
        half = width // 2
        cos, sin = cos[..., :half], sin[..., :half]
        ROTARY_CALLS.append(width)

        def rotate(x):
            first, second, rest = x[..., :half], x[..., half:width], x[..., width:]
            return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)

        return rotate(q), rotate(k)

    forward.__signature__ = signature
    return type("FlashStyleRotary", (nn.Module,), {"forward": forward, "can_torch_compile": True, "has_backward": True})


class LocalLayer:
    """A kernel repository that hands kernelize a layer class of this file (no Hub, no download)."""

    def __init__(self, layer: type):
        self.layer = layer

    def load(self) -> type:
        return self.layer

    def __repr__(self) -> str:
        return f"LocalLayer({self.layer.__name__})"


def kernelized(model: nn.Module) -> nn.Module:
    """`model` kernelized for inference on the CPU with a flash-style rotary kernel for `rotary_pos_emb`."""
    from kernels import Mode, kernelize, use_kernel_mapping

    signatures = {
        inspect.signature(type(function).forward)
        for module in model.modules()
        for name, function in getattr(module, "_kernel_funcs", {}).items()
        if name == "rotary_pos_emb"
    }
    assert len(signatures) == 1, signatures
    mapping = {"rotary_pos_emb": {"cpu": LocalLayer(flash_style_rotary(signatures.pop()))}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        return kernelize(model, mode=Mode.INFERENCE, device="cpu")


def rotary_kernel_sites(model: nn.Module) -> int:
    """How many of the model's modules list a rotation function kernelize may replace."""
    return sum("rotary_pos_emb" in getattr(module, "_kernel_funcs", {}) for module in model.modules())


def arch_of(param) -> str:
    return param.values[0] if hasattr(param, "values") else param


#: every site the plugin changes: the input table (learned, sinusoidal), no rotation (nope), the score bias (alibi)
#: and a per-layer pattern (RoPE needs none: the stock rotary modules read rope_parameters)
SITE_SCHEMES = ("learned", "sinusoidal", "nope", "alibi", "layers")


def site_scheme(arch: str, scheme: str):
    if scheme == "layers":
        return arch_pattern(arch)  # RoPE and a windowed bias over the attention layers (None where refused)
    return scheme if archs.takes(arch, scheme) else None


@pytest.mark.parametrize("arch", ARCHS)
def test_kernelize_never_replaces_a_plugin_site(arch):
    """No module class and no attention function the plugin makes carries a kernel layer name, on a model of every
    site: kernelize replaces stock modules' forwards and stock functions only, whatever the mapping."""
    for scheme in SITE_SCHEMES:
        posenc = site_scheme(arch, scheme)
        if posenc is None:
            continue
        model = build(arch, posenc)
        for name, module in model.named_modules():
            cls = type(module)
            made_here = [c.__name__ for c in cls.__mro__ if c.__module__.startswith("hf_posenc")]
            if hasattr(cls, "kernel_layer_name"):
                assert not made_here, f"{arch} {scheme}: {name} ({cls.__name__}) is kernelizable and made by hf_posenc"
            for function in getattr(module, "_kernel_funcs", {}).values():
                assert not type(function).__module__.startswith("hf_posenc"), (arch, scheme, name)


@pytest.mark.parametrize("arch", sorted({arch_of(a) for a in ARCHS} & {*SMOKE, "gpt_neox", "phi", "cohere", "glm"}))
def test_a_rotary_kernel_leaves_every_non_rope_scheme_exact(arch):
    """With a kernel of the flash-attn wrapper's arithmetic in place of `apply_rotary_pos_emb` (as transformers maps
    it on CUDA), NoPE and ALiBi give the logits they give without it, bit for bit: the identity rotation they hand
    the function is exact under any rotary kernel, half-split, partial or interleaved. The kernel ran."""
    for scheme in ("nope", "alibi"):
        if not archs.takes(arch, scheme):
            continue
        model = build(arch, scheme)
        if not rotary_kernel_sites(model):
            pytest.skip(f"{arch} lists no rotation function for kernelize")
        x = tokens()
        expected = logits(model, x)
        ROTARY_CALLS.clear()
        got = logits(kernelized(model), x)
        assert ROTARY_CALLS, f"{arch}: the rotary kernel never ran"
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "posenc",
    [
        "rope",
        {"type": "rope", "rope_type": "yarn", "factor": 4.0},
        {"type": "rope", "rope_type": "proportional", "partial_rotary_factor": 0.5},
        {"type": "layers", "pattern": ["nope", {"type": "rope", "rope_theta": 500.0}]},
    ],
    ids=["rope", "yarn", "p-rope", "pattern"],
)
def test_a_rotary_kernel_computes_rope_as_the_stock_function(posenc):
    """On Llama (whose `apply_rotary_pos_emb` rotates two halves, as the flash-attn kernel does), RoPE, its scalings,
    p-RoPE and a per-layer pattern of NoPE and another RoPE setting give the same logits kernelized (within rounding:
    the kernel orders its products otherwise)."""
    model = build("llama", posenc)
    x = tokens()
    expected = logits(model, x)
    ROTARY_CALLS.clear()
    got = logits(kernelized(model), x)
    assert ROTARY_CALLS
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2", "bert", "modernbert"])
def test_from_pretrained_kernelizes_to_the_same_model(arch, tmp_path):
    """`from_pretrained` turns hub kernels on by default from transformers 5.25 (use_kernels=None -> True; on the CPU
    transformers' mapping replaces nothing): every site's model loads as it was saved, in inference and in training
    mode (which kernelizes again)."""
    for scheme in (*SITE_SCHEMES, "rope"):
        posenc = site_scheme(arch, scheme)
        if posenc is None:
            continue
        model = build(arch, posenc)
        model.save_pretrained(tmp_path / scheme)
        loaded = auto_class(arch).from_pretrained(tmp_path / scheme).eval()
        assert loaded.use_kernels, "from_pretrained no longer kernelizes by default: update this test's premise"
        x = tokens()
        torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=0, rtol=0)
        loaded.train()
        model.train()
        torch.manual_seed(0)
        trained = loaded(x, labels=x).loss
        torch.manual_seed(0)
        torch.testing.assert_close(trained, model(x, labels=x).loss, atol=0, rtol=0)


def kernelizable(model: nn.Module, names: set[str]) -> dict[str, tuple[type, str]]:
    """The modules of `model` whose class carries a kernel layer name in `names`: path -> (class, name)."""
    return {
        path: (type(module), type(module).kernel_layer_name)
        for path, module in model.named_modules()
        if getattr(type(module), "kernel_layer_name", None) in names
    }


@pytest.mark.parametrize("arch", SMOKE)
def test_the_mapping_reaches_only_stock_modules(arch):
    """transformers' own kernel mapping (every device) reaches, in a posenc model of every site, exactly the modules
    it reaches in the stock model: the same paths, the same stock classes, their forwards untouched by the plugin;
    and it still maps the rotation function (the premise of this file: a mapping entry that named something the
    plugin changes, or a plugin site made kernelizable, fails here)."""
    from transformers.integrations.hub_kernels import get_kernel_mapping_transformers

    names = set(get_kernel_mapping_transformers())
    assert "rotary_pos_emb" in names, "transformers no longer maps the rotation function: see this file's docstring"
    stock = kernelizable(auto_class(arch).from_config(copy.deepcopy(tiny(arch))), names)
    assert stock or arch == "gpt_oss", f"{arch}: the mapping reaches no layer of the stock model (check is void)"
    for scheme in SITE_SCHEMES:
        posenc = site_scheme(arch, scheme)
        if posenc is None:
            continue
        model = build(arch, posenc)
        assert kernelizable(model, names) == stock, f"{arch} {scheme}"
        for path in stock:
            assert "forward" not in vars(model.get_submodule(path)), f"{arch} {scheme}: {path}'s forward replaced"

"""hf_posenc: any positional scheme on any supported transformers architecture.

    import hf_posenc
    model = AutoModelForCausalLM.from_config(config, posenc="alibi")

Importing the package registers the `posenc_*` model types with transformers' Auto classes and gives them the
`posenc=` keyword; nothing else runs at import.
"""

from __future__ import annotations

from pathlib import Path

# the version and the tested transformers range live in the file that ships beside every saved model
from .modeling.posenc_version import PLUGIN_VERSION as __version__
from .modeling.posenc_version import TRANSFORMERS_RANGE, check_transformers_version

#: local path of the `evaluate` metric module: `evaluate.load(hf_posenc.PERPLEXITY_METRIC)` (no download)
PERPLEXITY_METRIC = str(Path(__file__).parent / "metrics" / "perplexity_by_length")

check_transformers_version("hf_posenc")

from transformers import (  # noqa: E402  (re-exported with the posenc= keyword added)
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .auto import ARCHITECTURES, model_classes, register_architecture, with_posenc  # noqa: E402
from .modeling.posenc_schemes import (  # noqa: E402
    SCHEMES,
    alibi_bias,
    alibi_slopes,
    ntk_scaled_rope_theta,
    rope_types,
    sinusoidal_position_embedding,
    t5_relative_position_bucket,
)

__all__ = [
    "ARCHITECTURES",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "PERPLEXITY_METRIC",
    "model_classes",
    "SCHEMES",
    "TRANSFORMERS_RANGE",
    "__version__",
    "alibi_bias",
    "alibi_slopes",
    "ntk_scaled_rope_theta",
    "register_architecture",
    "rope_types",
    "sinusoidal_position_embedding",
    "t5_relative_position_bucket",
    "with_posenc",
]

# Written by effir {{EFFIR_VERSION}}: the configuration of a {{MODEL_CLASS}}
# whose MLP sub-layers effir pruned.
"""{{CONFIG_CLASS}}: ``{{BASE_CONFIG}}`` with one more key,
``effir_intermediate_sizes``, the width of each layer's MLP sub-layer
(``None`` where the sub-layer was dropped). ``intermediate_size`` keeps the
source model's width. ``drop_mlp_list`` and ``drop_attn_list`` (LLM-Drop's
keys) list the dropped sub-layers for tools that read those."""

from transformers import {{BASE_CONFIG}}


class {{CONFIG_CLASS}}({{BASE_CONFIG}}):
    """``{{BASE_CONFIG}}`` with per-layer MLP widths (``effir_intermediate_sizes``)."""

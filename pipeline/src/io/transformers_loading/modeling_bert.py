# Written by effir {{EFFIR_VERSION}}: {{BASE_MODEL}} with the per-layer MLP
# widths and dropped MLP sub-layers of an effir-pruned model.
"""{{MODEL_CLASS}}: ``{{BASE_MODEL}}`` whose layer ``i`` has an MLP
(``{{INTERMEDIATE_MODULE}}`` and ``{{OUTPUT_MODULE}}``) of width ``config.effir_intermediate_sizes[i]``,
or none at all where that is ``None``. A dropped MLP sub-layer takes its
residual LayerNorm along, so the layer's output is its attention output, as
effir computes it. Load with
``AutoModel.from_pretrained(path, trust_remote_code=True)`` or
``SentenceTransformer(path, trust_remote_code=True)``."""

import copy

from torch import nn
from transformers import {{BASE_MODEL}}

from .{{CONFIGURATION_MODULE}} import {{CONFIG_CLASS}}

# The layer list, then a layer's MLP: its input projection, and its
# output projection with the residual LayerNorm.
LAYERS = "{{LAYERS}}"
INTERMEDIATE_MODULE = "{{INTERMEDIATE_MODULE}}"
OUTPUT_MODULE = "{{OUTPUT_MODULE}}"


class DroppedIntermediate(nn.Module):
    """The input projection of a dropped MLP: nothing to compute."""

    def forward(self, hidden_states):
        return hidden_states


class DroppedOutput(nn.Module):
    """The output of a dropped MLP: the attention output, unchanged (no
    projection, no residual LayerNorm)."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


class {{MODEL_CLASS}}({{BASE_MODEL}}):
    config_class = {{CONFIG_CLASS}}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        widths = getattr(config, "effir_intermediate_sizes", None)
        if widths is None:
            return
        layers = self.get_submodule(LAYERS)
        if len(widths) != len(layers):
            raise ValueError(
                f"effir_intermediate_sizes has {len(widths)} entries; the model has {len(layers)} layers"
            )
        for layer, width in zip(layers, widths):
            if width is None:
                setattr(layer, INTERMEDIATE_MODULE, DroppedIntermediate())
                setattr(layer, OUTPUT_MODULE, DroppedOutput())
            elif width != config.intermediate_size:
                layer_config = copy.copy(config)
                layer_config.intermediate_size = width
                for module in (INTERMEDIATE_MODULE, OUTPUT_MODULE):
                    setattr(layer, module, type(getattr(layer, module))(layer_config))

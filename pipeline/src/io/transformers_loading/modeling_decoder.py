# Written by effir {{EFFIR_VERSION}}: {{BASE_MODEL}} with the per-layer MLP
# widths and dropped MLP sub-layers of an effir-pruned model.
"""{{MODEL_CLASS}}: ``{{BASE_MODEL}}`` whose layer ``i`` has an MLP of width
``config.effir_intermediate_sizes[i]``, or none at all where that is
``None``. A dropped MLP sub-layer takes its norms along
({{MLP_NORMS_TEXT}}), so the layer passes the residual stream on unchanged
after attention, as effir computes it. Load with
``AutoModel.from_pretrained(path, trust_remote_code=True)`` or
``SentenceTransformer(path, trust_remote_code=True)``."""

import copy

import torch
from torch import nn
from transformers import {{BASE_MODEL}}

from .{{CONFIGURATION_MODULE}} import {{CONFIG_CLASS}}

# The layer list, a layer's MLP module, and the norms that belong to its
# sub-layer.
LAYERS = "{{LAYERS}}"
MLP_MODULE = "{{MLP_MODULE}}"
MLP_NORMS = {{MLP_NORMS}}


class DroppedMlp(nn.Module):
    """An MLP sub-layer effir removed: it adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


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
                setattr(layer, MLP_MODULE, DroppedMlp())
                for norm in MLP_NORMS:
                    setattr(layer, norm, nn.Identity())
            elif width != config.intermediate_size:
                layer_config = copy.copy(config)
                layer_config.intermediate_size = width
                setattr(layer, MLP_MODULE, type(getattr(layer, MLP_MODULE))(layer_config))

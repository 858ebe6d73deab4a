"""Adapters: how the model is parameterised for training (``cfg.adapter``), through peft.

- ``configs.py``  lora, rslora, dora, pissa, loraplus, adalora, loraga as peft configs; ``apply_adapter``
- ``loraga.py``   LoRA-GA's gradient-estimated start and its stored initial adapter
- ``hooks.py``    per-step duties of an adapter (AdaLoRA's regulariser and rank allocation)
- ``layers.py``   the adapted layers seen as low-rank maps, and ``layer_name``, the one way a layer is named
"""

from dynamics.adapters.configs import apply_adapter, peft_config
from dynamics.adapters.hooks import AdapterHooks, adapter_hooks
from dynamics.adapters.layers import AdapterLayer, adapter_layers, layer_name
from dynamics.adapters.loraga import LoraGASource, load_initial, save_initial

__all__ = ["AdapterHooks", "AdapterLayer", "LoraGASource", "adapter_hooks", "adapter_layers",
           "apply_adapter", "layer_name", "load_initial", "peft_config", "save_initial"]

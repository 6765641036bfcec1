"""Export an adapter in peft's own format, loadable with peft alone (no avalanche-merge needed).

``export_peft_adapter(model, "task0", folder)`` writes what ``PeftModel.save_pretrained`` writes for a LoRA:
``adapter_config.json`` (a ``peft.LoraConfig``: rank, alpha, dropout, the adapted layers as
``target_modules``) and ``adapter_model.safetensors`` (``base_model.model.<layer>.lora_A.weight`` /
``lora_B.weight``). Load it with ``peft.PeftModel.from_pretrained(base_model, folder)``, or inject it into a plain
model with ``peft.inject_adapter_in_model`` + ``peft.set_peft_model_state_dict`` (keys without the
``base_model.model.`` prefix).

The ``lora_B`` written is the *effective* one, what peft's forward multiplies (SD-LoRA's magnitude and
normalisation, CL-LoRA's block weights applied), so the exported adapter adds exactly the learner's
``scaling * B A``. What a plain LoRA cannot hold is not exported: the routed learners' transfer gates between
adapters (export each adapter alone), heads (save them with the model). When the learner split fused attention
(open_clip's ``nn.MultiheadAttention``, timm's ``qkv``; :func:`avalanche_merge.models.attention.split_attention`),
the adapter names the split layers: split the base model the same way before loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapters import lora_layers

PREFIX = "base_model.model."


def peft_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` as peft's saved state dict (``base_model.model.<layer>.lora_A.weight`` ...), detached.

    Raises:
        ValueError: the model has no adapter ``name``.
    """
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer_name, layer in lora_layers(model).items():
            if name not in layer.lora_A:
                continue
            key = layer_name[len(PREFIX):] if layer_name.startswith(PREFIX) else layer_name
            state[f"{PREFIX}{key}.lora_A.weight"] = layer.lora_A[name].weight.detach().clone().contiguous()
            state[f"{PREFIX}{key}.lora_B.weight"] = layer.lora_B[name].weight.detach().clone().contiguous()
    if not state:
        raise ValueError(f"the model has no adapter named {name!r}; adapters: "
                         f"{sorted({a for layer in lora_layers(model).values() for a in layer.lora_A})}")
    return state


def export_peft_adapter(model: nn.Module, name: str, folder: str | Path, *,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``folder`` in peft's ``save_pretrained`` format; return the folder.

    Raises:
        ValueError: no adapter ``name``, or its layers disagree on rank / alpha / dropout (peft's config holds one
            value of each for the whole adapter).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    state = peft_state(model, name)
    layers = {n: layer for n, layer in lora_layers(model).items() if name in layer.lora_A}
    ranks = {layer.r[name] for layer in layers.values()}
    alphas = {layer.lora_alpha[name] for layer in layers.values()}
    dropouts = {getattr(layer.lora_dropout[name], "p", 0.0) for layer in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1 or len(dropouts) > 1:
        raise ValueError(f"adapter {name!r}: layers differ in rank {ranks}, alpha {alphas} or dropout {dropouts}")
    targets = sorted({n[len(PREFIX):] if n.startswith(PREFIX) else n for n in layers})
    config = LoraConfig(r=ranks.pop(), lora_alpha=alphas.pop(), lora_dropout=dropouts.pop(),
                        target_modules=targets, base_model_name_or_path=base_model_name_or_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((folder / "adapter_config.json").read_text())
    if meta.get("peft_type") != "LORA":
        raise RuntimeError(f"peft wrote an unexpected config {meta}")
    return folder

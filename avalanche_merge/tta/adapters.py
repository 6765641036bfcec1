"""AdaptFormer-style parallel adapters, a cosine prototype head and running class means (pure torch).

TTACIL (Marouf et al., "Rethinking Class-incremental Learning in the Era of Large Pre-trained Models via
Test-Time Adaptation", arXiv 2310.11482; thinh-huynh-re/TTACIL) trains adapters in the style of AdaptFormer
(Chen et al., NeurIPS 2022) on the first experience only. The reference's adapter (``convs/
vision_transformer_adapter.py``, configured in ``utils/inc_net.py``) sits in parallel to each block's MLP:

    x_mid = x + attn(norm1(x));   out = x_mid + mlp(norm2(x_mid)) + s * up(relu(down(x_mid)))

with ``s = 0.1`` (``ffn_adapter_scalar``), no LayerNorm inside the adapter (``ffn_adapter_layernorm_option
"none"``), dropout 0.1 after the ReLU, ``down`` initialised Kaiming-uniform (a = sqrt 5), ``up`` and both biases
zero (``init_option "lora"``), so the adapted model starts equal to the pretrained one.

:func:`attach_parallel_adapters` adds an :class:`ParallelAdapter` to every block of a model without changing its
class: it registers the adapter as the block's ``adaptmlp`` submodule and two hooks, one capturing the input of
the block's pre-MLP norm (``x_mid``) and one adding ``s * adapter(x_mid)`` to the MLP's output. Blocks are found
by their pre-MLP norm and MLP output names: ``norm2``/``fc2`` (:class:`~avalanche_merge.models.vit.Block`) or
``ln_2``/``mlp`` (open_clip's ``ResidualAttentionBlock``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

#: (pre-MLP norm, MLP output) submodule names of the block types adapters attach to
BLOCK_LAYOUTS = (("norm2", "fc2"), ("ln_2", "mlp"))


class ParallelAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))``; starts at exactly 0 (``up`` is zero-initialised).

    Args:
        dim: token width.
        bottleneck: hidden width, >= 1.
        scale: fixed output multiplier (the reference's 0.1).
        dropout: dropout after the ReLU (the reference's 0.1).
    """

    def __init__(self, dim: int, bottleneck: int, *, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        self.dropout = float(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(h) * self.scale


def attach_parallel_adapters(model: nn.Module, *, bottleneck: int, scale: float = 0.1,
                             dropout: float = 0.1) -> list[RemovableHandle]:
    """Add a :class:`ParallelAdapter` to every transformer block of ``model`` (see the module doc).

    Returns:
        The hook handles (``handle.remove()`` detaches the hooks; the ``adaptmlp`` submodules stay).

    Raises:
        ValueError: no block with a known layout, or ``bottleneck`` < 1.
    """
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck must be an int >= 1, got {bottleneck!r}")
    handles: list[RemovableHandle] = []
    for _, block in list(model.named_modules()):
        for norm_name, out_name in BLOCK_LAYOUTS:
            norm, out = getattr(block, norm_name, None), getattr(block, out_name, None)
            if not (isinstance(norm, nn.LayerNorm) and isinstance(out, nn.Module)):
                continue
            dim = norm.normalized_shape[-1]
            adapter = ParallelAdapter(dim, bottleneck, scale=scale, dropout=dropout)
            block.adaptmlp = adapter.to(next(norm.parameters()).device).train(block.training)
            handles.extend(_hook(block, norm, out))
            break
    if not handles:
        raise ValueError(f"found no transformer block in {type(model).__name__}: adapters attach to blocks with "
                         f"{' or '.join(f'{a!r} + {b!r}' for a, b in BLOCK_LAYOUTS)} submodules")
    return handles


def _hook(block: nn.Module, norm: nn.Module, out: nn.Module) -> list[RemovableHandle]:
    state: dict[str, torch.Tensor] = {}

    def keep_input(_module, args):
        state["x"] = args[0]

    def add_adapter(_module, _args, output):
        return output + block.adaptmlp(state.pop("x"))

    return [norm.register_forward_pre_hook(keep_input), out.register_forward_hook(add_adapter)]


class CosineHead(nn.Module):
    """``sigma * cos(features, W_c)`` for every class row ``W_c``: the reference's ``CosineLinear``.

    ``sigma`` is a learnable scalar initialised to 1, as in the reference. Rows that are all zero (classes without
    a prototype yet) give cosine 0.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        self.sigma = nn.Parameter(torch.ones(1))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


class ClassMeans:
    """Exact running class means of features (float64 sums and counts): the prototypes TTACIL appends.

    A class met again in a later experience (domain-incremental streams) is averaged over all its samples.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of ``(n, dim)`` features with their ``(n,)`` labels."""
        f = features.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu", torch.long)
        self.sums.index_add_(0, y, f)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def means(self) -> torch.Tensor:
        """``(num_classes, dim)`` means; zero rows for classes never seen."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def seen(self) -> list[int]:
        return self.counts.nonzero().flatten().tolist()

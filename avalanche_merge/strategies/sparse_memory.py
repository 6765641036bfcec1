"""Registration of sparse memory fine-tuning (Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025).

Method ``sparse_memory`` (family ``"sparse"``): Avalanche's ``Naive`` with
:class:`~avalanche_merge.plugins.sparse_memory.SparseMemoryPlugin`. The memory is inserted into ``ctx.model``
before the strategy is built, so the pretrained evaluation already runs through it (a no-op with zero values).
"""

from __future__ import annotations

from avalanche.training import Naive

from ..plugins.sparse_memory import SparseMemoryOptions, SparseMemoryPlugin
from .registry import BuildContext, register_method


@register_method("sparse_memory", config_cls=SparseMemoryOptions, family="sparse",
                 protocols=("shared", "masked", "frozen"),
                 description="sparse memory fine-tuning: TF-IDF top-t rows of a product-key memory (Lin et al. 2025)")
def build_sparse_memory(ctx: BuildContext, cfg: SparseMemoryOptions) -> Naive:
    plugin = SparseMemoryPlugin(cfg)
    finetuner = plugin.setup(ctx.model)
    optimizer = finetuner.make_optimizer()
    return Naive(model=ctx.model, optimizer=optimizer, **ctx.strategy_kwargs([plugin]))

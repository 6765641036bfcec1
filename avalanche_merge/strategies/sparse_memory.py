"""Registration of sparse memory fine-tuning (Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025).

Method ``sparse_memory`` (family ``"sparse"``): Avalanche's ``Naive`` with
:class:`~avalanche_merge.plugins.sparse_memory.SparseMemoryPlugin`. The memory is inserted into ``ctx.model``
before the strategy is built, so the pretrained evaluation already runs through it (a no-op with zero values).
With ``background="pretrain"`` the TF-IDF background is the offline TinyViT's pretraining pool (MNIST 5k, 150 images
per digit, disjoint from every stream; :func:`~avalanche_merge.benchmarks.data.mnist_pretrain_pool`), resized to
the benchmark's input shape as the pretraining does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.training import Naive

from ..plugins.sparse_memory import SparseMemoryOptions, SparseMemoryPlugin
from .registry import BuildContext, register_method


@register_method("sparse_memory", config_cls=SparseMemoryOptions, family="sparse",
                 protocols=("shared", "masked", "frozen"),
                 description="sparse memory fine-tuning: TF-IDF top-t rows of a product-key memory (Lin et al. 2025)")
def build_sparse_memory(ctx: BuildContext, cfg: SparseMemoryOptions) -> Naive:
    pretrain = pretrain_background_inputs(ctx.benchmark.input_shape) if cfg.uses_pretrain else None
    plugin = SparseMemoryPlugin(options=cfg, pretrain_inputs=pretrain, document_size=ctx.train.batch_size)
    finetuner = plugin.setup(ctx.model)
    optimizer = finetuner.make_optimizer()
    return Naive(model=ctx.model, optimizer=optimizer, **ctx.strategy_kwargs([plugin]))


def pretrain_background_inputs(input_shape: tuple[int, ...]) -> torch.Tensor:
    """The TinyViT pretraining pool at ``input_shape`` ``(C, H, W)``, in a fixed shuffled order (seed 0).

    Raises:
        ValueError: ``input_shape`` is not an image shape with 1 or 3 channels.
    """
    from ..benchmarks.data import mnist_pretrain_pool

    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"background='pretrain' uses the MNIST pretraining pool and needs (1|3, H, W) image inputs, "
                         f"the benchmark's inputs have shape {shape}; pass pretrain_inputs to SparseMemoryPlugin")
    x, _ = mnist_pretrain_pool()
    if tuple(x.shape[1:]) != shape:
        x = F.interpolate(x, size=shape[1:], mode="bilinear").repeat(1, shape[0], 1, 1)
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]

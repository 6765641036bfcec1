"""``SparseMemoryPlugin``: sparse memory fine-tuning (Lin et al., arXiv 2510.15103, 2025) inside any Avalanche strategy.

The maths lives in :mod:`avalanche_merge.sparse.memory` / :mod:`avalanche_merge.sparse.tfidf`; the plugin maps
Avalanche's callbacks to :class:`~avalanche_merge.sparse.memory.SparseMemoryFinetuner`:

- :meth:`SparseMemoryPlugin.setup` (called by the registered builder, else at ``before_training``): insert a
  zero-initialised product-key memory after the chosen block (default: the last), freeze the rest of the model;
- ``before_training_exp``: replace the strategy's optimizer by the configured one (AdamW 1e-2 by default here;
  the core's default is the paper's SGD) over the value
  table and, with ``train_head``, the classification head (Avalanche's ``make_optimizer`` would add every frozen
  parameter);
- ``after_forward``: keep the batch's memory accesses; ``after_backward``: TF-IDF top-``t`` selection and gradient
  mask; ``before_update`` / ``after_update``: snapshot and restore of the unselected rows (exact with any optimizer);
- background (``background`` option): with ``"pretrain"`` (Lin et al.), the accesses of up to
  ``background_samples`` pretraining inputs are counted once at setup, one TF-IDF document per batch of
  ``background_batch_size`` inputs; with ``"stream"``, at ``after_training_exp`` the accesses of up to
  ``background_samples`` inputs of the experience just trained join the background set, so later experiences avoid
  the slots it relies on; ``"both"`` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin

from ..config import check_range
from ..sparse.memory import (
    MemoryConfig,
    ProductKeyMemory,
    SparseMemoryConfig,
    SparseMemoryFinetuner,
    infer_block_dim,
    insert_memory,
    resolve_block,
)
from .lora import experience_inputs

BACKGROUNDS = ("stream", "pretrain", "both")


@dataclass(kw_only=True)
class SparseMemoryOptions:
    """Options of the ``sparse_memory`` method (memory shape, selection, optimisation, background).

    Defaults are sized for small models (TinyViT dim 16-64): 1024 slots, 4 heads x 8 reads per token, 64 rows
    updated per batch (about 6% of the slots; Lin et al. update 500-10k of 1M). The head is trained (a
    class-incremental head starts untrained); set ``train_head=None`` to train only memory values as in the paper.

    The optimizer defaults to AdamW at 1e-2, not the paper's SGD: head and values share Avalanche's single
    parameter group, and no single SGD rate suits both a fresh head and zero-initialised values (matrix run,
    1-block TinyViT, diagonal accuracy of experience 0: SGD 0.5 -> 0.20, SGD 0.05 + momentum 0.9 -> 0.34,
    AdamW 1e-2 -> 0.46). Unselected rows stay bit-identical with any optimizer (snapshot and restore).

    Args:
        block: the block after which the memory is inserted: an index into the model's block list (default -1, the
            last) or a module name (``"blocks.0"``, ``"encoder.layer.5"``).
        where: ``"input"`` (default here: a residual branch on the block's input, before its attention) or
            ``"output"`` (after its MLP). After the last block of a ViT only the class token reaches the head, so an
            output memory there makes one read per image from a nearly image-independent query and cannot learn
            (measured on the matrix's 1-block TinyViT: diagonal accuracy 0.20, chance); on the input side every
            patch token reads the memory and the class token attends to the results.
        n_keys, key_dim, heads, top_k, query_batchnorm, value_init, value_std: see
            :class:`~avalanche_merge.sparse.memory.MemoryConfig`.
        top_t, density, lr, optimizer, momentum, weight_decay, only_with_grad, train_head: see
            :class:`~avalanche_merge.sparse.memory.SparseMemoryConfig`.
        background_samples: inputs added to the TF-IDF background per source, >= 0: per trained experience
            (``"stream"``), and from the pretraining data once (``"pretrain"``); 0 with ``"stream"``: no background,
            slots are ranked by batch frequency only.
        background: what the TF-IDF background documents are: ``"stream"`` (default: inputs of the experiences
            trained so far), ``"pretrain"`` (Lin et al.: batches of the pretraining data, fixed before
            fine-tuning; the registered method uses the tiny ViT's MNIST pretraining pool, other callers pass
            ``pretrain_inputs`` to the plugin) or ``"both"``.
        background_batch_size: inputs per background document, >= 1; ``None``: the training mini-batch size (Lin
            et al. count one document per batch).

    Regime: protection needs the slots a new batch updates to be rarely read by the background. With the defaults
    (1024 slots, every batch of 32 images x 17 tokens makes 17,408 reads) nearly every slot is read by every
    document and the idf cannot separate them; :data:`PAPER_REGIME` is a config measured to be in the regime on the
    bench TinyViT (``experiments/sparse_memory_regime.py``).
    """

    block: int | str = -1
    where: Literal["output", "input"] = "input"
    n_keys: int = 32
    key_dim: int = 32
    heads: int = 4
    top_k: int = 8
    query_batchnorm: bool = False
    value_init: Literal["zero", "normal"] = "zero"
    value_std: float = 0.02
    top_t: int = 64
    density: float | None = None
    lr: float = 1e-2
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    only_with_grad: bool = True
    train_head: str | None = "auto"
    background_samples: int = 256
    background: Literal["stream", "pretrain", "both"] = "stream"
    background_batch_size: int | None = None

    def __post_init__(self) -> None:
        memory = self.memory_config(1)  # validates the memory fields (input_dim is known only at insertion)
        self.finetune_config()
        if self.density is None and self.top_t > memory.n_slots:
            raise ValueError(f"top_t must be in [1, n_keys**2 = {memory.n_slots}] (rows updated per batch cannot "
                             f"exceed the memory's slots), got {self.top_t}")
        if isinstance(self.background_samples, bool) or not isinstance(self.background_samples, int):
            raise TypeError(f"background_samples must be an int, got {type(self.background_samples).__name__}")
        check_range("background_samples", self.background_samples, 0)
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if self.background != "stream" and self.background_samples == 0:
            raise ValueError(f"background={self.background!r} needs background_samples >= 1 pretraining inputs, "
                             "got 0")
        if self.background_batch_size is not None:
            if isinstance(self.background_batch_size, bool) or not isinstance(self.background_batch_size, int):
                raise TypeError(f"background_batch_size must be an int or None, got "
                                f"{type(self.background_batch_size).__name__}")
            check_range("background_batch_size", self.background_batch_size, 1)

    @property
    def uses_pretrain(self) -> bool:
        return self.background in ("pretrain", "both")

    @property
    def uses_stream(self) -> bool:
        return self.background in ("stream", "both") and self.background_samples > 0

    def memory_config(self, input_dim: int) -> MemoryConfig:
        names = {f.name for f in fields(MemoryConfig)} - {"input_dim", "output_dim"}
        return MemoryConfig(input_dim=input_dim, **{n: getattr(self, n) for n in names})

    def finetune_config(self) -> SparseMemoryConfig:
        return SparseMemoryConfig(**{f.name: getattr(self, f.name) for f in fields(SparseMemoryConfig)})


class SparseMemoryPlugin(SupervisedPlugin):
    """Train only TF-IDF-selected memory value rows (and the head) inside any ``SupervisedTemplate``.

    The plugin replaces the strategy's optimizer by the configured one (``options.optimizer``, ``lr``, ...) over
    the memory values and head, at every experience: the user's optimizer and its parameter groups are not used.

    Args:
        options: a :class:`SparseMemoryOptions` or a dict of its fields; ``kwargs`` are more fields (an unknown
            field raises a ``ValueError`` listing the valid ones).
        pretrain_inputs: inputs of the model's pretraining data (needed when ``options.background`` is
            ``"pretrain"`` or ``"both"``); the first ``background_samples`` form the background.
        document_size: inputs per background document when ``options.background_batch_size`` is None (the
            registered builder passes the training batch size; default: the strategy's ``train_mb_size``).
    """

    def __init__(self, *, options: SparseMemoryOptions | dict | None = None,
                 pretrain_inputs: torch.Tensor | None = None, document_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(options, SparseMemoryOptions):
            if kwargs:
                raise ValueError(f"give the options either as a SparseMemoryOptions or as keywords, not both "
                                 f"(got {sorted(kwargs)})")
        else:
            kwargs = {**(options or {}), **kwargs}
            valid = sorted(f.name for f in fields(SparseMemoryOptions))
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise ValueError(f"unknown option {unknown[0]!r} for sparse_memory; valid: {valid}")
            options = SparseMemoryOptions(**kwargs)
        self.options = options
        if self.options.uses_pretrain and pretrain_inputs is None:
            raise ValueError(f"background={self.options.background!r} needs pretrain_inputs (the pretraining data)")
        self.pretrain_inputs = pretrain_inputs
        self.document_size = document_size
        self.finetuner: SparseMemoryFinetuner | None = None
        self._indices: torch.Tensor | None = None

    def _document_size(self, strategy: Any = None) -> int:
        size = self.options.background_batch_size or self.document_size
        if size is None:
            size = getattr(strategy, "train_mb_size", None) or 32
        return int(size)

    @property
    def memory(self) -> ProductKeyMemory | None:
        return None if self.finetuner is None else self.finetuner.memory

    def setup(self, model: torch.nn.Module) -> SparseMemoryFinetuner:
        """Insert the memory into ``model`` (once) and freeze everything but the trained parameters."""
        if self.finetuner is not None:
            if self.finetuner.model is not model:
                raise RuntimeError("SparseMemoryPlugin is bound to another model; use one plugin per strategy")
            return self.finetuner
        _, block = resolve_block(model, self.options.block)
        memory = getattr(block, "memory", None)
        if not isinstance(memory, ProductKeyMemory):
            memory = insert_memory(model, self.options.block, where=self.options.where,
                                   config=self.options.memory_config(infer_block_dim(model, block)))
        self.finetuner = SparseMemoryFinetuner(model, memory, config=self.options.finetune_config())
        self.finetuner.freeze()
        if self.options.uses_pretrain:
            ref = next(model.parameters())
            inputs = self.pretrain_inputs[: self.options.background_samples].to(ref.device)
            self.finetuner.observe_documents(inputs, self._document_size())
        return self.finetuner

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.setup(strategy.model)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        finetuner = self.finetuner
        params = finetuner.freeze()
        strategy.optimizer = finetuner.make_optimizer(params)
        ids = {id(p) for p in params}
        strategy.optimized_param_id = {n: p for n, p in strategy.model.named_parameters() if id(p) in ids}

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._indices = self.finetuner.memory.last_indices

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.finetuner.after_backward(self._indices)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self.finetuner.before_step()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.finetuner.after_step()
        self._indices = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.options.uses_stream:
            return
        batches = experience_inputs(strategy, self.options.background_samples, seed=strategy.clock.train_exp_counter)
        if batches:
            self.finetuner.observe_documents(torch.cat(batches), self._document_size(strategy))


#: A configuration in the regime of Lin et al. on the bench TinyViT (measured by
#: ``experiments/sparse_memory_regime.py``): a large memory read sparsely, few rows per batch, a pretraining background.
PAPER_REGIME: dict = {"n_keys": 256, "heads": 4, "top_k": 8, "top_t": 64, "background": "pretrain",
                      "background_samples": 1500}

"""Product-key memory layers and sparse memory fine-tuning (pure torch; no Avalanche import).

- :class:`ProductKeyMemory`: the key-value memory of Lample et al., "Large Memory Layers with Product Keys"
  (NeurIPS 2019). A query ``q(x)`` is split in two halves scored against two sets of ``n_keys`` sub-keys;
  slot ``(i, j)`` has score ``s1[i] + s2[j]``, so the global top-k lies in the cartesian product of the two
  per-half top-k's and only ``2 n_keys + k^2`` scores are computed for ``n_keys^2`` slots. The output is the
  softmax(top-k scores)-weighted sum of the selected value rows, summed over heads.
- :func:`dense_reference`: the same output from scoring every slot explicitly (a test oracle).
- :func:`insert_memory`: a memory as a residual branch after a transformer block (TinyViT, BERT/MiniLM).
- :class:`SparseMemoryFinetuner`: sparse memory fine-tuning (Lin et al., "Continual Learning via Sparse Memory
  Finetuning", arXiv 2510.15103, 2025): per batch, only the ``top_t`` value rows ranked by TF-IDF of their
  accesses against a background set (:mod:`.tfidf`) are updated; every other weight is frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_range
from .tfidf import BackgroundCounts, slot_counts, tfidf_scores, top_slots


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(kw_only=True)
class MemoryConfig:
    """Shape of a :class:`ProductKeyMemory`.

    Args:
        input_dim: width of the input tokens, >= 1.
        output_dim: width of the value rows (the output); ``None`` means ``input_dim`` (a residual branch).
        n_keys: sub-keys per half, >= 1; the memory has ``n_keys ** 2`` slots.
        key_dim: query/key width per head, even (each half has ``key_dim // 2``).
        heads: memory heads (independent queries over a shared value table), >= 1.
        top_k: slots read per head and token, in ``[1, n_keys ** 2]``.
        query_batchnorm: batch-normalise the queries (Lample et al. use it; off by default: the inserted layer
            would otherwise change with batch statistics and not be a function of the token alone).
        value_init: ``"zero"`` (the layer starts as an exact no-op, like LoRA's zero ``B``) or ``"normal"``
            (``N(0, value_std^2)``, Lample et al. use ``N(0, d^-1/2)``-scale values when training from scratch).
        value_std: standard deviation of ``value_init="normal"``, > 0.
    """

    input_dim: int
    output_dim: int | None = None
    n_keys: int = 32
    key_dim: int = 32
    heads: int = 4
    top_k: int = 8
    query_batchnorm: bool = False
    value_init: Literal["zero", "normal"] = "zero"
    value_std: float = 0.02

    def __post_init__(self) -> None:
        _check_int("input_dim", self.input_dim)
        if self.output_dim is None:
            self.output_dim = self.input_dim
        _check_int("output_dim", self.output_dim)
        _check_int("n_keys", self.n_keys)
        _check_int("key_dim", self.key_dim, 2)
        if self.key_dim % 2:
            raise ValueError(f"key_dim must be even (two halves of product keys), got {self.key_dim}")
        _check_int("heads", self.heads)
        _check_int("top_k", self.top_k)
        if self.top_k > self.n_slots:
            raise ValueError(f"top_k must be in [1, n_keys**2 = {self.n_slots}], got {self.top_k}")
        if self.value_init not in ("zero", "normal"):
            raise ValueError(f"value_init must be 'zero' or 'normal', got {self.value_init!r}")
        check_range("value_std", self.value_std, 0.0, None, low_open=True)

    @property
    def n_slots(self) -> int:
        return self.n_keys**2


class ProductKeyMemory(nn.Module):
    """Product-key memory ``x [..., input_dim] -> [..., output_dim]`` (Lample et al., NeurIPS 2019).

    After every forward, ``last_indices`` (``[tokens, heads, top_k]`` slot ids, ``long``) and ``last_weights``
    (their softmax weights) hold the accesses of that call, detached; ``hooks`` (callables
    ``hook(indices, weights)``) are called with them, e.g. to accumulate background counts.

    Attributes:
        query: linear map to ``heads * key_dim`` queries.
        keys: sub-keys, ``[heads, 2, n_keys, key_dim // 2]`` (frozen by sparse memory fine-tuning).
        values: the value table, an ``nn.Embedding(n_keys ** 2, output_dim)``.
    """

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        half = c.key_dim // 2
        self.query = nn.Linear(c.input_dim, c.heads * c.key_dim)
        self.query_bn = nn.BatchNorm1d(c.heads * c.key_dim) if c.query_batchnorm else None
        # Lample et al. initialise keys uniformly on a sphere-like box of radius 1/sqrt(half)
        bound = 1.0 / math.sqrt(half)
        self.keys = nn.Parameter(torch.empty(c.heads, 2, c.n_keys, half).uniform_(-bound, bound))
        self.values = nn.Embedding(c.n_slots, c.output_dim)
        with torch.no_grad():
            if c.value_init == "zero":
                self.values.weight.zero_()
            else:
                self.values.weight.normal_(0.0, c.value_std)
        self.last_indices: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.hooks: list = []

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    def half_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-key scores ``s1, s2`` of shape ``[tokens, heads, n_keys]`` for flattened tokens ``x``."""
        c = self.config
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(x.shape[0], c.heads, 2, c.key_dim // 2)
        s1 = torch.einsum("nhd,hkd->nhk", q[:, :, 0], self.keys[:, 0])
        s2 = torch.einsum("nhd,hkd->nhk", q[:, :, 1], self.keys[:, 1])
        return s1, s2

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores, slot indices)``, each ``[tokens, heads, top_k]``, via the product-key search."""
        c = self.config
        s1, s2 = self.half_scores(x)
        k_half = min(c.top_k, c.n_keys)
        v1, i1 = s1.topk(k_half, dim=-1)
        v2, i2 = s2.topk(k_half, dim=-1)
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [n, h, k_half^2]
        cand_idx = (i1.unsqueeze(-1) * c.n_keys + i2.unsqueeze(-2)).flatten(-2)
        scores, pos = cand.topk(c.top_k, dim=-1)
        return scores, cand_idx.gather(-1, pos)

    def read(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Softmax-weighted sum of the selected value rows over top-k and heads, ``[tokens, output_dim]``."""
        weights = F.softmax(scores, dim=-1)
        self.last_indices = indices.detach()
        self.last_weights = weights.detach()
        for hook in self.hooks:
            hook(self.last_indices, self.last_weights)
        rows = self.values(indices)  # [n, h, k, d]
        return (weights.unsqueeze(-1) * rows).sum(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.shape[-1] != c.input_dim:
            raise ValueError(f"expected inputs with last dimension {c.input_dim}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, c.input_dim)
        out = self.read(*self.lookup(flat))
        return out.view(*x.shape[:-1], c.output_dim)


def dense_reference(memory: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """``memory(x)`` computed by scoring all ``n_keys ** 2`` slots (``s1[i] + s2[j]``) and a global top-k.

    A test oracle for the product-key search (exact up to float rounding); memory use is ``tokens * slots``.
    """
    c = memory.config
    flat = x.reshape(-1, c.input_dim)
    s1, s2 = memory.half_scores(flat)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # slot i * n_keys + j
    scores, indices = full.topk(c.top_k, dim=-1)
    return memory.read(scores, indices).view(*x.shape[:-1], c.output_dim)


def _memory_residual_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of a block with an inserted memory: ``h -> h + memory(h)`` on its (first) output."""
    memory = module.memory
    if isinstance(output, torch.Tensor):
        return output + memory(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] + memory(output[0]), *output[1:])
    raise TypeError(f"cannot add a memory to a block returning {type(output).__name__}")


def _memory_input_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook of a block with an input memory: its (first) input ``h -> h + memory(h)``."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0] + module.memory(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h + module.memory(h)}
    raise TypeError("cannot find the hidden states among the block's inputs")


def resolve_block(model: nn.Module, block: int | str) -> tuple[str, nn.Module]:
    """The ``(name, module)`` of a transformer block: a dotted module name, or an int index into ``blocks``
    (TinyViT), ``encoder.layer`` (BERT/MiniLM, also under a wrapper's ``model.``) or ``transformer.resblocks``."""
    modules = dict(model.named_modules())
    if isinstance(block, str):
        if block not in modules or block == "":
            containers = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise ValueError(f"block {block!r} is not a module of {type(model).__name__}; "
                             f"block lists: {containers[:6]}")
        return block, modules[block]
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int or a module name, got {type(block).__name__}")
    for prefix in ("blocks", "encoder.layer", "model.encoder.layer", "transformer.resblocks"):
        container = modules.get(prefix)
        if isinstance(container, nn.ModuleList):
            n = len(container)
            if not -n <= block < n:
                raise ValueError(f"block must be in [{-n}, {n - 1}] for {prefix} of {n} blocks, got {block}")
            return f"{prefix}.{block % n}", container[block]
    raise ValueError(f"{type(model).__name__} has no block list (blocks, encoder.layer, transformer.resblocks); "
                     "pass the block's module name")


def insert_memory(model: nn.Module, block: int | str = -1, *, config: MemoryConfig | None = None,
                  where: Literal["output", "input"] = "output", **options: Any) -> ProductKeyMemory:
    """Insert a :class:`ProductKeyMemory` as a residual branch ``h -> h + mem(h)`` on transformer ``block``.

    The memory becomes the submodule ``<block>.memory``; with ``where="output"`` (default) a forward hook adds its
    output to the block's output (after the MLP; for BERT layers, after the output LayerNorm), with
    ``where="input"`` a forward pre-hook adds it to the block's input (before the attention, so every token's read
    reaches the class token through attention; for ``block > 0`` this is the output of the previous block).
    Every existing parameter keeps its name and pretrained checkpoints still load. Lin et al. (2025) fine-tune
    models pretrained with memory layers (Berges et al., 2024) and prescribe no initialisation for retrofitting;
    here values start at zero by default, so the model's function is exactly unchanged until the values are
    trained (like LoRA's ``B = 0``); keys and queries are random and stay frozen (a fixed random addressing).

    Args:
        model: the transformer (modified in place).
        block: the block's module name (``"blocks.0"``, ``"encoder.layer.5"``) or an index (default: the last).
        where: ``"output"`` (after the block) or ``"input"`` (before it).
        config: the memory's shape; built from ``options`` when ``None`` (``input_dim`` is inferred from the
            block's ``fc2``/``output.dense`` layer or the model's ``config.dim``/``hidden_size`` if not given).

    Raises:
        ValueError: no such block, or the block already holds a memory.
    """
    name, module = resolve_block(model, block)
    if hasattr(module, "memory"):
        raise ValueError(f"block {name!r} already has a 'memory' attribute")
    if config is None:
        options.setdefault("input_dim", infer_block_dim(model, module))
        config = MemoryConfig(**options)
    elif options:
        raise ValueError(f"give config or options, not both (got {sorted(options)})")
    memory = ProductKeyMemory(config)
    ref = next(module.parameters(), None)
    if ref is not None:
        memory.to(device=ref.device, dtype=ref.dtype)
    module.memory = memory
    if where == "output":
        module.register_forward_hook(_memory_residual_hook)
    elif where == "input":
        module.register_forward_pre_hook(_memory_input_hook, with_kwargs=True)
    else:
        raise ValueError(f"where must be 'output' or 'input', got {where!r}")
    return memory


def remove_memory(model: nn.Module, block: int | str = -1) -> ProductKeyMemory:
    """Undo :func:`insert_memory` on ``block``; returns the removed memory."""
    name, module = resolve_block(model, block)
    memory = getattr(module, "memory", None)
    if not isinstance(memory, ProductKeyMemory):
        raise ValueError(f"block {name!r} has no inserted memory")
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key, hook in list(hooks.items()):
            if hook in (_memory_residual_hook, _memory_input_hook):
                del hooks[key]
                getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    del module.memory
    return memory


def find_memories(model: nn.Module) -> list[ProductKeyMemory]:
    """Every :class:`ProductKeyMemory` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


def infer_block_dim(model: nn.Module, block: nn.Module) -> int:
    """Output width of a transformer block (its ``fc2`` / ``output.dense`` / ``mlp.c_proj``, or the model config)."""
    for path in ("fc2", "output.dense", "mlp.c_proj", "mlp.fc2"):
        sub = block
        for part in path.split("."):
            sub = getattr(sub, part, None)
        if isinstance(sub, nn.Linear):
            return sub.out_features
    cfg = getattr(model, "config", None)
    for attr in ("dim", "hidden_size"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    raise ValueError(f"cannot infer the width of block {type(block).__name__}; pass input_dim")


@dataclass(kw_only=True)
class SparseMemoryConfig:
    """Sparse memory fine-tuning (Lin et al., 2025).

    Args:
        top_t: value rows updated per batch (the top ``t`` of the batch's accessed slots by TF-IDF), in
            ``[1, n_slots]`` (the upper bound is checked when the finetuner meets its memory).
            Lin et al. update t = 500 to 10k rows of a 1M-slot memory per batch.
        density: alternatively, ``t`` as a fraction of the slots, in (0, 1]; overrides ``top_t`` when given.
        lr: learning rate of :meth:`SparseMemoryFinetuner.make_optimizer`, > 0. Lin et al. use SGD at a large
            rate (values are sparse and start far from the optimum); 0.5 here suits zero-initialised values.
        optimizer: ``"sgd"`` (default, as Lin et al.: sparse rows, no stale moment updates), ``"adam"`` or
            ``"adamw"``. Whatever the optimizer, rows outside the selection are restored bit-identical after the
            step (:meth:`SparseMemoryFinetuner.after_step`).
        momentum: SGD momentum in [0, 1).
        weight_decay: weight decay, >= 0 (never reaches unselected rows, see ``optimizer``).
        only_with_grad: choose only among accessed slots whose value-gradient row is non-zero. Rows read only by
            tokens that do not reach the loss (the patch tokens of a ViT whose head reads the class token, after
            the last block) get no gradient, so spending ``t`` on them would update nothing; ``False`` ranks every
            accessed slot, as in Lin et al.'s language models where every token is a loss position.
        train_head: also train the classification head (``head`` module name, or ``"auto"``); Lin et al. train
            only memory values of a language model whose output layer already fits the task. A class-incremental
            head is fresh, so it must be trained; ``None`` trains only the memory values.
    """

    top_t: int = 64
    density: float | None = None
    lr: float = 0.5
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    only_with_grad: bool = True
    train_head: str | None = "auto"

    def __post_init__(self) -> None:
        _check_int("top_t", self.top_t)
        if self.density is not None:
            check_range("density", self.density, 0.0, 1.0, low_open=True)
        check_range("lr", self.lr, 0.0, None, low_open=True)
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)


    def t_for(self, n_slots: int) -> int:
        """Rows updated per batch for a memory of ``n_slots`` slots."""
        if self.density is not None:
            return max(1, round(self.density * n_slots))
        return self.top_t


class SparseMemoryFinetuner:
    """Sparse memory fine-tuning: train only the ``top_t`` TF-IDF-ranked value rows of each batch.

    Call order per training step (the Avalanche plugin maps them to its callbacks)::

        loss = criterion(model(x), y); loss.backward()
        finetuner.after_backward()   # rank the batch's slots, zero the value-gradient rows not selected
        finetuner.before_step()      # snapshot the value table
        optimizer.step()
        finetuner.after_step()       # restore unselected rows bit-identically (Adam moments, weight decay, momentum)

    With plain SGD (no momentum/decay) the gradient mask alone leaves unselected rows unchanged; the restore makes
    it exact for every optimizer. Background statistics (:meth:`observe_background`) are accumulated per batch
    (a batch is a TF-IDF "document"); with none yet, slots are ranked by batch frequency alone.

    Args:
        model: the model holding ``memory`` (its other parameters are frozen by :meth:`freeze`).
        memory: the inserted memory (default: the only :class:`ProductKeyMemory` in ``model``).
        config: a :class:`SparseMemoryConfig`; ``options`` build one when ``None``.
    """

    def __init__(self, model: nn.Module, memory: ProductKeyMemory | None = None, *,
                 config: SparseMemoryConfig | None = None, **options: Any) -> None:
        if config is None:
            config = SparseMemoryConfig(**options)
        elif options:
            raise ValueError(f"give config or options, not both (got {sorted(options)})")
        if memory is None:
            found = find_memories(model)
            if len(found) != 1:
                raise ValueError(f"model holds {len(found)} ProductKeyMemory modules; pass memory=")
            memory = found[0]
        if config.density is None and config.top_t > memory.n_slots:
            raise ValueError(f"top_t must be in [1, {memory.n_slots}] (the memory's n_keys**2 slots), "
                             f"got {config.top_t}")
        self.model = model
        self.memory = memory
        self.config = config
        self.background = BackgroundCounts(memory.n_slots)
        self.selected: torch.Tensor | None = None  # bool [n_slots] of the last step
        self._snapshot: torch.Tensor | None = None
        self._head_params: list[nn.Parameter] = []

    @property
    def values(self) -> nn.Parameter:
        return self.memory.values.weight

    def freeze(self) -> list[nn.Parameter]:
        """Freeze every parameter except the value table (and the head if ``train_head``); returns the trainable."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.values.requires_grad_(True)
        self._head_params = []
        if self.config.train_head is not None:
            from ..merging.heads import find_head

            head = dict(self.model.named_modules())[find_head(self.model, self.config.train_head)]
            self._head_params = [p for p in head.parameters() if p is not self.values]
            for p in self._head_params:
                p.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The value table, then the head's parameters (if trained)."""
        return [self.values, *self._head_params]

    def make_optimizer(self, params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (default: :meth:`trainable_parameters`)."""
        c = self.config
        params = self.trainable_parameters() if params is None else list(params)
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=c.lr, weight_decay=c.weight_decay)

    @torch.no_grad()
    def observe_background(self, inputs: Any = None) -> None:
        """Add one background document: the memory accesses of ``model(inputs)`` (or of the last forward)."""
        if inputs is not None:
            was = self.model.training
            self.model.eval()
            try:
                self.model(inputs)
            finally:
                self.model.train(was)
        if self.memory.last_indices is None:
            raise RuntimeError("the memory has not been called yet; run a forward pass or pass inputs")
        self.background.add(slot_counts(self.memory.last_indices, self.memory.n_slots))

    def observe_documents(self, inputs: torch.Tensor, document_size: int) -> int:
        """Add ``inputs`` to the background as documents of ``document_size`` inputs each (Lin et al.: a document is
        a batch); a last shorter chunk is a document too. Returns the number of documents added."""
        _check_int("document_size", document_size)
        chunks = inputs.split(document_size)
        for chunk in chunks:
            self.observe_background(chunk)
        return len(chunks)

    def select(self, indices: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
        """Bool mask ``[n_slots]`` of the top-``t`` slots of a batch's accesses (default: the last forward).

        With ``grad`` (the value gradient ``[n_slots, d]``), only slots with a non-zero gradient row are eligible.
        """
        indices = self.memory.last_indices if indices is None else indices
        if indices is None:
            raise RuntimeError("the memory has not been called yet; run a forward pass first")
        counts = slot_counts(indices, self.memory.n_slots)
        scores = tfidf_scores(counts, self.background.df, self.background.n_docs)
        candidates = counts > 0
        if grad is not None:
            candidates &= (grad != 0).any(dim=1).to(candidates.device)
        chosen = top_slots(scores, self.config.t_for(self.memory.n_slots), candidates=candidates)
        mask = torch.zeros(self.memory.n_slots, dtype=torch.bool, device=counts.device)
        mask[chosen] = True
        return mask

    @torch.no_grad()
    def after_backward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Select the batch's top-``t`` slots and zero the other rows of the value gradient; returns the mask.

        ``indices``: the batch's accesses (default: ``memory.last_indices``, i.e. the last forward).
        """
        grad = self.values.grad
        if grad is not None and grad.is_sparse:
            grad = grad.to_dense()
            self.values.grad = grad
        eligible = grad if (grad is not None and self.config.only_with_grad) else None
        self.selected = self.select(indices, eligible).to(self.values.device)
        if grad is not None:
            grad[~self.selected] = 0
        return self.selected

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot the value table (restored outside the selection by :meth:`after_step`)."""
        self._snapshot = self.values.detach().clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore the value rows outside the current selection to their pre-step bits."""
        if self._snapshot is None or self.selected is None:
            return
        keep = ~self.selected
        self.values[keep] = self._snapshot[keep]
        self._snapshot = None

"""Prompted classifiers on a frozen ViT: L2P, DualPrompt and CODA-Prompt (pure torch).

Each model runs the frozen backbone twice per input, as the references do: a query pass without prompts, whose
final class token (after the backbone's output norm) is the query ``q(x)``, then the prompted pass. Only the
prompts, keys (CODA: also the attention vectors) and a new linear head train; the backbone's parameters are
frozen and it stays in eval mode.

- :class:`L2PModel` (Wang et al., CVPR 2022): the ``top_n`` selected prompts are inserted as tokens after the
  class token; the head reads the mean of the prompt tokens' outputs.
- :class:`DualPromptModel` (Wang et al., ECCV 2022): a shared G-prompt and a pool of E-prompts (one per task),
  both as key/value prefixes; during training the task's E-prompt, at test the best-matching key's; class-token
  head.
- :class:`CodaPromptModel` (Smith et al., CVPR 2023): :class:`~avalanche_merge.prompts.coda.CodaPrompt` prefixes;
  class-token head.

``forward`` returns logits and leaves ``last_pull`` (the pull term to subtract from the loss, or None) and
``last_selection`` (the selected pool indices, or None) on the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import ViTAdapter, check_layers
from .coda import CodaPrompt
from .config import (
    PAPER_CODA_LAYERS,
    PAPER_CODA_PER_TASK,
    PAPER_E_LAYERS,
    PAPER_G_LAYERS,
    CodaPromptConfig,
    DualPromptConfig,
    L2PConfig,
    default_layers,
)
from .pool import PromptPool


def _depth(backbone: nn.Module) -> int:
    adapter = ViTAdapter(backbone)
    try:
        return adapter.depth
    finally:
        adapter.remove()


class PromptedViT(nn.Module):
    """Frozen ViT + prompts + linear head; subclasses define :meth:`prompt` and :meth:`pool_features`.

    Args:
        backbone: a supported ViT (frozen here).
        num_classes: outputs of the new head.
        prefix_layers: blocks whose attention gets prefixes.
        prompt_tokens: insert prompt tokens at the input.
        seed: seed of the prompt and head initialisation.
        head_init: ``"backbone"``: copy the backbone's ``head`` when it is an ``nn.Linear(feature_dim, num_classes)``
            on the same features (TinyViT, timm); ``"new"``: a fresh head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, prefix_layers=(), prompt_tokens: bool = False,
                 seed: int = 0, head_init: str = "backbone") -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.adapter = ViTAdapter(backbone, prefix_layers=prefix_layers, prompt_tokens=prompt_tokens)
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.generator = torch.Generator().manual_seed(seed)
        d = self.adapter.feature_dim
        self.head = nn.Linear(d, num_classes)
        with torch.no_grad():
            self.head.weight.uniform_(-(d**-0.5), d**-0.5, generator=self.generator)
            self.head.bias.zero_()
            own = getattr(backbone, "head", None)
            self.head_source = "new"
            if (head_init == "backbone" and self.adapter.kind in ("tiny_vit", "timm") and isinstance(own, nn.Linear)
                    and own.in_features == d and own.out_features == num_classes and own.bias is not None
                    and own.weight.device.type != "meta"):
                self.head.weight.copy_(own.weight)
                self.head.bias.copy_(own.bias)
                self.head_source = "backbone"
        self.task = 0
        self.last_pull: torch.Tensor | None = None
        self.last_selection: torch.Tensor | None = None

    @property
    def feature_dim(self) -> int:
        return self.adapter.feature_dim

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, fixed statistics
        return self

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``q(x)``: the unprompted frozen backbone's final class token, ``[batch, feature_dim]``."""
        self.adapter.state.clear()
        return self.adapter.finalize(self.adapter.run(x)[:, 0])

    def prompt(self, query: torch.Tensor) -> None:
        """Set ``adapter.state`` (tokens / prefixes), ``last_pull`` and ``last_selection`` for ``query``."""
        raise NotImplementedError

    def pool_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head input from the finalised output tokens (default: the class token)."""
        return tokens[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Prompted features ``[batch, feature_dim]`` (the head's input)."""
        q = self.query(x)
        try:
            self.prompt(q)
            tokens = self.adapter.run(x)
        finally:
            self.adapter.state.clear()
        return self.pool_features(self.adapter.finalize(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def begin_task(self, task: int) -> None:
        """Prepare task ``task`` (0-based) before its training."""
        self.task = task

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters one task trains (prompts, keys, head)."""
        return [p for p in self.parameters() if p.requires_grad]

    def detach_backbone(self) -> nn.Module:
        """Remove the hooks and return the backbone as it was given (weights untouched)."""
        self.adapter.remove()
        return self.backbone


class L2PModel(PromptedViT):
    """L2P: a prompt pool whose selected prompts are prepended as input tokens."""

    def __init__(self, backbone: nn.Module, num_classes: int, config: L2PConfig | None = None, *,
                 seed: int = 0) -> None:
        config = config or L2PConfig()
        super().__init__(backbone, num_classes, prompt_tokens=True, seed=seed, head_init=config.head_init)
        self.config = config
        self.pool = PromptPool(config.pool_size, self.feature_dim, (config.prompt_length, self.adapter.width),
                               top_n=config.top_n, batchwise=config.batchwise, generator=self.generator)
        self.n_prompt_tokens = config.top_n * config.prompt_length

    def prompt(self, query: torch.Tensor) -> None:
        prompts, idx, pull = self.pool(query)
        b = query.shape[0]
        self.adapter.state.tokens = self.adapter.prompt_tokens(prompts.reshape(b, -1, prompts.shape[-1]))
        self.last_pull, self.last_selection = pull, idx.detach()

    def pool_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1 : 1 + self.n_prompt_tokens].mean(dim=1)


class DualPromptModel(PromptedViT):
    """DualPrompt: G-prompt prefixes in the first layers, a task-keyed E-prompt pool in the next ones.

    Args:
        n_tasks: experiences of the stream (the E-pool size when ``config.e_pool_size`` is None).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, config: DualPromptConfig | None = None, *,
                 n_tasks: int, seed: int = 0) -> None:
        config = config or DualPromptConfig()
        depth = _depth(backbone)
        g = check_layers("g_layers", config.g_layers if config.g_layers is not None
                         else default_layers(PAPER_G_LAYERS, depth), depth)
        e = check_layers("e_layers", config.e_layers if config.e_layers is not None
                         else default_layers(PAPER_E_LAYERS, depth, fallback_last=True), depth)
        pool_size = config.e_pool_size or n_tasks
        if config.top_n > pool_size:
            raise ValueError(f"top_n ({config.top_n}) must be <= the E-prompt pool size ({pool_size}): the pool is "
                             f"smaller than top-N")
        if config.task_indexed and n_tasks * config.top_n > pool_size:
            raise ValueError(f"task-indexed training needs {n_tasks} x top_n {config.top_n} E-prompts; the pool has "
                             f"{pool_size}")
        super().__init__(backbone, num_classes, prefix_layers=sorted(set(g) | set(e)), seed=seed,
                         head_init=config.head_init)
        self.config, self.g_layers, self.e_layers = config, g, e
        w = self.adapter.attn_dim
        self.g_prompt = nn.Parameter(torch.rand(len(g), 2, config.g_length, w, generator=self.generator) * 2 - 1)
        self.pool = PromptPool(pool_size, self.feature_dim, (len(e), 2, config.e_length, w), top_n=config.top_n,
                               batchwise=config.batchwise, generator=self.generator)

    def begin_task(self, task: int) -> None:
        if task > self.task and self.config.init_from_previous and task < self.pool.pool_size // self.config.top_n:
            n = self.config.top_n
            with torch.no_grad():  # the reference's shared_prompt_pool: start from the previous task's prompts
                self.pool.prompts[task * n : (task + 1) * n] = self.pool.prompts[(task - 1) * n : task * n]
        super().begin_task(task)

    def prompt(self, query: torch.Tensor) -> None:
        task = self.task if (self.training and self.config.task_indexed) else None
        prompts, idx, pull = self.pool(query, task=task)  # [b, n, layers, 2, length, w]
        b = query.shape[0]
        prefixes: dict[int, list[torch.Tensor]] = {}
        for j, layer in enumerate(self.g_layers):
            kv = self.g_prompt[j].unsqueeze(0).expand(b, -1, -1, -1)
            prefixes.setdefault(layer, []).append(kv)
        for j, layer in enumerate(self.e_layers):
            kv = prompts[:, :, j].transpose(1, 2).reshape(b, 2, -1, prompts.shape[-1])  # n prompts concatenated
            prefixes.setdefault(layer, []).append(kv)
        self.adapter.state.prefixes = {
            layer: (torch.cat([kv[:, 0] for kv in parts], 1), torch.cat([kv[:, 1] for kv in parts], 1))
            for layer, parts in prefixes.items()}
        self.last_pull, self.last_selection = pull, idx.detach()


class CodaPromptModel(PromptedViT):
    """CODA-Prompt: attention-weighted sums of components as key/value prefixes, one slice per task.

    Args:
        n_tasks: experiences of the stream (checked: the orthogonal components must fit the key width).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, config: CodaPromptConfig | None = None, *,
                 n_tasks: int, seed: int = 0) -> None:
        config = config or CodaPromptConfig()
        depth = _depth(backbone)
        layers = check_layers("layers", config.layers if config.layers is not None
                              else default_layers(PAPER_CODA_LAYERS, depth), depth)
        super().__init__(backbone, num_classes, prefix_layers=layers, seed=seed, head_init=config.head_init)
        self.config = config
        per_task = config.components_per_task
        if per_task is None:
            per_task = max(1, min(PAPER_CODA_PER_TASK, self.feature_dim // max(1, n_tasks)))
        self.coda = CodaPrompt(layers, self.feature_dim, config.length, self.adapter.attn_dim, per_task)
        self.coda.check_capacity(n_tasks)
        self.coda.add_task(self.generator)

    @property
    def n_slices(self) -> int:
        return len(self.coda.layers[0].P) if len(self.coda.layers) else 0

    def begin_task(self, task: int) -> None:
        device = self.head.weight.device
        while self.n_slices <= task:
            self.coda.add_task(self.generator)
        self.coda.to(device)
        super().begin_task(task)

    def prompt(self, query: torch.Tensor) -> None:
        self.adapter.state.prefixes = self.coda(query)
        self.last_pull, self.last_selection = None, None

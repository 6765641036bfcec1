"""Hyper-parameters of L2P, DualPrompt and CODA-Prompt (validated, keyword-only dataclasses).

Defaults are the papers' CIFAR-100 settings (reference configs of JH-LEE-KR/l2p-pytorch, dualprompt-pytorch and
GT-RIPL/CODA-Prompt) except where our models are smaller, which each field says:

- prompted layers default to ``None``: the paper's layers that exist in the backbone (ViT-B/16 has 12 blocks, the
  offline TinyViT 4): DualPrompt G (0, 1) and E (2, 3, 4), CODA (0, 1, 2, 3, 4). DualPrompt's E-prompts go to the
  last block when none of (2, 3, 4) exists. Explicit layers outside the model are an error.
- CODA's 10 components per task need ``components x tasks <= key width`` (Gram-Schmidt): 10 x 5 tasks fits the
  64-wide TinyViT; by default a narrower model gets ``width // tasks``; an explicit value that does not fit is an
  error before training.
- the head: the papers start a new head (ImageNet's does not fit CIFAR's labels); here it starts as the backbone's
  own head when that fits (``head_init="backbone"``), as for every other method of the bench (``domain_mnist``
  keeps the pretrained digit head, ``split_mnist`` resets it).
- learning rates: L2P and DualPrompt use Adam at ``0.03 x batch / 256`` (constant, gradient norm clipped to 1),
  CODA Adam at 1e-3 with its cosine schedule over each task's epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_range

HEAD_INITS = ("backbone", "new")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _layers(name: str, value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    value = tuple(value)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must contain ints (block indices), got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must contain block indices >= 0, got {v}")
    return value


@dataclass(kw_only=True)
class _Optim:
    lr: float = 0.03
    scale_lr_by_batch: bool = True
    clip_grad: float | None = 1.0
    head_init: str = "backbone"

    def _check_optim(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {list(HEAD_INITS)}, got {self.head_init!r}")
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        if self.clip_grad is not None:
            check_range("clip_grad", self.clip_grad, 0.0, None, low_open=True)

    def effective_lr(self, batch_size: int) -> float:
        """The Adam rate: ``lr x batch / 256`` with ``scale_lr_by_batch`` (the references' rule), else ``lr``."""
        return self.lr * batch_size / 256.0 if self.scale_lr_by_batch else self.lr


@dataclass(kw_only=True)
class L2PConfig(_Optim):
    """L2P (Wang et al., CVPR 2022).

    Args:
        pool_size: M, prompts in the pool (10).
        prompt_length: tokens per prompt (5).
        top_n: prompts selected per input (5); must be <= ``pool_size``.
        pull_weight: lambda of the key pull term (0.1).
        batchwise: batch-wise majority selection (True in the reference CIFAR config).
        lr: Adam rate before batch scaling (0.03).
        scale_lr_by_batch: use ``lr x batch / 256``.
        clip_grad: gradient-norm clip (1.0), None for none.
        head_init: ``"backbone"``: the new head starts as the backbone's linear head when it has one of the right
            shape on the same features (TinyViT, timm; the bench's ``head`` option decides whether that is the
            pretrained digit head or a seeded reset one), else a fresh one; ``"new"``: always fresh (the papers,
            whose label spaces differ from the pretraining's).
    """

    pool_size: int = 10
    prompt_length: int = 5
    top_n: int = 5
    pull_weight: float = 0.1
    batchwise: bool = True

    def __post_init__(self) -> None:
        for name in ("pool_size", "prompt_length", "top_n"):
            _positive(name, getattr(self, name))
        if self.top_n > self.pool_size:
            raise ValueError(f"top_n must be <= pool_size: the pool ({self.pool_size}) is smaller than top-N "
                             f"({self.top_n})")
        check_range("pull_weight", self.pull_weight, 0.0, None)
        self._check_optim()


@dataclass(kw_only=True)
class DualPromptConfig(_Optim):
    """DualPrompt (Wang et al., ECCV 2022).

    Args:
        g_length: G-prompt prefix length (5; each of the key and value prefixes has this length).
        g_layers: blocks with the G-prompt; None: the paper's (0, 1) that exist.
        e_length: E-prompt prefix length (5 on CIFAR, 20 on ImageNet-R).
        e_layers: blocks with the E-prompt; None: the paper's (2, 3, 4) that exist (else the last block).
        e_pool_size: E-prompts in the pool; None: one per experience of the benchmark (the paper: 10 = tasks).
        top_n: E-prompts selected per input (1).
        pull_weight: weight of the key pull term (1.0).
        batchwise: batch-wise majority selection at test (True in the reference config).
        task_indexed: train with the task's E-prompt (the reference's ``use_prompt_mask``).
        init_from_previous: start a task's E-prompt from the previous task's (``shared_prompt_pool``).
        lr, scale_lr_by_batch, clip_grad: Adam at ``0.03 x batch / 256``, clip 1.0.
        head_init: ``"backbone"``: the new head starts as the backbone's linear head when it has one of the right
            shape on the same features (TinyViT, timm; the bench's ``head`` option decides whether that is the
            pretrained digit head or a seeded reset one), else a fresh one; ``"new"``: always fresh (the papers,
            whose label spaces differ from the pretraining's).
    """

    g_length: int = 5
    g_layers: tuple[int, ...] | None = None
    e_length: int = 5
    e_layers: tuple[int, ...] | None = None
    e_pool_size: int | None = None
    top_n: int = 1
    pull_weight: float = 1.0
    batchwise: bool = True
    task_indexed: bool = True
    init_from_previous: bool = True

    def __post_init__(self) -> None:
        for name in ("g_length", "e_length", "top_n"):
            _positive(name, getattr(self, name))
        if self.e_pool_size is not None:
            _positive("e_pool_size", self.e_pool_size)
            if self.top_n > self.e_pool_size:
                raise ValueError(f"top_n must be <= e_pool_size: the pool ({self.e_pool_size}) is smaller than "
                                 f"top-N ({self.top_n})")
        self.g_layers = _layers("g_layers", self.g_layers)
        self.e_layers = _layers("e_layers", self.e_layers)
        check_range("pull_weight", self.pull_weight, 0.0, None)
        self._check_optim()


@dataclass(kw_only=True)
class CodaPromptConfig(_Optim):
    """CODA-Prompt (Smith et al., CVPR 2023).

    Args:
        components_per_task: components added per task; None: the paper's 10 (= M 100 / 10 tasks), lowered to
            ``key width // tasks`` when that many orthogonal keys do not fit (16-wide test models).
        length: prompt length per layer (8: 4 key + 4 value prefix rows); even.
        layers: prompted blocks; None: the paper's (0, 1, 2, 3, 4) that exist.
        cosine: CODA's cosine schedule over each task's epochs (``lr cos(99 pi e / (200 (E - 1)))``).
        lr: Adam rate (1e-3), not scaled by batch.
        scale_lr_by_batch: use ``lr x batch / 256`` (off: the reference's rate is not scaled).
        clip_grad: None (the reference does not clip).
        head_init: ``"backbone"``: the new head starts as the backbone's linear head when it has one of the right
            shape on the same features (TinyViT, timm; the bench's ``head`` option decides whether that is the
            pretrained digit head or a seeded reset one), else a fresh one; ``"new"``: always fresh (the papers,
            whose label spaces differ from the pretraining's).
    """

    components_per_task: int | None = None
    length: int = 8
    layers: tuple[int, ...] | None = None
    cosine: bool = True
    lr: float = 1e-3
    scale_lr_by_batch: bool = False
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        if self.components_per_task is not None:
            _positive("components_per_task", self.components_per_task)
        _positive("length", self.length)
        if self.length % 2:
            raise ValueError(f"length must be even (half key, half value prefix), got {self.length}")
        self.layers = _layers("layers", self.layers)
        self._check_optim()


PAPER_G_LAYERS = (0, 1)
PAPER_E_LAYERS = (2, 3, 4)
PAPER_CODA_LAYERS = (0, 1, 2, 3, 4)
PAPER_CODA_PER_TASK = 10


def default_layers(paper: tuple[int, ...], depth: int, fallback_last: bool = False) -> tuple[int, ...]:
    """The paper's layers that exist in a ``depth``-block model (the last block if none and ``fallback_last``)."""
    kept = tuple(i for i in paper if i < depth)
    return kept or ((depth - 1,) if fallback_last else ())

"""Shared hyper-parameters of the continual LoRA learners (validated dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_range


def check_positive_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_threshold(name: str, value: float) -> None:
    """Raise unless ``value`` is an energy threshold in (0, 1]."""
    check_range(name, value, 0.0, 1.0, low_open=True)


@dataclass(kw_only=True)
class LoRAConfig:
    """Adapters injected by peft into the ``target_modules`` of a model.

    Args:
        rank: LoRA rank r, >= 1.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. ``None`` means ``alpha = rank`` (scale 1).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: the layers (``nn.Linear``; ``nn.Conv2d`` for learners that allow it) that get adapters:
            full dotted names, last name components (``"c_fc"``), the roles ``q``, ``k``, ``v``, ``proj``, ``fc1``,
            ``fc2`` (TinyViT's names, translated per architecture: open_clip, timm ViT, MiniLM/BERT ``query``...;
            fused attention is split first) or ``"auto"`` (the attention's q, k, v; every layer outside the head on
            an MLP or CNN). See :mod:`avalanche_merge.models.targets`.
        train_head: keep the classification head trainable (it is not a LoRA target).
        head: module name of the head, or ``"auto"`` (``head``/``classifier``/last ``nn.Linear``).
        max_samples: inputs per experience used by data-dependent steps (input covariances, old outputs), >= 1.
        lr: learning rate of the learner's parameters when driven by the Avalanche plugin, > 0; ``None`` keeps
            the strategy optimizer's rate. LoRA is usually trained at a larger rate than full fine-tuning
            (Hu et al., ICLR 2022: zero-initialised ``B`` and a low-rank update move the function slowly).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "k", "v")
    train_head: bool = True
    head: str = "auto"
    max_samples: int = 512
    lr: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        if self.alpha is None:
            self.alpha = float(self.rank)
        check_range("alpha", self.alpha, 0.0, None, low_open=True)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        check_positive_int("max_samples", self.max_samples)
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, None, low_open=True)

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` that peft applies to ``B A x``."""
        return self.alpha / self.rank

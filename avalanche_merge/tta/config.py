"""Validated options of the zero-shot and test-time-adaptation methods (``zeroshot``, ``tent``, ``ttacil``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import check_range
from .augmix import AugMixConfig

#: the one-prompt "primer" (CLIP's default prompt, Radford et al. 2021, Sec. 3.1.4)
PRIMER_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = ("openai_imagenet", "simple_imagenet", "primer")


def resolve_templates(templates: str | list[str]) -> tuple[str, ...]:
    """Prompt templates with ``{}`` for the class name.

    Args:
        templates: ``"openai_imagenet"`` (the 80 OpenAI ImageNet templates, from open_clip's
            ``zero_shot_metadata``, installed with open_clip: nothing is downloaded), ``"simple_imagenet"`` (the 7
            of open_clip's ``SIMPLE_IMAGENET_TEMPLATES``), ``"primer"`` (``"a photo of a {}."``), or a list of
            templates.

    Raises:
        ValueError: an unknown set name, an empty list, or a template without ``{}``.
        TypeError: anything else.
    """
    if isinstance(templates, str):
        if templates == "primer":
            return (PRIMER_TEMPLATE,)
        if templates in ("openai_imagenet", "simple_imagenet"):
            from open_clip import zero_shot_metadata as meta

            fns = meta.OPENAI_IMAGENET_TEMPLATES if templates == "openai_imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES
            return tuple(fn("{}") for fn in fns)
        raise ValueError(f"templates must be one of {list(TEMPLATE_SETS)} or a list of templates, got {templates!r}")
    if not isinstance(templates, (list, tuple)) or not all(isinstance(t, str) for t in templates):
        raise TypeError(f"templates must be a str or a list of str, got {templates!r}")
    if not templates:
        raise ValueError("templates must not be empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template must contain '{{}}' for the class name, got {bad[0]!r}")
    return tuple(templates)


@dataclass(kw_only=True)
class ZeroShotConfig:
    """Zero-shot CLIP as a continual baseline (Thengane et al., "CLIP model is an Efficient Continual Learner",
    2022; vgthengane/Continual-CLIP).

    Args:
        templates: prompt templates of the head (see :func:`resolve_templates`): ``"openai_imagenet"`` (80,
            default, as Continual-CLIP's ensembles), ``"simple_imagenet"`` (7), ``"primer"`` (1) or a list.
    """

    needs_text_tower: ClassVar[bool] = True

    templates: str | list[str] = "openai_imagenet"

    def __post_init__(self) -> None:
        resolve_templates(self.templates)


def _check_lr_momentum(lr: float, momentum: float, weight_decay: float) -> None:
    check_range("lr", lr, 0.0, 10.0, low_open=True)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("weight_decay", weight_decay, 0.0, 10.0)


@dataclass(kw_only=True)
class TentConfig:
    """TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021; DequanWang/tent).

    Defaults are the reference's CIFAR-10-C configuration (``cfgs/tent.yaml``): Adam, lr 1e-3, beta 0.9, no
    weight decay, one step per batch, online within a test domain.

    Args:
        optimizer: ``"adam"`` (betas ``(momentum, 0.999)``) or ``"sgd"`` (with ``momentum``; the reference's
            ImageNet-C setting is SGD 2.5e-4, momentum 0.9, batch 64).
        lr: learning rate of the normalisation parameters, in (0, 10].
        momentum: Adam's beta1 or SGD's momentum, in [0, 1).
        weight_decay: >= 0.
        steps: optimizer steps per test batch (reference 1); the prediction is the output of the last step's
            forward, i.e. before that step's update, as the reference's ``forward_and_adapt`` returns it.
        episodic: reset the normalisation parameters and the optimizer before every batch (reference option
            ``MODEL.EPISODIC``). False (default): online adaptation within each evaluated experience, which is
            reset at its start, as the reference resets per corruption.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    steps: int = 1
    episodic: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _check_lr_momentum(self.lr, self.momentum, self.weight_decay)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")


@dataclass(kw_only=True)
class TTACILConfig:
    """TTACIL (Marouf et al., arXiv 2310.11482; thinh-huynh-re/TTACIL).

    Args:
        bottleneck: adapter hidden width (the reference's 64 for width 768; 8 for the tiny ViT's width 64).
        adapter_scale: adapter output multiplier (reference 0.1).
        adapter_dropout: dropout inside the adapters while they train (reference 0.1).
        n_views: AugMix views per test image for the marginal entropy (reference and paper N = 8), >= 1.
        lr: SGD learning rate of the test-time step (reference 0.01).
        momentum: SGD momentum (reference 0.9).
        weight_decay: SGD weight decay (reference ``weight_decay`` 5e-4).
        per_instance: marginal over each image's views (paper, default) or over all views of the batch (the
            code's ``marginal_entropy`` on ``B*N`` rows).
        carry_momentum: keep the SGD momentum across test batches (the code never resets its optimizer between
            batches); default False: the optimizer state is restored with the LayerNorms (the paper's reset).
        augmix: the AugMix views.
    """

    bottleneck: int = 8
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    n_views: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    per_instance: bool = True
    carry_momentum: bool = False
    augmix: AugMixConfig = field(default_factory=AugMixConfig)

    def __post_init__(self) -> None:
        for name in ("bottleneck", "n_views"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_range("adapter_scale", self.adapter_scale, 0.0, None, low_open=True)
        check_range("adapter_dropout", self.adapter_dropout, 0.0, 1.0, high_open=True)
        _check_lr_momentum(self.lr, self.momentum, self.weight_decay)

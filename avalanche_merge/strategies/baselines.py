"""Avalanche's own baselines, registered so that every avalanche-merge method is compared with them.

Each builder only configures the Avalanche strategy; no algorithm is re-implemented here. Default
hyper-parameters are common values from the papers and Avalanche's examples, not tuned on our benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_range
from .registry import BuildContext, register_method


@register_method("naive", description="sequential fine-tuning, no protection against forgetting (lower bound)")
def build_naive(ctx: BuildContext, cfg):
    from avalanche.training import Naive

    return Naive(model=ctx.model, optimizer=ctx.optimizer(), **ctx.strategy_kwargs())


@register_method("joint", trains_once=True,
                 description="one training run on all experiences at once (offline upper bound)")
def build_joint(ctx: BuildContext, cfg):
    from avalanche.training import JointTraining

    return JointTraining(model=ctx.model, optimizer=ctx.optimizer(), **ctx.strategy_kwargs())


@register_method("cumulative", description="retrain on the union of all experiences so far (Avalanche Cumulative)")
def build_cumulative(ctx: BuildContext, cfg):
    from avalanche.training import Cumulative

    return Cumulative(model=ctx.model, optimizer=ctx.optimizer(), **ctx.strategy_kwargs())


@dataclass
class EWCConfig:
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    Default ``ewc_lambda`` from a coarse sweep (1e2, 1e3, 1e4) on ``domain_mnist`` seed 0 (final accuracy 56.8,
    60.9, 51.8%; Naive 51.8%).

    Args:
        ewc_lambda: weight of the quadratic penalty, >= 0.
        mode: ``"separate"`` keeps one Fisher per experience, ``"online"`` a decayed running one.
        decay_factor: Fisher decay for ``mode="online"``, in (0, 1].
    """

    ewc_lambda: float = 1000.0
    mode: str = "separate"
    decay_factor: float | None = None

    def __post_init__(self) -> None:
        check_range("ewc_lambda", self.ewc_lambda, 0.0)
        if self.mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {self.mode!r}")
        if self.mode == "online":
            if self.decay_factor is None:
                self.decay_factor = 1.0
            check_range("decay_factor", self.decay_factor, 0.0, 1.0, low_open=True)


@register_method("ewc", config_cls=EWCConfig, description="Elastic Weight Consolidation (Kirkpatrick et al. 2017)")
def build_ewc(ctx: BuildContext, cfg: EWCConfig):
    from avalanche.training import EWC

    return EWC(model=ctx.model, optimizer=ctx.optimizer(), ewc_lambda=cfg.ewc_lambda, mode=cfg.mode,
               decay_factor=cfg.decay_factor, **ctx.strategy_kwargs())


@dataclass
class LwFConfig:
    """Learning without Forgetting (Li & Hoiem, TPAMI 2017).

    Args:
        alpha: weight of the distillation loss, >= 0.
        temperature: softmax temperature of the distillation, > 0.
    """

    alpha: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0.0)
        check_range("temperature", self.temperature, 0.0, None, low_open=True)


@register_method("lwf", config_cls=LwFConfig, description="Learning without Forgetting (Li & Hoiem 2017)")
def build_lwf(ctx: BuildContext, cfg: LwFConfig):
    from avalanche.training import LwF

    return LwF(model=ctx.model, optimizer=ctx.optimizer(), alpha=cfg.alpha, temperature=cfg.temperature,
               **ctx.strategy_kwargs())


@dataclass
class ReplayConfig:
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories") with Avalanche's
    experience-balanced buffer.

    Args:
        mem_size: total number of stored samples, >= 1.
    """

    mem_size: int = 200

    def __post_init__(self) -> None:
        if self.mem_size < 1:
            raise ValueError(f"mem_size must be >= 1, got {self.mem_size}")


@register_method("replay", config_cls=ReplayConfig,
                 description="experience replay with an experience-balanced buffer (Avalanche Replay)")
def build_replay(ctx: BuildContext, cfg: ReplayConfig):
    from avalanche.training import Replay

    return Replay(model=ctx.model, optimizer=ctx.optimizer(), mem_size=cfg.mem_size, **ctx.strategy_kwargs())


@dataclass
class DERConfig:
    """DER++ (Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020) with Avalanche's
    ``DER`` (:class:`~avalanche_merge.strategies.der.DERPP`: the current-batch term goes through the criterion, so
    head protocols apply).

    Defaults from SparCL's script (the published SparCL runs on this base): 500 samples, ``alpha`` 0.1,
    ``beta`` 0.5 (DER++'s own defaults for sequential CIFAR-10 are in the same range).

    Args:
        mem_size: buffer size (class-balanced, filled after each experience), >= 1.
        alpha: weight of the logit-matching (MSE) term, >= 0.
        beta: weight of the buffer cross-entropy term, >= 0 (0: DER).
        batch_size_mem: buffer mini-batch size, >= 1; ``None``: the training batch size.
    """

    mem_size: int = 500
    alpha: float = 0.1
    beta: float = 0.5
    batch_size_mem: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mem_size, bool) or not isinstance(self.mem_size, int) or self.mem_size < 1:
            raise ValueError(f"mem_size must be an int >= 1, got {self.mem_size!r}")
        check_range("alpha", self.alpha, 0.0)
        check_range("beta", self.beta, 0.0)
        if self.batch_size_mem is not None and (isinstance(self.batch_size_mem, bool)
                                                or not isinstance(self.batch_size_mem, int)
                                                or self.batch_size_mem < 1):
            raise ValueError(f"batch_size_mem must be an int >= 1 or None, got {self.batch_size_mem!r}")

    def strategy_options(self) -> dict:
        """Keyword arguments of :class:`~avalanche_merge.strategies.der.DERPP`."""
        return {"mem_size": self.mem_size, "alpha": self.alpha, "beta": self.beta,
                "batch_size_mem": self.batch_size_mem}


@register_method("der", config_cls=DERConfig,
                 description="DER++: replay of stored logits and labels (Buzzega et al. 2020; Avalanche DER)")
def build_der(ctx: BuildContext, cfg: DERConfig):
    from .der import DERPP

    return DERPP(model=ctx.model, optimizer=ctx.optimizer(), **cfg.strategy_options(), **ctx.strategy_kwargs())


@dataclass
class SIConfig:
    """Synaptic Intelligence (Zenke et al., ICML 2017).

    Avalanche clamps the per-parameter importances at 1e-3, so the penalty weight must be large to matter. The
    default was chosen by a coarse sweep (1, 1e2, 1e4) on ``domain_mnist`` seed 0 (final accuracy 51.7, 54.6,
    57.6%; Naive 51.8%).

    Args:
        si_lambda: weight of the surrogate-loss penalty, >= 0.
        eps: damping of the importance normaliser, > 0.
    """

    si_lambda: float = 1e4
    eps: float = 1e-7

    def __post_init__(self) -> None:
        check_range("si_lambda", self.si_lambda, 0.0)
        check_range("eps", self.eps, 0.0, None, low_open=True)


@register_method("si", config_cls=SIConfig, description="Synaptic Intelligence (Zenke et al. 2017)")
def build_si(ctx: BuildContext, cfg: SIConfig):
    from avalanche.training import SynapticIntelligence

    from .fixes import fix_si_weight_aliasing

    fix_si_weight_aliasing()  # without it SI is a no-op on CPU in Avalanche 0.6.0

    return SynapticIntelligence(model=ctx.model, optimizer=ctx.optimizer(), si_lambda=cfg.si_lambda, eps=cfg.eps,
                                **ctx.strategy_kwargs())


@dataclass
class SLDAConfig:
    """Deep Streaming LDA (Hayes & Kanan, CVPRW 2020) on the frozen pretrained features.

    Args:
        shrinkage: shrinkage added to the shared covariance, > 0.
        streaming_update_sigma: update the shared covariance online (else keep it fixed).
    """

    shrinkage: float = 1e-4
    streaming_update_sigma: bool = True

    def __post_init__(self) -> None:
        check_range("shrinkage", self.shrinkage, 0.0, None, low_open=True)


@register_method("slda", config_cls=SLDAConfig, pretrained_eval=False, protocol="prototype",
                 description="Deep Streaming LDA on frozen pretrained features (prototype baseline)")
def build_slda(ctx: BuildContext, cfg: SLDAConfig):
    from avalanche.training import StreamingLDA

    from ..models.vit import FeatureExtractor

    kwargs = ctx.strategy_kwargs()
    kwargs["train_epochs"] = 1  # one streaming pass by definition
    for p in ctx.model.parameters():
        p.requires_grad_(False)
    return StreamingLDA(slda_model=FeatureExtractor(ctx.model), input_size=ctx.model.feature_dim,
                        num_classes=ctx.benchmark.num_classes, shrinkage_param=cfg.shrinkage,
                        streaming_update_sigma=cfg.streaming_update_sigma, **kwargs)

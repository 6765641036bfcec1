"""The optional ``fomo`` section of an experiment: the FoMo-in-Flux continual-pretraining protocol.

Roth et al., "A Practitioner's Guide to Continual Multimodal Pretraining" (2024; code ExplainableML/fomo_in_flux)
judge a continual-pretraining method by

- knowledge accumulation ``A_KA``: the mean accuracy over the adaptation tasks' test sets, after every update;
- zero-shot retention ``A_ZS``: the mean accuracy over held-out datasets that are never trained on;
- their geometric mean ``GM = sqrt(A_KA * A_ZS)``,

each recorded at every step *including* the zero-shot point before any update (step 0), with every method given
the same per-task compute budget in memory-adjusted FLOPs (:mod:`avalanche_merge.evaluation.compute`), and with
stream orderings (random, easy-to-hard by the pretrained model's accuracy, and its reverse).

With ``"fomo": {...}`` in a config, every run (1) evaluates the pretrained model with a plain forward on every test
experience and held-out task (step 0, also the key of the accuracy orderings), (2) reorders the stream, (3) when a
budget is given, measures one update step of the method and of full fine-tuning (the reference) on throwaway
copies and refuses a budget smaller than one step before training, (4) trains each experience for the budgeted
number of steps, and (5) stores ``A_KA``/``A_ZS``/``GM`` per step in ``result["fomo"]``. The section enters the
run's config hash only when present, so runs without it keep their identity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import check_choice

ORDERINGS = ("given", "random", "easy_to_hard", "hard_to_easy")


@dataclass
class BudgetConfig:
    """A per-task compute budget; give exactly one of the two.

    Args:
        reference_steps: the budget as this many update steps of full fine-tuning (Naive) of the same model with
            the same batch size (budget = ``reference_steps x FLOPs of one reference step``).
        flops: the budget in memory-adjusted FLOPs per task.
    """

    reference_steps: int | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        if (self.reference_steps is None) == (self.flops is None):
            raise ValueError("budget needs exactly one of reference_steps or flops")
        if self.reference_steps is not None and self.reference_steps < 1:
            raise ValueError(f"budget.reference_steps must be >= 1, got {self.reference_steps}")
        if self.flops is not None and not (math.isfinite(self.flops) and self.flops > 0):
            raise ValueError(f"budget.flops must be a positive finite number, got {self.flops}")


@dataclass
class FomoConfig:
    """The FoMo-in-Flux protocol of an experiment.

    Args:
        held_out_domains: domain transformations of the benchmark's test images used as the held-out (zero-shot)
            tasks, never trained on (offline MNIST/digits benchmarks; see ``avalanche_merge.benchmarks.transforms``).
        held_out_samples: images per held-out domain, a positive multiple of 10.
        ordering: ``given`` (the benchmark's order), ``random`` (seeded by the run seed), ``easy_to_hard`` (by the
            pretrained model's test accuracy, highest first) or ``hard_to_easy`` (its reverse).
        budget: a per-task compute budget; None trains every method for ``train.epochs`` as usual.
    """

    held_out_domains: list[str] = field(default_factory=list)
    held_out_samples: int = 200
    ordering: str = "given"
    budget: BudgetConfig | None = None

    def __post_init__(self) -> None:
        check_choice("ordering", self.ordering, ORDERINGS)
        if not self.held_out_domains:
            raise ValueError("fomo.held_out_domains must name at least one held-out domain (A_ZS needs one)")
        if len(set(self.held_out_domains)) != len(self.held_out_domains):
            raise ValueError(f"fomo.held_out_domains must be distinct, got {self.held_out_domains}")
        from ..benchmarks.transforms import DOMAINS

        for d in self.held_out_domains:
            DOMAINS.get(d)
        if self.held_out_samples < 10 or self.held_out_samples % 10:
            raise ValueError(f"fomo.held_out_samples must be a positive multiple of 10, got {self.held_out_samples}")


def describe_fomo(config: FomoConfig | None) -> dict | None:
    """The part of a run's config hash the fomo section contributes (None when absent)."""
    return None if config is None else dataclasses.asdict(config)


# -- orderings ---------------------------------------------------------------------------------------------------
def stream_order(ordering: str, pretrained_accuracy: list[float], seed: int) -> list[int]:
    """The training order of the experiences (indices into the benchmark's order).

    ``easy_to_hard`` sorts by pretrained accuracy, highest first (ties: benchmark order); ``hard_to_easy`` is its
    exact reverse; ``random`` is a permutation drawn from a private generator seeded by ``seed``.
    """
    check_choice("ordering", ordering, ORDERINGS)
    n = len(pretrained_accuracy)
    if ordering == "given":
        return list(range(n))
    if ordering == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729)).tolist()
    easy = sorted(range(n), key=lambda j: (-pretrained_accuracy[j], j))
    return easy if ordering == "easy_to_hard" else easy[::-1]


def reorder_benchmark(benchmark: Any, order: list[int]) -> Any:
    """A copy of ``benchmark`` whose train and test experiences come in ``order`` (datasets reused as they are)."""
    from ..benchmarks.base import make_scenario

    n = benchmark.n_experiences
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}), got {order}")
    if order == list(range(n)):
        return benchmark
    train = [benchmark.train_stream[j].dataset for j in order]
    test = [benchmark.test_stream[j].dataset for j in order]
    return dataclasses.replace(benchmark, scenario=make_scenario(train, test),
                               experience_names=[benchmark.experience_names[j] for j in order],
                               info={**benchmark.info, "order": list(order)})


# -- the zero-shot point -----------------------------------------------------------------------------------------
@torch.no_grad()
def plain_accuracy(model: torch.nn.Module, dataset: Any, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model(x).argmax(1)`` on a dataset of ``(x, y, ...)`` items, in eval mode."""
    from ..evaluation.probes import probe_tensors

    x, y = probe_tensors(dataset, len(dataset), 0)[:2]
    was = model.training
    model.eval()
    try:
        correct = sum(int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
                      for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    finally:
        model.train(was)
    return correct / len(y)


def zero_shot_point(model: torch.nn.Module, benchmark: Any, held_out: dict, device: torch.device) -> dict:
    """Step 0 of the protocol: the pretrained model's accuracy on every test experience and held-out task."""
    model.to(device)
    per_exp = [plain_accuracy(model, exp.dataset, device) for exp in benchmark.test_stream]
    per_held = {name: plain_accuracy(model, d, device) for name, d in held_out.items()}
    return {"test_accuracy": per_exp, "held_out_accuracy": per_held}


def fomo_curves(zero_shot: dict, continual: dict) -> dict:
    """``A_KA``, ``A_ZS`` and ``GM`` per step (index 0: the zero-shot point), from the step-0 record and the
    continual metric's ``accumulation``/``retention`` lists."""
    ka = [sum(zero_shot["test_accuracy"]) / len(zero_shot["test_accuracy"]), *continual["accumulation"]]
    held = list(zero_shot["held_out_accuracy"].values())
    zs = [sum(held) / len(held), *continual["retention"]]
    gm = [math.sqrt(max(a, 0.0) * max(b, 0.0)) for a, b in zip(ka, zs, strict=True)]
    return {"A_KA": ka, "A_ZS": zs, "GM": gm, "final_A_KA": ka[-1], "final_A_ZS": zs[-1], "final_GM": gm[-1],
            "mean_GM": sum(gm[1:]) / max(1, len(gm) - 1)}


__all__ = ["ORDERINGS", "BudgetConfig", "FomoConfig", "describe_fomo", "fomo_curves", "plain_accuracy",
           "reorder_benchmark", "stream_order", "zero_shot_point"]

"""``LoRAStrategy``: a ready Avalanche strategy for the continual LoRA learners, and their registration.

Every learner in :data:`avalanche_merge.lora.LEARNERS` becomes a method of ``avalanche-merge bench`` (family
``"lora"``) with the learner's config as its options. The same learners run inside any other strategy
(``Replay``, ``Naive``, ...) through :class:`~avalanche_merge.plugins.lora.LoRAPlugin`.
"""

from __future__ import annotations

from typing import Any

from avalanche.training.templates import SupervisedTemplate

from ..lora import LEARNERS
from ..plugins.lora import LoRAPlugin
from ..plugins.optim import restrict_optimizer
from .registry import METHODS, BuildContext, register_method


class LoRAStrategy(SupervisedTemplate):
    """Sequential training of a continual LoRA learner; only trainable parameters reach the optimizer.

    Args:
        model: the pretrained model (adapters are injected in place at the start of training).
        optimizer: a single-group optimizer (its parameter list is replaced by the trainable parameters).
        method: a learner name (``avalanche_merge.lora.list_learners()``).
        method_options: the learner's config fields.
        plugins: other Avalanche plugins (the LoRA plugin is appended after them).
        **kwargs: the other ``SupervisedTemplate`` arguments.
    """

    def __init__(self, *, model, optimizer, method: str = "olora", method_options: dict | None = None,
                 plugins=None, **kwargs) -> None:
        self.lora_plugin = LoRAPlugin(method=method, options=method_options, reset_optimizer_state=True)
        super().__init__(model=model, optimizer=optimizer, plugins=[*(plugins or []), self.lora_plugin], **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Keep only the trainable parameters in the optimizer (Avalanche's version adds frozen ones)."""
        restrict_optimizer(self, [p for p in self.model.parameters() if p.requires_grad], reset_state=True)


# The head protocol of each learner's paper (avalanche_merge.protocol; docs/fidelity.md has the sources):
# InfLoRA trains one linear head per task on its classes and concatenates them (classifier_pool); SD-LoRA
# trains one growing head on logits[:, known:]; CL-LoRA trains a per-task proxy head and predicts with class-mean
# prototypes; GPM's paper is multi-head (task-incremental), run here as InfLoRA runs it without task labels;
# O-LoRA's paper has no classifier (a seq2seq LM) and plain LoRA is SD-LoRA's and InfLoRA's sequential
# baseline: both get the masked protocol of the rehearsal-free PEFT methods.
PAPER_PROTOCOLS = {"lora": ("masked", False), "olora": ("masked", False), "inflora": ("per_task", False),
                   "sdlora": ("masked", False), "cllora": ("per_task", True), "gpm_lora": ("per_task", False),
                   "gpm": ("per_task", False)}


def _register(name: str) -> None:
    learner = LEARNERS.get(name)
    protocol, prototypes = PAPER_PROTOCOLS.get(name, ("shared", False))

    def build(ctx: BuildContext, cfg) -> LoRAStrategy:
        options = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
        return LoRAStrategy(model=ctx.model, optimizer=ctx.optimizer(), method=name, method_options=options,
                            **ctx.strategy_kwargs())

    doc = (learner.__doc__ or name).strip().splitlines()[0].rstrip(".")
    register_method(name, config_cls=learner.config_cls, family="lora", description=doc, protocol=protocol,
                    prototypes=prototypes)(build)


for _name in LEARNERS.names():
    if _name not in METHODS.names():
        _register(_name)

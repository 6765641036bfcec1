"""CL-LoRA: continual low-rank adaptation for rehearsal-free class-incremental learning (He, Duan and Zhu,
CVPR 2025, arXiv 2505.24816; official code github.com/JiangpengHe/CL-LoRA, ``models/cllora.py`` and its ViT
backbone). By default the learner runs as the official code does.

Dual adapters (the paper's method section and overview figure). The target layers (default: ``q`` and ``v``)
of the first ``shared_blocks`` transformer blocks (default: the first half, as the official ViT-B/16 split
0-5 / 6-11) hold one **task-shared** adapter trained on every task; the later blocks get a new
**task-specific** adapter per task, trained on its task and frozen afterwards. In peft's notation (``A``:
r x d_in down-projection, ``B``: d_out x r up-projection, ``s = alpha / rank`` peft's scaling):

- shared adapter: ``A_s`` a random orthogonal matrix, fixed; ``B_s`` zero-initialised and trained (paper: "random
  orthogonal matrices"; official code: Q of the QR of a uniform [0, 1) matrix, frozen; we QR a Gaussian, whose Q
  is uniformly distributed).
- task-specific adapters: ``A`` random orthogonal (trainable), ``B`` zero. Task ``t`` owns a learnable block-weight
  vector ``beta_t`` (one entry per task-specific layer, init U(0.5, 1.5) as in the official code) that multiplies
  its adapter's output in each of its layers; ``orth_weight * mean_{i<t} |cos(beta_i, beta_t)|`` (1e-4) keeps
  the block weights of different tasks orthogonal. ``beta_t`` is a :mod:`torch.nn.utils.parametrize`
  parametrization of each task-specific ``lora_B.weight`` (``B_eff = beta_t[j] * B``; one
  :class:`~torch.nn.Parameter` per task, registered in every layer's parametrization module), so peft's forward,
  its ``merge`` and :func:`~avalanche_merge.lora.adapters.delta_weight` see ``beta_t[j] * s * B A``, and
  ``model.parameters()``, ``state_dict()``, ``.to()`` and ``.double()`` see and move ``beta_t``.
  ``save``/``load`` write the raw ``B`` and the block weights (extra state).
- knowledge distillation (``kd_target="logits"``, weight 5, temperature 2, as the official code): for ``t > 0``
  the soft-target cross-entropy ``-mean_n sum_c softmax(z_old / T) log softmax(z / T)`` (no ``T^2`` factor)
  between the student's logits and a teacher's: the same model with the shared ``B_s`` of the end of the previous
  task (refreshed at every ``begin_task``), its output detached. Only the distillation gradient of ``B_s`` is
  reassigned row-wise by the old adapter's row norms (official code)::

      grad_B[i, :] <- w_i * grad_B[i, :],   w_i = d_out * ||B_old[i, :]|| / sum_j ||B_old[j, :]||

  It costs one teacher forward and one extra backward (to reassign only the KD gradient) per step. The inputs and
  output are captured during the normal forward pass by hooks on the model; ``penalty()`` consumes them.
- ``inference="paths"`` (official code): a training forward runs the shared adapter and *only* the current
  task's specific adapter. At evaluation (model not in training mode) the model runs once per task path ``i``
  (shared adapter + task ``i``'s specific adapter with its block weights) and the logits of task ``i``'s classes
  come from path ``i``: with the ``per_task`` head protocol and prototypes
  (:class:`~avalanche_merge.protocol.PerTaskHead`), path ``i``'s features are scored by cosine against the
  prototypes of task ``i``'s classes, the class means of path ``i``'s features computed at the end of task ``i``
  (the head records them while the current path is active) and never recomputed; the logits are the
  concatenation over tasks. A forward hook on the model re-runs it for the older paths and assembles the output
  (the default active set, shared + newest task, gives the newest path); it needs a ``PerTaskHead`` in the model
  (a ``RuntimeError`` says so otherwise); evaluation costs one forward per task. The base learner makes the whole
  head trainable at each ``begin_task``; with a ``PerTaskHead`` CL-LoRA freezes the older tasks' heads (and the
  replaced initial head) again, as the logit distillation would otherwise move them. ``inference="sum"``
  activates every task-specific adapter at once (summed, each with its block weights), in training too: one
  forward pass, any head.

Options beyond the official code: ``kd_target="features"`` distils each shared layer's adapter output on the
current inputs, ``s^2 * mean_n ||(B - B_old) A x_n||^2`` (``x`` detached), at almost no cost, its inputs
captured by forward hooks on the shared ``lora_B`` modules (their input is ``A x``); ``inference="sum"``.

Remaining deviations from the official code:

- the official code distils early-exit logits (the features after the shared blocks, classified by the current
  proxy head); we distil the full model's logits (shared and task-specific blocks, then the model's head);
- its proxy classifier (trained with cross-entropy, discarded at evaluation for the prototypes) is a cosine layer
  with a learnable scale; :class:`~avalanche_merge.protocol.PerTaskHead` uses linear per-task heads;
- it takes two optimizer steps per batch (a step on the distillation loss, then one on the cross-entropy); the
  learner's ``penalty()`` is added to the task loss and the training loop takes one step per batch.

Defaults: ``rank=8`` (the official CIFAR-100 config; ImageNet-R uses 10), ``target_modules=("q", "v")``,
shared = first half of the blocks. The training recipe (SGD with momentum 0.9, lr 0.03 with a cosine schedule,
30 epochs, batch 64) belongs to the runner's configuration, not to this learner. torch cannot pickle a
parametrized model whole (``torch.save(model)``): use ``learner.save`` or the ``state_dict``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..config import check_choice, check_range
from ..protocol import PerTaskHead
from .adapters import activate, add_adapter, lifted_b_parametrizations
from .config import LoRAConfig
from .learner import ContinualLoRA
from .registry import register_learner

SHARED = "shared"
BLOCK_PATTERN = r"(?:^|\.)(?:blocks|layers?|resblocks|h)\.(\d+)(?:\.|$)"
INFERENCE = ("auto", "paths", "sum")
KD_TARGETS = ("logits", "features")


class BlockWeight(nn.Module):
    """Parametrization ``B -> beta[index] * B`` of a task-specific ``lora_B`` weight.

    Args:
        beta: the task's block-weight vector; the same :class:`~torch.nn.Parameter` is registered in every layer
            of the task, so that ``model.parameters()`` lists it once and every layer trains it.
        index: this layer's entry of ``beta``.
    """

    def __init__(self, beta: nn.Parameter, index: int) -> None:
        super().__init__()
        self.beta = beta
        self.index = index

    def factor(self) -> torch.Tensor:
        """The scalar multiplying ``B`` (read by :mod:`~avalanche_merge.lora.fold`)."""
        return self.beta[self.index]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor()

    def extra_repr(self) -> str:
        return f"index={self.index}"


def random_orthogonal(rows: int, cols: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal rows (QR of a Gaussian; ``rows <= cols``)."""
    q, r = torch.linalg.qr(torch.randn(cols, rows))
    signs = torch.sign(torch.diagonal(r))
    out = (q * torch.where(signs == 0, 1.0, signs)).T.contiguous()  # unique QR: a Haar-distributed frame
    return out if like is None else out.to(like)


def reassignment_weights(old_b: torch.Tensor) -> torch.Tensor:
    """``w_i = d_out * ||old_b[i]|| / sum_j ||old_b[j]||`` (mean 1); all ones when ``old_b`` is zero."""
    norms = old_b.norm(dim=1)
    total = norms.sum()
    return torch.ones_like(norms) if total <= 0 else norms * (len(norms) / total)


def reassign(b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``b`` in the forward pass; its gradient row ``i`` is multiplied by ``w[i]`` in the backward pass."""
    return b.detach() + (b - b.detach()) * w[:, None]


def feature_kd(z: torch.Tensor, b: torch.Tensor, old_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling^2 * mean_n ||(b - old_b) z_n||^2`` for the adapter inputs ``z = A x`` (..., r)."""
    return F.linear(z, b - old_b).mul(scaling).pow(2).sum(-1).mean()


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target cross-entropy ``-mean_n sum_c softmax(t/T) log softmax(s/T)`` (official code's KD loss)."""
    soft = torch.softmax(teacher.detach() / temperature, dim=-1)
    return -(soft * torch.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def block_orthogonality(previous: Sequence[torch.Tensor], current: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_i |cos(previous_i, current)|`` (previous detached); 0 without previous vectors."""
    if not previous:
        return current.new_zeros(())
    cur = current / (current.norm() + eps)
    return torch.stack([(p.detach() / (p.detach().norm() + eps) * cur).sum().abs() for p in previous]).mean()


def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    return output[0]


def _replace_logits(output, logits: torch.Tensor):
    """``output`` with its logits replaced (a tensor, an object with ``.logits``, or a tuple led by them)."""
    if isinstance(output, torch.Tensor):
        return logits
    if getattr(output, "logits", None) is not None:
        output.logits = logits
        return output
    return (logits, *output[1:])


@dataclass(kw_only=True)
class CLLoRAConfig(LoRAConfig):
    """CL-LoRA options (defaults: the official code; see the module docstring).

    Args:
        rank: LoRA rank; the official CIFAR-100 config's 8 (ImageNet-R: 10).
        target_modules: the official code adapts every block's query and value projections: ``("q", "v")``.
        shared_blocks: blocks (from the input side) whose target layers hold the shared adapter, >= 0;
            ``None``: half the blocks, rounded down (a 1-block model gets task-specific adapters only).
        block_pattern: regex whose first group captures the block index from a module name (default: ``blocks.N``,
            ``layer.N``/``layers.N``, ``resblocks.N``, ``h.N``: timm/TinyViT, BERT/HF ViT, open_clip, GPT-2).
        inference: ``"paths"`` (official: training runs the shared + current task-specific adapter; evaluation
            runs one forward per task path and needs a :class:`~avalanche_merge.protocol.PerTaskHead`), ``"sum"``
            (every task-specific adapter active and summed, training too), or ``"auto"`` (default): ``"paths"``
            when the model has a per-task head when the first task begins, else ``"sum"`` (a domain-incremental
            stream: a sample's task cannot be told from its classes, so no path can be chosen for it).
        kd_target: ``"logits"`` (the model's output, official) or ``"features"`` (each shared adapter's output).
        kd_weight: weight of the distillation loss, >= 0 (0 disables it; the official 5 is for logits).
        temperature: softmax temperature of the logit distillation, > 0.
        reassign: reassign the distillation gradient of the shared ``B`` by the old row norms.
        orth_weight: weight of the block-weight orthogonality loss, >= 0.
    """

    rank: int = 8
    target_modules: tuple[str, ...] = ("q", "v")
    shared_blocks: int | None = None
    block_pattern: str = BLOCK_PATTERN
    inference: str = "auto"
    kd_target: str = "logits"
    kd_weight: float = 5.0
    temperature: float = 2.0
    reassign: bool = True
    orth_weight: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_blocks is not None:
            if isinstance(self.shared_blocks, bool) or not isinstance(self.shared_blocks, int):
                raise ValueError(f"shared_blocks must be None or an int >= 0, got {self.shared_blocks!r}")
            if self.shared_blocks < 0:
                raise ValueError(f"shared_blocks must be None or an int >= 0, got {self.shared_blocks}")
        try:
            groups = re.compile(self.block_pattern).groups
        except (re.error, TypeError) as err:
            raise ValueError(f"block_pattern must be a valid regex, got {self.block_pattern!r}: {err}") from None
        if groups < 1:
            raise ValueError(f"block_pattern must capture the block index in a group, got {self.block_pattern!r}")
        check_choice("inference", self.inference, INFERENCE)
        check_choice("kd_target", self.kd_target, KD_TARGETS)
        check_range("kd_weight", self.kd_weight, 0.0)
        check_range("temperature", self.temperature, 0.0, None, low_open=True)
        check_range("orth_weight", self.orth_weight, 0.0)

    def check_protocol(self, protocol: str) -> None:
        """Refuse a head protocol these options cannot run: the per-task paths need a per-task head."""
        if self.inference == "paths" and protocol != "per_task":  # explicit paths (auto adapts)
            raise ValueError(f"cllora's per-task inference paths (inference='paths') need the 'per_task' head "
                             f"protocol, got {protocol!r}; set options.inference='sum' to run it under another head")


@register_learner
class CLLoRA(ContinualLoRA):
    """CL-LoRA learner: a shared adapter in early blocks, per-task weighted adapters in later blocks."""

    name = "cllora"
    config_cls = CLLoRAConfig
    per_task = True
    conv_targets = False  # orthogonal A of an nn.Linear input

    def __init__(self, model: nn.Module, *, config: CLLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
        self._inference: str | None = None  # "auto" resolved at the first task
        cfg: CLLoRAConfig = self.config
        pattern = re.compile(cfg.block_pattern)
        indices = [int(m.group(1)) for n, _ in model.named_modules() if (m := pattern.search(n))]
        blocks = {}
        for target in self.targets:
            found = pattern.search(target)
            if found is None:
                raise ValueError(f"cannot find the block index of target layer {target!r} with block_pattern "
                                 f"{cfg.block_pattern!r}; set block_pattern to a regex whose first group captures it")
            blocks[target] = int(found.group(1))
        self.depth = max(indices) + 1
        shared = self.depth // 2 if cfg.shared_blocks is None else cfg.shared_blocks
        if shared > self.depth:
            raise ValueError(f"shared_blocks must be in [0, {self.depth}] for this model ({self.depth} blocks), "
                             f"got {shared}")
        self.shared_targets = [t for t in self.targets if blocks[t] < shared]
        self.specific_targets = [t for t in self.targets if blocks[t] >= shared]
        for t in self.targets:
            layer = model.get_submodule(t)
            if cfg.rank > layer.in_features:
                raise ValueError(f"rank must be <= the input width {layer.in_features} of {t!r} (orthogonal A), "
                                 f"got {cfg.rank}")
        self._blocks: dict[str, dict[str, BlockWeight]] = {}  # task adapter -> layer -> parametrization
        self.old_shared: dict[str, torch.Tensor] = {}  # shared B at the end of the previous task, per layer
        self._w: dict[str, torch.Tensor] = {}
        self._z: dict[str, torch.Tensor] = {}
        self._batch: tuple | None = None
        self._output = None
        self._teaching = False
        self._in_paths = False
        if cfg.kd_target == "logits":
            model.register_forward_pre_hook(self._capture_input, with_kwargs=True)
            model.register_forward_hook(self._capture_output)
        model.register_forward_hook(self._paths_hook, with_kwargs=True)

    # -- adapters ------------------------------------------------------------------------------------------
    @property
    def block_weights(self) -> dict[str, nn.Parameter]:
        """``{task adapter: beta_t}``, read from the parametrizations (so ``model.to(...)`` cannot stale it)."""
        return {name: next(iter(modules.values())).beta for name, modules in self._blocks.items()}

    def specific_adapters(self) -> list[str]:
        """The task-specific adapters, in task order."""
        return [a for a in self.adapters if a != SHARED]

    def active_adapters(self) -> list[str]:
        """The adapters of the default forward: shared + newest task (``"paths"``), or all (``"sum"``)."""
        if self.inference == "sum":
            return list(self.adapters)
        return [a for a in self.adapters if a == SHARED] + self.specific_adapters()[-1:]

    def _add(self, name: str) -> None:
        """Create adapter ``name`` (shared or task-specific) with its init, hooks and block weights."""
        targets = self.shared_targets if name == SHARED else self.specific_targets
        add_adapter(self.model, name, self.config, targets)
        self.adapters.append(name)
        layers = self.layers()
        with torch.no_grad():
            for t in targets:
                a = layers[t].lora_A[name].weight
                a.copy_(random_orthogonal(*a.shape, like=a))
                layers[t].lora_B[name].weight.zero_()
        if name == SHARED:
            for t in targets:
                layers[t].lora_B[name].register_forward_hook(self._shared_hook(t))
            return
        ref = layers[targets[0]].lora_B[name].weight
        beta = nn.Parameter(torch.empty(len(targets)).uniform_(0.5, 1.5).to(ref))
        self._blocks[name] = {t: BlockWeight(beta, j) for j, t in enumerate(targets)}
        for t, module in self._blocks[name].items():
            parametrize.register_parametrization(layers[t].lora_B[name], "weight", module)

    def _shared_hook(self, layer: str):
        def hook(module, inputs, output):
            if self._teaching:  # teacher forward: the previous task's shared adapter
                return F.linear(inputs[0], self.old_shared[layer])
            if (torch.is_grad_enabled() and not self._in_paths and self.old_shared
                    and self.config.kd_target == "features"):
                self._z[layer] = inputs[0]  # = A x, for the feature distillation
            return None
        return hook

    def _capture_input(self, module, args, kwargs):
        if torch.is_grad_enabled() and not (self._teaching or self._in_paths) and self.old_shared:
            self._batch = (args, kwargs)

    def _capture_output(self, module, args, output):
        if torch.is_grad_enabled() and not (self._teaching or self._in_paths) and self.old_shared:
            self._output = output

    # -- per-path inference --------------------------------------------------------------------------------
    def per_task_head(self) -> PerTaskHead | None:
        """The model's :class:`~avalanche_merge.protocol.PerTaskHead` (the first found), or None."""
        return next((m for m in self.model.modules() if isinstance(m, PerTaskHead)), None)

    def _paths_hook(self, module, args, kwargs, output):
        """In evaluation with ``inference="paths"``: the logits of task ``i``'s classes from path ``i``."""
        if self.inference != "paths" or module.training or self._in_paths:
            return None
        specifics = self.specific_adapters()
        if len(specifics) < 2:
            return None
        head = self.per_task_head()
        if head is None:
            raise RuntimeError("CL-LoRA's per-task inference (inference='paths') needs the per_task head protocol "
                               "(avalanche_merge.protocol.PerTaskHead in the model: one head or set of prototypes "
                               "per task), or inference='sum'")
        if head.is_recording:  # prototypes of the current task: the current path (active now)
            return None
        if len(head.task_classes) != len(specifics):
            raise RuntimeError(f"CL-LoRA's per-task inference needs one PerTaskHead task per task-specific adapter, "
                               f"got {len(head.task_classes)} head tasks for {len(specifics)} adapters")
        logits = _logits(output)
        assembled = logits.clone()
        newest_given = self._is_default_active()
        paths = specifics[:-1] if newest_given else specifics
        self._in_paths = True
        try:
            for name in paths:
                with self._only(name):
                    path = _logits(module(*args, **kwargs))
                classes = head.task_classes[specifics.index(name)]
                assembled[..., classes] = path[..., classes].to(assembled.dtype)
        finally:
            self._in_paths = False
        return _replace_logits(output, assembled)

    def _is_default_active(self) -> bool:
        active = self.active_adapters()
        return all(list(layer.active_adapters) == [a for a in active if a in layer.lora_A]
                   for layer in self.layers().values())

    @contextmanager
    def _only(self, name: str) -> Iterator[None]:
        """Activate the shared adapter and task-specific adapter ``name``; restore the active set and flags after."""
        layers = self.layers()
        active = {n: list(layer.active_adapters) for n, layer in layers.items()}
        flags = [(p, p.requires_grad) for layer in layers.values()
                 for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())]
        try:
            activate(self.model, [a for a in self.adapters if a in (SHARED, name)])
            yield
        finally:
            for n, layer in layers.items():
                layer.set_adapter(active[n])
            for p, flag in flags:
                p.requires_grad_(flag)

    # -- the protocol --------------------------------------------------------------------------------------
    def begin_task(self, inputs: Iterable | None = None) -> list[nn.Parameter]:
        """Snapshot the shared adapter, add task ``t``'s specific adapter; return the parameters to train."""
        self.task += 1
        if self.shared_targets and SHARED not in self.adapters:
            self._add(SHARED)
        if self.specific_targets:
            self._add(f"task{self.task}")
        self._setup_task(inputs)
        self._activate()
        return self.trainable_parameters()

    def _setup_task(self, inputs: Iterable | None) -> None:
        if self.task > 0 and self.shared_targets:
            layers = self.layers()
            self._set_old({t: layers[t].lora_B[SHARED].weight.detach().clone() for t in self.shared_targets})

    def _set_old(self, old: dict[str, torch.Tensor]) -> None:
        self.old_shared = old
        self._w = {t: reassignment_weights(b) for t, b in old.items()}

    def trainable_adapters(self) -> list[str]:
        current = f"task{self.task}"
        return [a for a in self.adapters if a in (SHARED, current)]

    @property
    def inference(self) -> str:
        """``"paths"`` or ``"sum"``; with ``inference="auto"``, ``"paths"`` when the model has a per-task head when
        the first task begins, else ``"sum"`` (fixed from then on)."""
        if self.config.inference != "auto":
            return self.config.inference
        if self._inference is None:
            return "paths" if self.per_task_head() is not None else "sum"
        return self._inference

    def _activate(self) -> None:
        if self.config.inference == "auto" and self._inference is None:
            self._inference = "paths" if self.per_task_head() is not None else "sum"
        super()._activate()
        if self.inference == "paths":
            activate(self.model, self.active_adapters(), self.trainable_adapters())
        layers = self.layers()
        for t in self.shared_targets:
            if SHARED in layers[t].lora_A:
                layers[t].lora_A[SHARED].weight.requires_grad_(False)  # the fixed orthogonal down-projection
        for name, beta in self.block_weights.items():  # also while the parametrizations are lifted (load)
            beta.requires_grad_(name == f"task{self.task}")
        head = self.per_task_head()
        if head is not None and self.head_name:  # the base re-enables the whole head: old tasks' heads stay frozen
            for old in head.heads[:-1]:
                old.requires_grad_(False)
            if head.initial is not None:
                head.initial.requires_grad_(False)

    def penalty(self) -> torch.Tensor | None:
        cfg: CLLoRAConfig = self.config
        total = None
        if cfg.kd_weight and self.old_shared:
            kd = self._feature_kd() if cfg.kd_target == "features" else self._logit_kd()
            total = None if kd is None else cfg.kd_weight * kd
        current = self.block_weights.get(f"task{self.task}")
        previous = [b for n, b in self.block_weights.items() if n != f"task{self.task}"]
        if cfg.orth_weight and current is not None and previous:
            orth = cfg.orth_weight * block_orthogonality(previous, current)
            total = orth if total is None else total + orth
        self._z, self._batch, self._output = {}, None, None
        return total

    def _feature_kd(self) -> torch.Tensor | None:
        if not self._z:
            return None
        layers, terms = self.layers(), []
        for t, z in self._z.items():
            b = layers[t].lora_B[SHARED].weight
            b = reassign(b, self._w[t]) if self.config.reassign else b
            terms.append(feature_kd(z.detach(), b, self.old_shared[t], layers[t].scaling[SHARED]))
        return torch.stack(terms).mean()

    def _logit_kd(self) -> torch.Tensor | None:
        if self._batch is None or self._output is None:
            return None
        args, kwargs = self._batch
        self._teaching = True  # same model and active adapters, the old shared B
        try:
            with torch.no_grad():
                teacher = _logits(self.model(*args, **kwargs))
        finally:
            self._teaching = False
        kd = logit_kd(_logits(self._output), teacher, self.config.temperature)
        if not (self.config.reassign and kd.requires_grad):
            return kd
        layers = self.layers()
        bs = [layers[t].lora_B[SHARED].weight for t in self.shared_targets]
        grads = torch.autograd.grad(kd, bs, retain_graph=True, allow_unused=True)
        # surrogate: value kd, gradient w * g on each shared B (only the KD part is reassigned), rest unchanged
        fix = [((b - b.detach()) * ((self._w[t] - 1)[:, None] * g)).sum()
               for t, b, g in zip(self.shared_targets, bs, grads, strict=True) if g is not None]
        return kd + torch.stack(fix).sum() if fix else kd

    # -- state ---------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"block::{n}": b.detach().clone() for n, b in self.block_weights.items()}
        return state | {f"old_shared::{t}": b.clone() for t, b in self.old_shared.items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"block::{n}" for n in self.block_weights}
        if self.task > 0:
            expected |= {f"old_shared::{t}" for t in self.shared_targets}
        if set(state) != expected:
            raise ValueError(f"CL-LoRA extra state does not match: missing {sorted(expected - set(state))[:4]}, "
                             f"unexpected {sorted(set(state) - expected)[:4]}")
        with torch.no_grad():
            for n, beta in self.block_weights.items():
                beta.copy_(state[f"block::{n}"])
        layers = self.layers()
        old = {t: state[f"old_shared::{t}"].to(layers[t].lora_B[SHARED].weight) for t in self.shared_targets
               if f"old_shared::{t}" in state}
        self._set_old(old)

    def save(self, path: str | Path) -> None:
        """As :meth:`ContinualLoRA.save`, with the raw task-specific ``B`` (not ``beta * B``) and the betas."""
        with self._bare_weights():
            super().save(path)

    def load(self, path: str | Path) -> None:
        """Create the saved adapters with their own targets, hooks and block weights, then restore them."""
        from ..safe_load import open_safetensors

        with open_safetensors(path) as f:
            meta = f.metadata() or {}
        mine = json.loads(json.dumps(vars(self.config), default=list))
        if meta.get("method") == self.name and json.loads(meta.get("config", "null")) == mine:
            for name in json.loads(meta["adapters"]):
                if name not in self.adapters:
                    self._add(name)
        with self._bare_weights():
            super().load(path)  # checks method and config, loads A, raw B, the head and the extra state

    def _bare_weights(self):
        """Lift the block-weight parametrizations (same parameter objects): ``lora_B.weight`` is the raw ``B``."""
        return lifted_b_parametrizations(self.model, self._blocks)


__all__ = ["INFERENCE", "KD_TARGETS", "BlockWeight", "CLLoRA", "CLLoRAConfig", "block_orthogonality", "feature_kd",
           "logit_kd", "random_orthogonal", "reassign", "reassignment_weights"]

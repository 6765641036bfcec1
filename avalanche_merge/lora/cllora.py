"""CL-LoRA: continual low-rank adaptation for rehearsal-free class-incremental learning (He, Duan and Zhu,
CVPR 2025, arXiv 2505.24816; official code github.com/JiangpengHe/CL-LoRA).

Dual adapters (the paper's method section and overview figure). The target layers of the first ``shared_blocks``
transformer blocks (default: the first half, as the official ViT-B/16 split 0-5 / 6-11) hold one **task-shared**
adapter trained on every task; the later blocks get a new **task-specific** adapter per task, frozen afterwards.
In peft's notation (``A``: r x d_in down-projection, ``B``: d_out x r up-projection):

- shared adapter: ``A_s`` a random orthogonal matrix, fixed; ``B_s`` zero-initialised and trained (paper: "random
  orthogonal matrices"; official code: Q of the QR of a uniform [0, 1) matrix, frozen; we QR a Gaussian, whose Q
  is uniformly distributed). Knowledge distillation
  from the previous model keeps ``B_s`` close to its old function, and only the distillation gradient is
  reassigned row-wise by the old adapter's row norms (official code ``models/cllora.py``)::

      grad_B[i, :] <- w_i * grad_B[i, :],   w_i = d_out * ||B_old[i, :]|| / sum_j ||B_old[j, :]||

- task-specific adapters: ``A`` random orthogonal (trainable), ``B`` zero; the output of adapter ``t`` in its
  j-th layer is scaled by a learnable block weight ``beta_t[j]`` (init U(0.5, 1.5) as in the official code), and
  ``orth_weight * mean_{i<t} |cos(beta_t, beta_i)|`` keeps the block weights of different tasks orthogonal.

Deviations, all forced by this package's single-model protocol: the paper concatenates one forward pass per
task-specific adapter and classifies with prototypes (as EASE); here every task-specific adapter is active and
summed (with its block weights) in one forward pass, during training too. The paper distils early-exit logits
(shared blocks, then the head); ``kd_target="logits"`` distils the full model's logits (teacher: the model
with the old shared ``B``) with a soft-target cross-entropy at ``temperature``; it costs one teacher forward and
one extra backward (to reassign only the KD gradient) per step. The default ``kd_target="features"``
distils each shared layer's adapter output on the current inputs, ``s^2 * mean_n ||(B - B_old) A x_n||^2``
(``x`` detached), at almost no cost. The inputs are captured during the normal forward pass by forward hooks on
the shared ``lora_B`` modules (their input is ``A x``) and, for logits, on the model; ``penalty()`` consumes
the last captured batch. Block weights live in forward hooks on the task-specific ``lora_B`` modules, so peft's
``merge`` and :func:`~avalanche_merge.lora.adapters.delta_weight` ignore them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_range
from .adapters import add_adapter
from .config import LoRAConfig
from .learner import ContinualLoRA
from .registry import register_learner

SHARED = "shared"
BLOCK_PATTERN = r"(?:^|\.)(?:blocks|layers?|resblocks|h)\.(\d+)(?:\.|$)"


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


@dataclass(kw_only=True)
class CLLoRAConfig(LoRAConfig):
    """CL-LoRA options (official configs: q and v adapted, KD weight 5 at T = 2, orthogonality weight 1e-4).

    Args:
        shared_blocks: blocks (from the input side) whose target layers hold the shared adapter, >= 0;
            ``None``: half the blocks, rounded down (a 1-block model gets task-specific adapters only).
        block_pattern: regex whose first group captures the block index from a module name (default: ``blocks.N``,
            ``layer.N``/``layers.N``, ``resblocks.N``, ``h.N``: timm/TinyViT, BERT/HF ViT, open_clip, GPT-2).
        kd_target: ``"features"`` (each shared adapter's output) or ``"logits"`` (the model's output).
        kd_weight: weight of the distillation loss, >= 0 (0 disables it; the paper's 5 is for logits).
        temperature: softmax temperature of the logit distillation, > 0.
        reassign: reassign the distillation gradient of the shared ``B`` by the old row norms.
        orth_weight: weight of the block-weight orthogonality loss, >= 0.
    """

    target_modules: tuple[str, ...] = ("q", "v")
    shared_blocks: int | None = None
    block_pattern: str = BLOCK_PATTERN
    kd_target: str = "features"
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
        if self.kd_target not in ("features", "logits"):
            raise ValueError(f"kd_target must be 'features' or 'logits', got {self.kd_target!r}")
        check_range("kd_weight", self.kd_weight, 0.0)
        check_range("temperature", self.temperature, 0.0, None, low_open=True)
        check_range("orth_weight", self.orth_weight, 0.0)


@register_learner
class CLLoRA(ContinualLoRA):
    """CL-LoRA learner: a shared adapter in early blocks, per-task weighted adapters in later blocks."""

    name = "cllora"
    config_cls = CLLoRAConfig
    per_task = True

    def __init__(self, model: nn.Module, *, config: CLLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
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
        self.block_weights: dict[str, nn.Parameter] = {}
        self.old_shared: dict[str, torch.Tensor] = {}  # shared B at the end of the previous task, per layer
        self._w: dict[str, torch.Tensor] = {}
        self._z: dict[str, torch.Tensor] = {}
        self._batch: tuple | None = None
        self._output = None
        self._teaching = False
        if cfg.kd_target == "logits":
            model.register_forward_pre_hook(self._capture_input, with_kwargs=True)
            model.register_forward_hook(self._capture_output)

    # -- adapters ------------------------------------------------------------------------------------------
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
        self.block_weights[name] = nn.Parameter(torch.empty(len(targets)).uniform_(0.5, 1.5).to(ref))
        for j, t in enumerate(targets):
            layers[t].lora_B[name].register_forward_hook(self._block_hook(name, j))

    def _block_hook(self, name: str, j: int):
        def hook(module, inputs, output):
            return output * self.block_weights[name][j]
        return hook

    def _shared_hook(self, layer: str):
        def hook(module, inputs, output):
            if self._teaching:  # teacher forward: the previous task's shared adapter
                return F.linear(inputs[0], self.old_shared[layer])
            if torch.is_grad_enabled() and self.old_shared and self.config.kd_target == "features":
                self._z[layer] = inputs[0]  # = A x, for the feature distillation
            return None
        return hook

    def _capture_input(self, module, args, kwargs):
        if torch.is_grad_enabled() and not self._teaching and self.old_shared:
            self._batch = (args, kwargs)

    def _capture_output(self, module, args, output):
        if torch.is_grad_enabled() and not self._teaching and self.old_shared:
            self._output = output

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

    def _activate(self) -> None:
        super()._activate()
        layers = self.layers()
        for t in self.shared_targets:
            if SHARED in layers[t].lora_A:
                layers[t].lora_A[SHARED].weight.requires_grad_(False)  # the fixed orthogonal down-projection
        for name, beta in self.block_weights.items():
            beta.requires_grad_(name == f"task{self.task}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + [b for b in self.block_weights.values() if b.requires_grad]

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
        self._teaching = True
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

    def load(self, path: str | Path) -> None:
        """Create the saved adapters with their own targets and hooks, then restore them (see base ``load``)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        mine = json.loads(json.dumps(vars(self.config), default=list))
        if meta.get("method") == self.name and json.loads(meta.get("config", "null")) == mine:
            for name in json.loads(meta["adapters"]):
                if name not in self.adapters:
                    self._add(name)
        super().load(path)  # checks method and config, loads A, B, the head and the extra state


__all__ = ["CLLoRA", "CLLoRAConfig", "block_orthogonality", "feature_kd", "logit_kd", "random_orthogonal",
           "reassign", "reassignment_weights"]

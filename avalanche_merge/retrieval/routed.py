"""Retrieval-routed per-task LoRA: CoLoR and Proteus (pure torch / peft / scikit-learn; no Avalanche import).

Every task ``t`` gets its own peft LoRA adapter ``task{t}`` and its own classification head over the task's classes.
After training task ``t``, the inputs of the task are embedded by the **pretrained** backbone (every adapter
inactive) and a :class:`~avalanche_merge.retrieval.signatures.TaskSignatures` signature is fitted on them. At
test time an input is embedded by the pretrained backbone, routed to a task, run through the backbone with only
that task's adapter (Proteus: plus its gated transfer from earlier adapters, below) and classified by that task's
head. In eval mode a batch routed to several tasks runs the adapted backbone once: each LoRA layer adds every
task's low-rank term at once (concatenated ``A`` and ``B``), weighted per input by its task's coefficients (1 for
its own adapter, its transfer gates for earlier ones, 0 otherwise), so each input sees exactly its task's module
(:attr:`RoutedLoRA.batch_tasks`; False runs one backbone pass per task present, the implementation before
issue 19).

- **CoLoR** (Wistuba et al., "Continual Learning with Low Rank Adaptation", arXiv 2311.17601): one LoRA per task,
  routing by k-means prototypes of pretrained features (``signature_method="centroid"``), no penalty.
- **Proteus** (Le et al., arXiv 2603.13235; we could not read the paper, the details below are **our choices**
  following its description): per-task LoRA; Dirichlet-process GMM signatures (``signature_method="dpgmm"``);
  the loss of task ``t`` adds

      lambda_orth * sum_layers sum_{i<t} |A_i A_t^T|_1        (orthogonality to earlier modules, as O-LoRA)
    + lambda_l1   * sum_{i<t} |w_{t,i}|                       (selective transfer: sparse combination weights)
    + lambda_l2   * sum_layers (||A_t||^2 + ||B_t||^2)        (small new module)

  where ``w_t`` (learnable, initialised to 0 = no transfer) gates the frozen earlier adapters: while running task
  ``t`` the adapters ``0..t`` are active and the output of earlier adapter ``i`` is multiplied by ``w_{t,i}``, so
  task ``t``'s module is ``B_t A_t + sum_i w_{t,i} B_i A_i``; the L1 penalty keeps only useful earlier modules.
  ``transfer=False`` drops the gates (and the L1 term). The head is ``"linear"`` (trained with the adapter) or
  ``"lda"``: trained linearly during the task (the adapter needs a loss), then replaced after the task by the
  LDA classifier of the task's adapted features (class means, pooled within-class covariance + ``lda_shrinkage``
  times its mean variance on the diagonal, uniform class priors).

Class-incremental outputs: a task's head scores only that task's classes; :meth:`RoutedLoRA.forward` writes them
into their global label columns of a ``[B, num_classes]`` output whose other columns are ``FILL`` (-1e9, finite
so that a cross-entropy stays finite). Before any task is trained, ``forward`` is the backbone's own forward with
every adapter inactive (the pretrained model). Router ``"oracle"`` (ablations) uses given task ids
(``forward(x, task_ids=...)`` or :attr:`RoutedLoRA.oracle_task`) instead of signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_range
from ..lora.adapters import (
    activate,
    adapter_parameters,
    add_adapter,
    lora_layers,
    record_foreign_adapters,
    resolve_targets,
)
from ..lora.config import LoRAConfig, check_positive_int
from ..lora.olora import orthogonality_penalty
from ..merging.heads import find_head
from .signatures import COVARIANCE_TYPES, METHODS, REDUCTIONS, SignatureConfig, TaskSignatures

ROUTERS = ("signatures", "oracle")
HEAD_TYPES = ("linear", "lda")
FILL = -1e9


def _output_linear(head: nn.Module) -> nn.Linear | None:
    """The output ``nn.Linear`` of a head: the module itself or its ``classifier`` (Avalanche's
    ``IncrementalClassifier``); None otherwise."""
    layer = head if isinstance(head, nn.Linear) else getattr(head, "classifier", None)
    return layer if isinstance(layer, nn.Linear) else None


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(kw_only=True)
class RoutedLoRAConfig(LoRAConfig):
    """Options of a retrieval-routed per-task LoRA (CoLoR defaults); the :class:`LoRAConfig` fields set the adapters.

    ``train_head`` and ``head`` of :class:`LoRAConfig` only name the backbone's own head (excluded from the LoRA
    targets, used only before the first task); the per-task heads are always trained.

    Args:
        router: ``"signatures"`` (route by task signatures of pretrained embeddings) or ``"oracle"`` (given ids).
        signature_method: ``"centroid"`` (k-means prototypes, CoLoR) or ``"dpgmm"`` (DP-GMM, Proteus).
        n_components: k-means k or maximum mixture components, >= 1.
        covariance_type: ``"oas"`` (default), ``"ledoit_wolf"``, ``"full"`` or ``"diag"`` (dpgmm; see
            :class:`~avalanche_merge.retrieval.signatures.SignatureConfig`).
        reduce: ``None`` (default, the embeddings themselves), ``"pca"`` or ``"whiten"``: a projection of the
            embeddings fitted on the **first task only** (lossy: directions where only later tasks vary are lost).
        dim: PCA dimensions, >= 1 (with ``reduce`` only).
        head_type: ``"linear"`` or ``"lda"`` (see the module docstring).
        lda_shrinkage: LDA covariance shrinkage, >= 0.
        lambda_orth: orthogonality penalty weight, >= 0 (0 for CoLoR).
        lambda_l1: L1 weight on the transfer gates, >= 0.
        lambda_l2: squared-L2 weight on the new adapter, >= 0.
        transfer: learn gates over the earlier adapters (Proteus' selective transfer).
    """

    router: str = "signatures"
    signature_method: str = "centroid"
    n_components: int = 5
    covariance_type: str = "oas"
    reduce: str | None = None
    dim: int = 32
    head_type: str = "linear"
    lda_shrinkage: float = 1e-2
    lambda_orth: float = 0.0
    lambda_l1: float = 0.0
    lambda_l2: float = 0.0
    transfer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("router", self.router, ROUTERS)
        _check_choice("signature_method", self.signature_method, METHODS)
        check_positive_int("n_components", self.n_components)
        _check_choice("covariance_type", self.covariance_type, COVARIANCE_TYPES)
        _check_choice("reduce", self.reduce, REDUCTIONS)
        check_positive_int("dim", self.dim)
        _check_choice("head_type", self.head_type, HEAD_TYPES)
        for name in ("lda_shrinkage", "lambda_orth", "lambda_l1", "lambda_l2"):
            check_range(name, getattr(self, name), 0.0)
        if not isinstance(self.transfer, bool):
            raise ValueError(f"transfer must be true or false, got {self.transfer!r}")

    def signature_config(self) -> SignatureConfig:
        return SignatureConfig(method=self.signature_method, n_components=self.n_components,
                               covariance_type=self.covariance_type, reduce=self.reduce, dim=self.dim)


@dataclass(kw_only=True)
class CoLoRConfig(RoutedLoRAConfig):
    """CoLoR: k-means prototype routing, no penalties (the :class:`RoutedLoRAConfig` defaults)."""


@dataclass(kw_only=True)
class ProteusConfig(RoutedLoRAConfig):
    """Proteus: DP-GMM routing, orthogonality + L1 (transfer gates) + L2 (new adapter) penalties (our defaults).

    ``lambda_orth = 0.5`` is O-LoRA's default; ``lambda_l1 = 1e-2``, ``lambda_l2 = 1e-4`` and
    ``head_type="lda"`` are our choices (the LDA head is fitted in closed form, so it does not underfit when a task
    gets few steps: 0.84 vs 0.28 diagonal accuracy on the tiny split_digits run at lr 1e-2).
    """

    signature_method: str = "dpgmm"
    head_type: str = "lda"
    lambda_orth: float = 0.5
    lambda_l1: float = 1e-2
    lambda_l2: float = 1e-4
    transfer: bool = True


def _mixed_term(a_cat: torch.Tensor, b_cat: torch.Tensor, columns: torch.Tensor):
    """Forward hook adding ``B_cat (columns * A_cat x)`` to a layer's output (``columns``: ``[B, R]``, per input)."""
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(args[0], a_cat)
        coefficients = columns.view(columns.shape[0], *[1] * (hidden.dim() - 2), columns.shape[1])
        return output + F.linear(hidden * coefficients, b_cat)
    return hook


class RoutedLoRA(nn.Module):
    """A backbone with per-task LoRA adapters and heads whose ``forward`` routes each input to one task.

    Driven by ``params = begin_task(classes)``, ``loss + penalty()`` each step, then ``end_task(inputs, labels)``
    (fits the LDA head if any and the task signature). ``route(x)`` implements the :class:`Router` interface.

    Args:
        backbone: the model (modified in place: peft injects the adapters; its parameters are frozen).
        config: a :class:`RoutedLoRAConfig`.
        num_classes: width of the output (default: the backbone head's ``out_features``).
        feature_fn: inputs -> ``[B, d]`` features for the task heads and signatures. Default: the backbone's own
            ``features(x)`` when it also has ``feature_dim`` (the package's models), else the input of its head
            (found like :func:`~avalanche_merge.merging.heads.find_head`) during ``backbone(x)``.
        feature_dim: ``d``; default: ``backbone.feature_dim``, else the head's ``in_features``, else inferred by
            :meth:`infer_feature_dim` from a few inputs.

    Raises:
        TypeError: ``feature_fn`` is not callable, or ``config`` is not a :class:`RoutedLoRAConfig`.
        ValueError: no number of classes can be read off the head and ``num_classes`` is not given.
    """

    def __init__(self, backbone: nn.Module, *, config: RoutedLoRAConfig | None = None,
                 num_classes: int | None = None, feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 feature_dim: int | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else CoLoRConfig()
        if not isinstance(self.config, RoutedLoRAConfig):
            raise TypeError(f"config must be a RoutedLoRAConfig, got {type(self.config).__name__}")
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable (inputs -> [B, d] features), got {type(feature_fn).__name__}")
        self.backbone = backbone
        head_name = find_head(backbone, self.config.head)
        self.head_name = head_name
        head_layer = _output_linear(backbone.get_submodule(head_name))
        own = callable(getattr(backbone, "features", None)) and hasattr(backbone, "feature_dim")
        self.feature_fn = feature_fn
        self._own_features = own and feature_fn is None  # the backbone's features(x) / feature_dim (our models)
        if feature_dim is None:
            if own and feature_fn is None:
                feature_dim = int(backbone.feature_dim)
            elif feature_fn is None and head_layer is not None:
                feature_dim = int(head_layer.in_features)
        if feature_dim is not None:
            check_positive_int("feature_dim", feature_dim)
        self.feature_dim = feature_dim  # None: inferred from the first inputs (infer_feature_dim)
        if num_classes is None:
            if head_layer is None:
                raise ValueError(f"the head {head_name!r} ({type(backbone.get_submodule(head_name)).__name__}) has "
                                 f"no nn.Linear output layer to read the number of classes from; pass num_classes")
            num_classes = int(head_layer.out_features)
        check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        record_foreign_adapters(backbone)  # a user's peft adapters stay as they are
        self.targets = resolve_targets(backbone, self.config.target_modules, exclude=[head_name])
        backbone.requires_grad_(False)
        self.heads = nn.ModuleList()
        self.gates = nn.ParameterList()  # gates[t]: weights of task t over adapters 0..t-1 (empty for t = 0)
        self.task_classes: list[torch.Tensor] = []
        self.signatures = TaskSignatures(config=self.config.signature_config())
        self.adapters: list[str] = []
        self.training_task: int | None = None  # the task being trained (its adapter is trainable)
        self.oracle_task: int | None = None  # task used by router "oracle" when forward gets no task_ids
        self.last_routed: torch.Tensor | None = None
        self._gate_of: dict[str, torch.Tensor] = {}  # earlier adapter name -> gate of the task being run
        self.batch_tasks = True  # one adapted pass for a batch routed to several tasks (see the module docstring)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """``feature_fn(x)``, else the input of the backbone's head during ``backbone(x)`` (any model with a head)."""
        if self.feature_fn is not None:
            return self.feature_fn(x)
        if self._own_features:
            return self.backbone.features(x)
        seen: list[torch.Tensor] = []
        handle = self.backbone.get_submodule(self.head_name).register_forward_pre_hook(
            lambda module, args: seen.append(args[0]))
        try:
            self.backbone(x)
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"the backbone's forward never called its head {self.head_name!r}; pass feature_fn")
        return seen[0].flatten(1)

    @torch.no_grad()
    def infer_feature_dim(self, x: torch.Tensor) -> int:
        """Set :attr:`feature_dim` from the features of a few inputs ``x`` (when it could not be read off the head)."""
        if self.feature_dim is None:
            was = self.training
            self.eval()
            try:
                if self.adapters:
                    self._set_active([], {})
                self.feature_dim = int(self._features(x).shape[1])
            finally:
                self.train(was)
        return self.feature_dim

    @property
    def num_tasks(self) -> int:
        return len(self.adapters)

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # -- the task calls ------------------------------------------------------------------------------------
    def begin_task(self, classes: Iterable[int]) -> list[nn.Parameter]:
        """Add task ``num_tasks``'s adapter, head (over ``classes``, global labels) and gates; return its params."""
        classes = torch.as_tensor(sorted({int(c) for c in classes}), dtype=torch.long)
        if classes.numel() == 0:
            raise ValueError("a task needs at least one class")
        if classes.min() < 0 or classes.max() >= self.num_classes:
            raise ValueError(f"task classes must lie in [0, {self.num_classes}), got {classes.tolist()}")
        t = self.num_tasks
        for earlier in range(t):  # earlier tasks are frozen for good
            for p in self.task_parameters(earlier):
                p.requires_grad_(False)
        name = f"task{t}"
        add_adapter(self.backbone, name, self.config, self.targets)
        for layer in lora_layers(self.backbone).values():
            layer.lora_B[name].register_forward_hook(self._gate_hook(name))
        if self.feature_dim is None:
            raise ValueError("the feature dimension is unknown: pass feature_dim, or call infer_feature_dim(inputs) "
                             "before the first task (RoutedPlugin does)")
        device = self._device()
        self.adapters.append(name)
        self.heads.append(nn.Linear(self.feature_dim, len(classes)).to(device))
        n_gates = t if self.config.transfer else 0
        self.gates.append(nn.Parameter(torch.zeros(n_gates, device=device)))
        self.task_classes.append(classes.to(device))
        self.training_task = t
        return self.task_parameters(t)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Adapter, head and gates of task ``t``."""
        return [*adapter_parameters(self.backbone, self.adapters[t]), *self.heads[t].parameters(), self.gates[t]]

    def penalty(self) -> torch.Tensor | None:
        """The task loss regulariser of the task being trained (None when all weights are 0 or no task)."""
        cfg, t = self.config, self.training_task
        if t is None or not (cfg.lambda_orth or cfg.lambda_l1 or cfg.lambda_l2):
            return None
        total = self.gates[t].new_zeros(())
        new, old = self.adapters[t], self.adapters[:t]
        for layer in lora_layers(self.backbone).values():
            a_new = layer.lora_A[new].weight
            if cfg.lambda_orth and old:
                total = total + cfg.lambda_orth * orthogonality_penalty([layer.lora_A[o].weight for o in old], a_new)
            if cfg.lambda_l2:
                total = total + cfg.lambda_l2 * (a_new.pow(2).sum() + layer.lora_B[new].weight.pow(2).sum())
        if cfg.lambda_l1:
            total = total + cfg.lambda_l1 * self.gates[t].abs().sum()
        return total

    @torch.no_grad()
    def end_task(self, inputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None) -> None:
        """End the task: fit its LDA head (``head_type="lda"``, needs ``labels``) and its signature.

        ``inputs`` (and ``labels``) are mini-batches of the task's data (global labels).
        """
        t = self.training_task
        if t is None:
            raise RuntimeError("end_task called without begin_task")
        if not inputs:
            raise ValueError("end_task needs at least one batch of the task's inputs")
        self.training_task = None  # its parameters stay trainable until the next begin_task (as LoRA learners)
        was_training = self.training
        self.eval()
        try:
            if self.config.head_type == "lda":
                if labels is None:
                    raise ValueError("head_type='lda' needs the task's labels in end_task")
                feats = torch.cat([self._task_features(x, t) for x in inputs])
                self._fit_lda(t, feats, torch.cat([y.to(feats.device) for y in labels]))
            self.signatures.add_task(torch.cat([self.embed(x) for x in inputs]))
        finally:
            self.train(was_training)

    # -- features and routing ------------------------------------------------------------------------------
    def _gate_hook(self, name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
            gate = self._gate_of.get(name)
            return None if gate is None else output * gate
        return hook

    def _set_active(self, active: list[str], gates: dict[str, torch.Tensor]) -> None:
        activate(self.backbone, active, self.adapters[-1:])  # only the newest adapter has requires_grad
        self._gate_of = gates

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pretrained embedding: ``backbone.features(x)`` with every adapter inactive, without gradients."""
        self._set_active([], {})
        with torch.no_grad():
            return self._features(x)

    def _task_features(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Features of ``x`` with task ``t``'s module: its adapter, plus gated earlier adapters if transfer."""
        gates = self.gates[t]
        earlier = self.adapters[:gates.numel()]
        self._set_active([*earlier, self.adapters[t]], {a: gates[i] for i, a in enumerate(earlier)})
        try:
            return self._features(x)
        finally:
            self._set_active([], {})

    def _batchable(self) -> bool:
        """The one-pass mixed term needs linear adapted layers whose inputs put the batch first: the package's ViTs
        (TinyViT, timm_vit). Other models (convolutions, open_clip's sequence-first attention) run one pass per
        task."""
        from ..models.vit import TinyViT

        return isinstance(self.backbone, TinyViT) and all(
            isinstance(layer.get_base_layer(), nn.Linear) for layer in lora_layers(self.backbone).values())

    def _routed_features(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Features of each input with its routed task's module, in one pass (eval: no dropout).

        peft runs no adapter; a hook on each LoRA layer adds ``B_cat (c * A_cat x)`` with every task's ``A`` and
        ``s B`` concatenated and ``c`` the input's coefficients over the adapters (1 for its task's own, its
        transfer gates for earlier ones, 0 otherwise), repeated over each adapter's rank.
        """
        dtype = next(self.backbone.parameters()).dtype
        coef = torch.zeros(x.shape[0], self.num_tasks, dtype=dtype, device=x.device)
        for t in routed.unique().tolist():
            rows = routed == t
            gates = self.gates[t]
            coef[rows, t] = 1.0
            if gates.numel():
                coef[rows, :gates.numel()] = gates.to(dtype)
        handles = []
        for layer in lora_layers(self.backbone).values():
            names = [a for a in self.adapters if a in layer.lora_A]
            a_cat = torch.cat([layer.lora_A[a].weight for a in names])
            b_cat = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in names], dim=1)
            ranks = torch.tensor([layer.lora_A[a].weight.shape[0] for a in names], device=x.device)
            columns = coef[:, [self.adapters.index(a) for a in names]].repeat_interleave(ranks, dim=1)
            handles.append(layer.register_forward_hook(_mixed_term(a_cat, b_cat, columns)))
        self._set_active([], {})
        try:
            return self._features(x)
        finally:
            for handle in handles:
                handle.remove()

    def task_logits(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """``[B, num_classes]`` output of task ``t`` (its classes' columns; ``FILL`` elsewhere)."""
        local = self.heads[t](self._task_features(x, t))
        out = local.new_full((x.shape[0], self.num_classes), FILL)
        out[:, self.task_classes[t]] = local
        return out

    def route(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Task index per input (``LongTensor[B]``); also stored in :attr:`last_routed`.

        Router ``"signatures"``: best signature of the pretrained embedding (among the tasks whose signature is
        fitted). ``"oracle"``: ``task_ids``, else :attr:`oracle_task` for every input (ids of tasks not trained
        yet are clamped to the last trained task). With nothing to route to (no task, or no signature yet) the
        result is an empty ``LongTensor`` (a retrieval metric then counts nothing).
        """
        if self.num_tasks == 0 or (self.config.router == "signatures" and self.signatures.num_tasks == 0):
            routed = torch.empty(0, dtype=torch.long, device=x.device)
        elif self.config.router == "oracle":
            if task_ids is None:
                if self.oracle_task is None:
                    raise ValueError("router 'oracle' needs task_ids (or oracle_task set)")
                task_ids = torch.full((x.shape[0],), int(self.oracle_task), dtype=torch.long)
            routed = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1).clamp(0, self.num_tasks - 1)
            if routed.numel() != x.shape[0]:
                raise ValueError(f"task_ids has {routed.numel()} entries for {x.shape[0]} inputs")
            routed = routed.to(x.device)
        else:
            routed = self.signatures.route(self.embed(x)).to(x.device)
        self.last_routed = routed
        return routed

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the task being trained. Otherwise: route, then each task's module and head on its inputs."""
        if self.num_tasks == 0:
            self.last_routed = None
            self._set_active([], {})
            return self.backbone(x)
        if self.training and self.training_task is not None:
            return self.task_logits(x, self.training_task)
        routed = self.route(x, task_ids)
        if routed.numel() != x.shape[0]:  # no signature fitted yet (evaluation inside the first task)
            routed = torch.full((x.shape[0],), self.num_tasks - 1, dtype=torch.long, device=x.device)
        tasks = routed.unique().tolist()
        if self.batch_tasks and len(tasks) > 1 and not self.training and self._batchable():
            feats = self._routed_features(x, routed)
            out = feats.new_full((x.shape[0], self.num_classes), FILL)
            for t in tasks:
                idx = (routed == t).nonzero().squeeze(1)
                out[idx[:, None], self.task_classes[t]] = self.heads[t](feats[idx])
            return out
        out = None
        for t in tasks:
            idx = (routed == t).nonzero().squeeze(1)
            logits = self.task_logits(x[idx], t)
            if out is None:
                out = logits.new_full((x.shape[0], self.num_classes), FILL)
            out[idx] = logits
        return out

    # -- LDA head ------------------------------------------------------------------------------------------
    def _fit_lda(self, t: int, feats: torch.Tensor, labels: torch.Tensor) -> None:
        classes = self.task_classes[t]
        feats = feats.double()
        d = feats.shape[1]
        means = torch.zeros(len(classes), d, dtype=feats.dtype, device=feats.device)
        centred = []
        for j, c in enumerate(classes.tolist()):
            mask = labels == c
            if mask.any():
                means[j] = feats[mask].mean(0)
                centred.append(feats[mask] - means[j])
        z = torch.cat(centred) if centred else feats - feats.mean(0)
        cov = z.T @ z / max(z.shape[0] - 1, 1)
        ridge = self.config.lda_shrinkage * max(float(cov.diagonal().mean()), 1e-8) + 1e-8
        precision_means = torch.linalg.solve(cov + ridge * torch.eye(d, dtype=cov.dtype, device=cov.device),
                                             means.T).T  # [C, d]: Sigma^-1 mu_c
        head = self.heads[t]
        head.weight.copy_(precision_means.to(head.weight.dtype))
        head.bias.copy_((-0.5 * (precision_means * means).sum(1)).to(head.bias.dtype))

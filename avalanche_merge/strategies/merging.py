"""``ContinualMerging``: a ready Avalanche strategy (fine-tune each experience, then merge), and the registered
merging methods that ``avalanche-merge bench`` compares with Avalanche's baselines.

Registered methods (defaults are the papers' values, not tuned on our benchmarks):

==================  ==========================  ============  ==========================================
method              merger                      start         reference
==================  ==========================  ============  ==========================================
``opcm``            OPCM, alpha 0.5             pretrained    Tang et al., arXiv 2501.09522 (2025)
``continual_ta``    running task arithmetic 0.3 pretrained    Ilharco et al., ICLR 2023; Tang et al.
``continual_ties``  continual TIES 20%, 0.5     pretrained    Yadav et al., NeurIPS 2023; Tang et al.
``continual_avg``   running weight average      pretrained    Wortsman et al., ICML 2022
``magmax``          running max magnitude 0.5   previous      Marczak et al., ECCV 2024
``continual_ema``   EMA of weights, w 0.5       merged        Roth et al. 2024 (FoMo-in-Flux)
``tsv_merge``       TSV-M over all so far       pretrained    Gargiulo et al., CVPR 2025
``iso_cts_merge``   Iso-CTS over all so far     pretrained    Marczak et al., ICML 2025
==================  ==========================  ============  ==========================================
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

from avalanche.training.templates import SupervisedTemplate

from ..merging import make_merger
from ..options_doc import docstring_items
from ..plugins.merge import HEAD_MODES, STARTS, MergePlugin
from .registry import BuildContext, register_method


class ContinualMerging(SupervisedTemplate):
    """Fine-tune on each experience, then merge its task vector into the running model (:class:`MergePlugin`).

    Args:
        model: the pretrained model.
        optimizer: its optimizer.
        merger: a ContinualMerger or a merger name (``avalanche_merge.merging.list_mergers()``).
        merger_options: options of a named merger.
        start: ``"pretrained"``, ``"merged"`` or ``"previous"``: where each experience's fine-tuning starts.
        head: module name of the classifier, or ``"auto"``.
        head_mode: ``"auto"``, ``"class_rows"``, ``"last"`` or ``"merge"``.
        plugins: other Avalanche plugins (the merge plugin is appended after them).
        **kwargs: the other ``SupervisedTemplate`` arguments (criterion, train_mb_size, evaluator, ...).
    """

    def __init__(self, *, model, optimizer, merger: Any = "opcm", merger_options: dict | None = None,
                 start: str = "pretrained", head: str = "auto", head_mode: str = "auto", plugins=None,
                 **kwargs) -> None:
        self.merge_plugin = MergePlugin(merger=merger, merger_options=merger_options, start=start, head=head,
                                        head_mode=head_mode)
        super().__init__(model=model, optimizer=optimizer, plugins=[*(plugins or []), self.merge_plugin], **kwargs)


def _config_cls(method: str, merger: str, start: str, options: dict[str, Any]) -> type:
    """A dataclass with ``start``, ``head_mode`` and the merger's options, validated by building the merger."""

    def post_init(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {list(STARTS)}, got {self.start!r}")
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {list(HEAD_MODES)}, got {self.head_mode!r}")
        make_merger(merger, **self.merger_options())

    def merger_options(self) -> dict:
        return {k: getattr(self, k) for k in options}

    fields = [("start", str, field(default=start)), ("head_mode", str, field(default="auto"))]
    fields += [(k, type(v), field(default=v)) for k, v in options.items()]
    cls = make_dataclass(f"{method.title().replace('_', '')}Config", fields,
                         namespace={"__post_init__": post_init, "merger_options": merger_options})
    merger_cls = type(make_merger(merger, **options))
    helps = {**docstring_items(merger_cls), **docstring_items(merger_cls.__init__)}
    lines = [f"Options of the {method!r} method: where fine-tuning starts, the head mode and the {merger!r} merger's "
             "options.", "", "Args:",
             f"    start: where each experience's fine-tuning starts: {', '.join(repr(s) for s in STARTS)}.",
             f"    head_mode: how the classifier is merged: {', '.join(repr(h) for h in HEAD_MODES)}."]
    lines += [f"    {k}: {helps.get(k) or f'option of the {merger!r} merger.'}" for k in options]
    cls.__doc__ = "\n".join(lines)
    return cls


def _register(method: str, merger: str, start: str, description: str, **options: Any) -> None:
    config_cls = _config_cls(method, merger, start, options)

    def build(ctx: BuildContext, cfg) -> ContinualMerging:
        return ContinualMerging(model=ctx.model, optimizer=ctx.optimizer(), merger=merger,
                                merger_options=cfg.merger_options(), start=cfg.start, head_mode=cfg.head_mode,
                                **ctx.strategy_kwargs())

    # OPCM (Tang et al. 2025) and MagMax (Marczak et al. 2024) merge CLIP image towers under frozen zero-shot heads
    # per_task is refused: MergePlugin's head modes need one nn.Linear head (class rows, merge or last)
    register_method(method, config_cls=config_cls, family="merging", description=description,
                    protocol="frozen", protocols=("frozen", "shared", "masked"))(build)


_register("opcm", "opcm", "pretrained", "OPCM: orthogonal-projection continual merging (Tang et al. 2025)",
          alpha=0.5)
_register("continual_ta", "continual_task_arithmetic", "pretrained",
          "running task arithmetic of independently fine-tuned task vectors", scaling=0.3)
_register("continual_ties", "continual_ties", "pretrained", "continual TIES merging (Tang et al.'s baseline)",
          density=0.2, scaling=0.5)
_register("continual_avg", "continual_average", "pretrained", "running weight average of fine-tuned models")
_register("magmax", "magmax_running", "previous",
          "MagMax: sequential fine-tuning + max-magnitude merge (Marczak et al. 2024)", scaling=0.5)
_register("continual_ema", "continual_ema", "merged",
          "EMA merge: fine-tune from the merged weights, then interpolate (FoMo-in-Flux, Roth et al. 2024)",
          weight=0.5)
_register("tsv_merge", "tsv", "pretrained", "TSV-M over all task vectors so far (Gargiulo et al. 2025)",
          scaling=1.0)
_register("iso_cts_merge", "iso_cts", "pretrained", "Iso-CTS over all task vectors so far (Marczak et al. 2025)",
          common_fraction=0.8, scaling=1.0)

"""Prototype baselines on frozen pretrained features: nearest class mean (NCM) and RanPAC.

Both follow Avalanche's :class:`~avalanche.training.StreamingLDA` pattern: the backbone is wrapped in
:class:`~avalanche_merge.models.vit.FeatureExtractor`, frozen and kept in eval mode; each training experience is one
pass of the extractor over the data (``train_epochs=1``), no optimizer and no backward; the classifier lives in
the pure-torch cores of :mod:`avalanche_merge.retrieval.prototypes`. They register with ``pretrained_eval=False``
(like ``slda``): before the first experience there is no classifier to evaluate.

Why not Avalanche's ``NCMClassifier`` (``avalanche.models``) with its ``CurrentDataNCMUpdate`` plugin
(``avalanche.training.plugins.update_ncm``): ``update_class_means_dict`` merges a class's new mean with the stored
one by a fixed momentum (default 0.5) instead of a count-weighted running mean, so a class met again in a later
experience (domain-incremental streams) is not the mean of all its samples; classes without a mean are zero
vectors that can win the nearest-mean vote; and the plugin requires a ``TrainEvalModel``-like model with
``feature_extractor`` and ``eval_classifier`` attributes and makes its own second pass over the experience after
training (iCaRL-style), while here the single training pass already yields the features.
:class:`~avalanche_merge.retrieval.prototypes.NearestClassMean` keeps exact per-class sums and counts instead; its
cosine variant matches ``NCMClassifier(normalize=True)`` means (normalised mean of normalised features) but scores
by cosine similarity.
"""

from __future__ import annotations

import torch
from avalanche.training.templates import SupervisedTemplate

from ..retrieval.prototypes import NCMConfig, NearestClassMean, RanPAC, RanPACConfig
from .registry import BuildContext, register_method


class FrozenFeatureClassifier(SupervisedTemplate):
    """A classifier core on a frozen feature extractor, trained by one forward pass per experience.

    ``forward`` returns ``core.logits(features)``. During training every mini-batch's features are either given to
    ``core.update`` at once (``streaming=True``: NCM, exact under any batching) or collected and given to
    ``core.update`` once at the end of the experience (``streaming=False``: RanPAC, whose ridge selection holds out
    part of the whole experience). The loss of each mini-batch is computed for the loss metrics only.

    Args:
        feature_model: module mapping inputs to features (frozen here; put in eval mode).
        core: object with ``update(features, labels)`` and ``logits(features)``.
        streaming: update per mini-batch (True) or once per experience (False).
        **kwargs: ``SupervisedTemplate`` arguments except ``model``, ``optimizer`` and ``train_epochs``.
    """

    def __init__(self, *, feature_model: torch.nn.Module, core, streaming: bool, **kwargs) -> None:
        kwargs.pop("train_epochs", None)
        for p in feature_model.parameters():
            p.requires_grad_(False)
        super().__init__(model=feature_model.eval(), optimizer=None, train_epochs=1, **kwargs)  # type: ignore[arg-type]
        self.core = core
        self.streaming = streaming
        self._feats: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def forward(self, return_features: bool = False):
        self.model.eval()
        with torch.no_grad():
            feats = self.model(self.mb_x)
        out = self.core.logits(feats)
        return (out, feats) if return_features else out

    def make_optimizer(self, **kwargs):
        """No optimizer: the backbone is frozen and the core is fitted in closed form."""

    def training_epoch(self, **kwargs):
        for mbatch in self.dataloader:
            self.mbatch = mbatch
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output, feats = self.forward(return_features=True)
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_update(**kwargs)
            if self.streaming:
                self.core.update(feats, self.mb_y)
            else:
                self._feats.append(feats.detach().cpu())
                self._labels.append(self.mb_y.detach().cpu())
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        self._feats, self._labels = [], []
        super()._train_exp(experience, eval_streams, **kwargs)
        if not self.streaming and self._feats:
            self.core.update(torch.cat(self._feats), torch.cat(self._labels))
        self._feats, self._labels = [], []


def _build(ctx: BuildContext, core, streaming: bool) -> FrozenFeatureClassifier:
    from ..models.vit import FeatureExtractor

    kwargs = ctx.strategy_kwargs()
    kwargs.pop("train_epochs")  # one pass by definition
    return FrozenFeatureClassifier(feature_model=FeatureExtractor(ctx.model), core=core, streaming=streaming,
                                   **kwargs)


@register_method("ncm", config_cls=NCMConfig, family="retrieval", pretrained_eval=False,
                 protocol="prototype",
                 description="nearest class mean on frozen pretrained features (prototype baseline)")
def build_ncm(ctx: BuildContext, cfg: NCMConfig):
    core = NearestClassMean(ctx.model.feature_dim, ctx.benchmark.num_classes, cfg)
    return _build(ctx, core, streaming=True)


@register_method("ranpac", config_cls=RanPACConfig, family="retrieval", pretrained_eval=False,
                 protocol="prototype",
                 description="RanPAC: random projection + ridge classifier on frozen features (McDonnell et al. "
                             "2023)")
def build_ranpac(ctx: BuildContext, cfg: RanPACConfig):
    core = RanPAC(ctx.model.feature_dim, ctx.benchmark.num_classes, cfg)
    return _build(ctx, core, streaming=False)

"""Sparse memory fine-tuning in and out of its regime (Lin et al., arXiv 2510.15103, 2025), on the bench TinyViT.

(a) Overlap: the fraction of the slots updated for experience 1 of ``domain_mnist`` (the union of the per-batch
    TF-IDF selections) that are read by at least half / by every background document. Background: the pretraining
    pool (``background="pretrain"``, Lin et al.) or experience 0's inputs (``"stream"``); a document is a batch.
    The memory's addressing (frozen queries and keys, inserted before the last block) does not depend on the values,
    so the selection is measured on the pretrained model without training.
(b) The paper's protocol: held-out retention (accuracy on the clean digits of the pretraining task and on a
    never-trained domain) against learning (mean accuracy on each new experience right after training it), for full
    fine-tuning (``naive``), ``lora`` and ``sparse_memory`` (default and paper-regime configs) over a few learning
    rates, through the project's runner (one seed, small subsets).

Run (from the repository root, ~15 min on one CPU core)::

    OMP_NUM_THREADS=1 python experiments/sparse_memory_regime.py [--skip-protocol]

Writes ``experiments/results/sparse_memory_regime/{overlap.json,protocol.json,summary.md,retention_vs_learning.png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models.backbones import TinyViTOptions, build_tiny_vit
from avalanche_merge.plugins.sparse_memory import PAPER_REGIME, SparseMemoryOptions, SparseMemoryPlugin
from avalanche_merge.sparse.tfidf import background_overlap
from avalanche_merge.strategies.sparse_memory import pretrain_background_inputs

OUT = Path(__file__).parent / "results" / "sparse_memory_regime"
DOMAINS = ["rotate_90", "flip_lr", "edges"]
BENCH = {"domains": DOMAINS, "train_per_domain": 300, "test_per_domain": 200}
HELD_OUT = ["identity", "low_contrast"]
BATCH = 32
CONFIGS = {
    "default": {},
    "paper_regime": dict(PAPER_REGIME),
}


def _inputs(experience) -> torch.Tensor:
    return torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])


def measure_overlap(name: str, options: dict, background: str, seed: int = 0) -> dict:
    """Overlap of the slots updated for experience 1 with the background documents (see module docstring)."""
    bench = build_benchmark("domain_mnist", seed=seed, **BENCH)
    model = build_tiny_vit(TinyViTOptions(), bench, seed)
    opts = SparseMemoryOptions(**{**options, "background": background})
    pretrain = pretrain_background_inputs(bench.input_shape) if opts.uses_pretrain else None
    plugin = SparseMemoryPlugin(opts, pretrain_inputs=pretrain, document_size=BATCH)
    ft = plugin.setup(model)
    train = list(bench.scenario.train_stream)
    if opts.uses_stream:
        ft.observe_documents(_inputs(train[0])[: opts.background_samples], BATCH)
    x1 = _inputs(train[1])
    y1 = torch.tensor([train[1].dataset[i][1] for i in range(len(train[1].dataset))])
    updated = torch.zeros(ft.memory.n_slots, dtype=torch.bool)
    model.train()
    reads = []
    for xb, yb in zip(x1.split(BATCH), y1.split(BATCH), strict=True):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        reads.append(int(torch.unique(ft.memory.last_indices).numel()))
        updated |= ft.after_backward().cpu()
    out = background_overlap(updated, ft.background.df, ft.background.n_docs)
    return {"config": name, "background": background, "n_slots": ft.memory.n_slots, "top_t": opts.top_t,
            "heads": opts.heads, "top_k": opts.top_k, "background_docs": ft.background.n_docs,
            "distinct_slots_per_batch": sum(reads) / len(reads),
            "background_distinct_slots_per_doc": float(ft.background.df.sum()) / ft.background.n_docs, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-protocol", action="store_true", help="only measure the overlap")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [measure_overlap(name, opts, bg) for name, opts in CONFIGS.items() for bg in ("stream", "pretrain")]
    for r in rows:
        print(json.dumps(r))
    (OUT / "overlap.json").write_text(json.dumps(rows, indent=1))
    if not args.skip_protocol:
        from sparse_memory_protocol import run_protocol  # noqa: PLC0415 - the slow half, optional

        run_protocol(OUT, rows)


if __name__ == "__main__":
    main()

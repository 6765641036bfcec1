"""Generated pages of the documentation site (run by mkdocs-gen-files at build time; nothing is written to disk).

- ``reference/configs.md``: every registered method's options (type, default, help with the valid range), read
  from its config dataclass by :mod:`avalanche_merge.options_doc`, grouped by family; the shared train settings,
  benchmarks and backbones likewise. The reference therefore cannot disagree with the code.
- ``reference/api/*.md``: API pages rendered by mkdocstrings from the docstrings.
- ``results_table.md``: the stored bench summary (``experiments/results/bench/summary.md``, written by
  ``avalanche-merge bench`` / ``summarize``), so the site's full table is the stored runs' table.
- ``assets/results/...``: the stored figures that pages link to, copied from ``experiments/results/``.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path

import mkdocs_gen_files

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
API_MODULES = {
    "plugins": "Avalanche plugins (one namespace for every family)",
    "merging": "task-vector merging cores",
    "lora": "continual LoRA cores (peft)",
    "sparse": "sparse fine-tuning cores",
    "retrieval": "task retrieval and prototypes",
    "protocol": "head protocols",
    "strategies": "registered strategies and the method registry",
    "runner": "experiment runner",
    "evaluation": "metrics",
    "analysis": "analysis and figures",
    "benchmarks": "benchmarks",
    "models": "backbones",
    "options_doc": "option reference",
}


def _config_reference() -> str:
    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.options_doc import markdown_options
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import TrainConfig

    lines = ["# Config reference", "",
             "Generated from the config dataclasses at build time (`avalanche-merge describe METHOD` prints the same). "
             "In an experiment config, a method's options go in `\"methods\": [{\"name\": ..., \"options\": {...}}]`, "
             "the shared settings in `\"train\"`, a benchmark's in `\"benchmarks\": [{\"name\": ..., \"options\": "
             "{...}}]` and the backbone's in `\"model\": {\"name\": ..., \"options\": {...}}`. Every value is checked "
             "before any training starts.", "", "## Shared train settings", "", markdown_options(TrainConfig), ""]
    families = defaultdict(list)
    for name in METHODS.names():
        families[METHODS.get(name).family].append(name)
    order = sorted(families, key=lambda f: (f == "baseline", f))
    lines += ["## Methods", ""]
    for family in order:
        lines += [f"### Family: {family}", ""]
        for name in families[family]:
            spec = METHODS.get(name)
            protocol = spec.protocol + ("+prototypes" if spec.prototypes else "")
            extra = ("" if spec.in_bench else "; not in `bench`") + (f"; runs inside `{spec.base}`" if spec.base else "")
            lines += [f"#### `{name}`", "", f"{spec.description}", "",
                      f"Head protocol: `{protocol}`; scenarios: {', '.join(spec.scenarios)}{extra}. "
                      f"Config class: `{spec.config_cls.__name__}`.", "", markdown_options(spec.config_cls), ""]
    lines += ["## Benchmarks", ""]
    for name in BENCHMARKS.names():
        spec = BENCHMARKS.get(name)
        where = "offline" if spec.offline else "needs a local `dataset_root`"
        lines += [f"### `{name}`", "", f"{spec.description} ({spec.scenario}, {where}).", "",
                  markdown_options(spec.config_cls), ""]
    lines += ["## Backbones", ""]
    for name in BACKBONES.names():
        spec = BACKBONES.get(name)
        lines += [f"### `{name}`", "", f"{spec.description}", "", markdown_options(spec.config_cls), ""]
    return "\n".join(lines)


def _api_pages() -> None:
    index = ["# API reference", "", "Rendered from the docstrings (each with its paper reference).", ""]
    for module, what in API_MODULES.items():
        index.append(f"- [`avalanche_merge.{module}`]({module}.md): {what}")
        with mkdocs_gen_files.open(f"reference/api/{module}.md", "w") as f:
            f.write(f"# `avalanche_merge.{module}`\n\n::: avalanche_merge.{module}\n")
    with mkdocs_gen_files.open("reference/api/index.md", "w") as f:
        f.write("\n".join(index) + "\n")


_ASSET = re.compile(r"\]\((?:\.\./)*assets/(results/[^)\s]+)\)")


def _copy_figures() -> None:
    """Copy every ``experiments/results/...`` figure that a page links to as ``assets/results/...``."""
    wanted = set()
    for page in (ROOT / "docs").rglob("*.md"):
        wanted.update(_ASSET.findall(page.read_text()))
    for rel in sorted(wanted):
        source = ROOT / "experiments" / rel
        if not source.is_file():
            raise FileNotFoundError(f"a docs page links to {source}, which does not exist")
        with mkdocs_gen_files.open(f"assets/{rel}", "wb") as f:
            f.write(source.read_bytes())


def _results_table() -> str:
    summary = ROOT / "experiments" / "results" / "bench" / "summary.md"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} is missing: run `avalanche-merge summarize experiments/results/bench`")
    return ("# Full bench table\n\nEvery stored run of `avalanche-merge bench --full` "
            "(`experiments/results/bench/`; mean ± sample std over seeds 0-2; accuracies in %; times in seconds on "
            "a shared 2-core machine, so compare them within a row, not across rows). Generated from "
            "`experiments/results/bench/summary.md` at build time; see [Results](results.md) for the discussion.\n\n"
            + summary.read_text())


with mkdocs_gen_files.open("results_table.md", "w") as f:
    f.write(_results_table())
with mkdocs_gen_files.open("reference/configs.md", "w") as f:
    f.write(_config_reference())
_api_pages()
_copy_figures()

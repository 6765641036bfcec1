"""Table and KA-vs-ZS plot of a results folder made under the ``fomo`` protocol.

Usage: ``python experiments/fomo_report.py experiments/results/fomo_budget [REFERENCE]`` writes ``table.md``,
``table.json`` and ``ka_zs.png`` next to the folder's ``runs/``; methods keep the colours they have in the
REFERENCE folder's plot (default: the folder itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from avalanche_merge.analysis.fomo import fomo_markdown, fomo_table, load_fomo_results, plot_ka_zs


def main(folder: str, reference: str | None = None) -> None:
    out = Path(folder)
    labels = [r["method"] for r in fomo_table(load_fomo_results(Path(reference or folder) / "runs"))]
    results = load_fomo_results(out / "runs")
    if not results:
        raise SystemExit(f"no completed fomo runs under {out / 'runs'}")
    rows = fomo_table(results)
    (out / "table.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (out / "table.md").write_text(fomo_markdown(rows), encoding="utf-8")
    orderings = sorted({str(r["fomo"].get("ordering")) for r in results})
    title = f"A_KA vs A_ZS after every step, {'/'.join(orderings)} order\n(circle: after the last task)"
    plot_ka_zs(results, out / "ka_zs.png", labels=labels, title=title)
    print(fomo_markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/fomo_budget",
         sys.argv[2] if len(sys.argv) > 2 else None)

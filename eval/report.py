"""report.md, report.json, report.png (and TensorBoard scalars) from the evaluation rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def markdown_table(rows: list[dict[str, Any]], knn_k: list[int]) -> str:
    head = "| encoder | kind | protocol | top-1 | top-5 | " + " | ".join(f"kNN k={k}" for k in knn_k) + " |"
    lines = [head, "|" + "---|" * (5 + len(knn_k))]
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in rows:
        knn = " | ".join(pct((r.get("knn") or {}).get(str(k))) for k in knn_k)
        lines.append(f"| {r['name']} | {r['kind']} | {r['protocol']} | {pct(r['top1'])} | {pct(r['top5'])} | {knn} |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], knn_k: list[int]) -> str:
    """Write the three report files and TensorBoard scalars; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, knn_k)
    (out / "report.json").write_text(json.dumps({"rows": rows, **meta}, indent=2) + "\n")
    sources = "\n".join(f"- `{r['name']}`: sha256 `{r['weights_sha256']}`" for r in rows if r.get("weights_sha256"))
    (out / "report.md").write_text(
        f"# Linear evaluation on {meta['dataset']}\n\n{table}\n\nProtocol: {meta['protocol_description']}\n\n"
        f"Weights:\n{sources or '- none'}\n\nConfig:\n\n```yaml\n{meta['config']}```\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(rows), 3.6))
    ax.bar(range(len(rows)), [100 * (r["top1"] or 0) for r in rows], color="C0")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title(f"{meta['dataset']}: linear probe on frozen features")
    for r in rows:
        if r["kind"] == "alexnet_supervised" and r["top1"] is not None:
            ax.axhline(100 * r["top1"], color="C3", ls="--", label="supervised AlexNet")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    writer = SummaryWriter(str(out / "tb"))
    for r in rows:
        if r["top1"] is not None:
            writer.add_scalar(f"eval/{r['name']}/top1", r["top1"], 0)
            writer.add_scalar(f"eval/{r['name']}/top5", r["top5"], 0)
    writer.close()
    return table

"""report.md, report.json, report.png (and TensorBoard scalars) from the evaluation rows."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from infomax.runtime.files import write_atomically
from infomax.runtime.tracking import TensorBoard

KIND_COLOURS = {"ours": "C0", "random_init": "C7", "raw_pixels": "C8", "alexnet_supervised": "C3",
                "alexnet_conv": "C1", "published": "C2"}


def report_dir(out: str, weights: list[str]) -> Path:
    """Where an eval writes its report, kept rows and fits' checkpoints: ``out``, else the first export's run dir
    (``<run>/export``, also when named by its encoder.safetensors), else the first export's own folder (exports
    side by side in one folder would share a report beside them), else (no export: stored baselines only)
    runs/baselines."""
    if out or not weights:
        return Path(out or "runs/baselines")
    export = Path(weights[0]).resolve()
    export = export.parent if export.suffix == ".safetensors" else export
    return export.parent if export.name == "export" else export


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown_table(rows: list[dict[str, Any]], knn_k: list[int]) -> str:
    """encoder / kind / protocol / input side / feature dim / top-1 / top-5 / kNN per k / delta vs the same
    architecture trained with labels and vs the supervised AlexNet (points) / per label fraction, top-1 and kNN at
    the first k fitted on that fraction."""
    fractions = list(dict.fromkeys(f for r in rows for f in r.get("label_fractions") or {}))
    first_k = f" / kNN k={knn_k[0]}" if knn_k else ""
    head = ("| encoder | kind | protocol | input px | features | top-1 | top-5 | "
            + "".join(f"kNN k={k} | " for k in knn_k) + "Δ vs supervised, same arch | Δ vs AlexNet |"
            + "".join(f" {f} labels: top-1{first_k} |" for f in fractions))
    lines = [head, "|" + "---|" * (9 + len(knn_k) + len(fractions))]
    for r in rows:
        knn = "".join(f"{_pct((r.get('knn') or {}).get(str(k)))} | " for k in knn_k)
        delta = " | ".join("–" if r.get(k) is None else f"{100 * r[k]:+.2f}"
                           for k in ("delta_vs_supervised", "delta_vs_alexnet"))
        size, dim = (r.get(k) or "–" for k in ("input_size", "feature_dim"))
        lines.append(f"| {r['name']} | {r['kind']} | {r['protocol']} | {size} | {dim} | {_pct(r['top1'])} | "
                     f"{_pct(r['top5'])} | {knn}{delta} |" + "".join(
                         f" {fraction_cell((r.get('label_fractions') or {}).get(f), knn_k)} |" for f in fractions))
    return "\n".join(lines)


def fraction_cell(scores: dict[str, Any] | None, knn_k: list[int]) -> str:
    """"71.20 / 68.45": a label fraction's probe top-1 and kNN top-1 at the first k; "–" for a row without it."""
    if scores is None:
        return "–"
    knn = scores["knn"].get(str(min(knn_k[0], scores["images"]))) if knn_k else None
    return _pct(scores["top1"]) + ("" if knn is None else f" / {_pct(knn)}")


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], knn_k: list[int]) -> str:
    """Write the three report files and TensorBoard scalars; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, knn_k)
    write_atomically(out / "report.json", json.dumps({"rows": rows, **meta}, indent=2) + "\n")
    sources = "\n".join(f"- `{r['name']}`: sha256 `{r['weights_sha256']}`" for r in rows if r.get("weights_sha256"))
    quoted = "\n".join(f"- {r['name']}: {r['source']}" for r in rows if r["kind"] == "published")
    reference = meta.get("alexnet_reference_top1")
    alexnet = ("no AlexNet row" if reference is None else f"supervised AlexNet at {_pct(reference)}%"
               + (" (the quoted ImageNet figure)" if meta.get("alexnet_reference") == "quoted" else ""))
    imagenet_only = "" if meta["dataset"] == "imagefolder" else f" (ImageNet's: no reference on {meta['dataset']})"
    edge = [f"- `{r['name']}`: weight decay {r['weight_decay']:g} is at the edge of the grid tried "
            f"({', '.join(f'{w:g}' for w in sorted(r['weight_decays_tried']))}); its top-1 may be an underestimate"
            for r in rows if r.get("weight_decay_at_edge")]
    write_atomically(
        out / "report.md",
        f"# Linear evaluation on {meta['dataset']}\n\nScored on the {meta.get('scored_on', 'test split')}"
        + (f": {meta['test_images']} images, the fits on {meta['train_images']} train images"
           if "test_images" in meta else "")
        + f".\n\n{table}\n\n"
        f"Δ vs supervised, same arch: top-1 points against the export's architecture trained with labels (the fair "
        f"reference: same encoder, data and probe; – without that row). Δ vs AlexNet: top-1 points against "
        f"{alexnet} (another architecture, trained end to end).\n\n"
        f"Protocol: {meta['protocol_description']}\n\n"
        f"Precision: {meta['precision']} ({meta['precision_reason']}); measured on {meta['machine']}.\n\n"
        + (f"Quoted, not measured here{imagenet_only}:\n{quoted}\n\n" if quoted else "")
        + ("Warnings:\n" + "\n".join(edge) + "\n\n" if edge else "")
        + f"Weights:\n{sources or '- none'}\n\nConfig:\n\n```yaml\n{meta['config']}```\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(rows), 3.8))
    ax.bar(range(len(rows)), [100 * (r["top1"] or 0) for r in rows],
           color=[KIND_COLOURS.get(r["kind"], "C9") for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{meta['dataset']}: linear probe on frozen features ({meta['protocol']})", fontsize=9)
    if reference is not None:
        ax.axhline(100 * reference, color="C3", ls="--", label=f"supervised AlexNet {_pct(reference)}%")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomically(out / "report.png", png.getvalue())
    # A run of its own (tb/eval/) at the export's training step: evaluations of one run over time line
    # up, and they do not sit as single points among the training curves.
    tb = TensorBoard(out / "tb" / "eval", enabled=True)  # a failed TensorBoard write warns, never loses the report
    tb.scalars({f"eval/{r['name']}/{k}": r[k] for r in rows if r["kind"] != "published" and r["top1"] is not None
                for k in ("top1", "top5")}, meta.get("train_step", 0))
    tb.close()
    return table

"""ROC and reliability (calibration) PNGs; matplotlib (the ``bench`` extra) is imported only here."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def have_matplotlib() -> bool:
    """True when matplotlib can be imported (the ``bench`` extra is installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def roc_png(curves: Sequence[Dict], path: str | Path, title: str = "ROC curves") -> Path:
    """One ROC figure for several models: ``curves`` items hold name, fpr, tpr, auc and
    optionally ``point`` = (fpr, tpr) at the model's threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="chance")
    for c in curves:
        line, = ax.plot(c["fpr"], c["tpr"], lw=1.6, label=f"{c['name']} (AUC {c['auc']:.4f})")
        pt: Optional[List[float]] = c.get("point")
        if pt is not None:
            ax.plot([pt[0]], [pt[1]], "o", ms=5, color=line.get_color())
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"{title}\n(dots: each model's decision threshold)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def calibration_png(tables: Sequence[Dict], path: str | Path, title: str = "Reliability (calibration)") -> Path:
    """Reliability diagram: mean predicted vs observed positive fraction per bin, with a
    histogram of predicted probabilities underneath. ``tables`` items: name, bins, ece."""
    plt = _pyplot()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=120, gridspec_kw={"height_ratios": [3, 1]},
                                  sharex=True)
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfectly calibrated")
    for t in tables:
        pts = [(b["mean_predicted"], b["fraction_positive"]) for b in t["bins"] if b["count"]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line, = ax.plot(xs, ys, "o-", ms=4, lw=1.4, label=f"{t['name']} (ECE {t['ece']:.3f})")
        centers = [(b["lo"] + b["hi"]) / 2 for b in t["bins"]]
        width = (t["bins"][0]["hi"] - t["bins"][0]["lo"]) if t["bins"] else 0.1
        axh.bar(centers, [b["count"] for b in t["bins"]], width=width * 0.9, alpha=0.35, color=line.get_color())
    ax.set_ylabel("Observed fraction positive")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    axh.set_xlabel("Predicted probability of the positive class")
    axh.set_ylabel("Images")
    axh.set_yscale("log", nonpositive="clip")
    axh.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

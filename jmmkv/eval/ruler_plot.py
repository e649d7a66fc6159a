"""The accuracy-vs-budget plot of ``jmmkv eval ruler``: one panel per prompt length, one line per
policy (the average score over tasks), the full cache as a dashed horizontal line."""

from __future__ import annotations

from pathlib import Path

from jmmkv.eval import plotting


def plot(rows: list[dict], path: Path) -> None:
  """Writes the PNG of `jmmkv.eval.ruler` result rows to ``path``."""
  plt = plotting.pyplot()
  lengths = sorted({r["length"] for r in rows})
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
  for ax, length in zip(axes[0], lengths):
    here = [r for r in rows if r["length"] == length]
    for name in dict.fromkeys(r["policy"] for r in here if r["budget"] is not None):
      pts = sorted((r["budget"], r["average"]) for r in here if r["policy"] == name)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    for r in here:
      if r["budget"] is None:
        ax.axhline(r["average"], color="k", ls="--", lw=1, label=r["policy"])
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in here if r["budget"] is not None})
    if budgets:
      ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
      ax.minorticks_off()
    ax.set_xlim(min(budgets or [0.05]) / 1.3, max(budgets or [1.0]) * 1.3)
    ax.set_title(f"{length} tokens")
    ax.set_xlabel("budget (kept fraction)")
    ax.set_ylim(-0.02, 1.02)
  axes[0][0].set_ylabel("average score over tasks")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)

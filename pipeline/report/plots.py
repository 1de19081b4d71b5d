"""PNG plots of a run, rewritten after each iteration from the manifest."""

from __future__ import annotations

from pipeline.report.summary import policy_rows
from pipeline.run.atomic import atomic_path
from pipeline.run.store import RunStore


def write_plots(store: RunStore) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = policy_rows(store)
    if not rows:
        return []
    out = store.root / "plots"
    out.mkdir(exist_ok=True)
    written = []
    decodes = sorted({d for r in rows for d in r["accuracy"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in decodes:
        points = [(r["policy"], r["accuracy"][d]) for r in rows if d in r["accuracy"]]
        ax.plot(*zip(*points), marker="o", label=d)
    ax.set(xlabel="policy (0 = base)", ylabel="eval.split accuracy (dev)", title="Accuracy by decoding")
    ax.legend()
    written.append(_save(fig, out / "accuracy.png"))
    trained = [r for r in rows if r["policy"] > 0]
    for key, title, name in (("dpo_margin", "DPO reward margin", "dpo_margins.png"),
                             ("orm_auc", "ORM AUC (held-out nodes)", "critic_auc.png")):
        points = [(r["policy"], r[key]) for r in trained if r.get(key) is not None]
        if points:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(*zip(*points), marker="o", label=key)
            if key == "orm_auc":
                prm = [(r["policy"], r["prm_auc"]) for r in trained if r.get("prm_auc") is not None]
                if prm:
                    ax.plot(*zip(*prm), marker="s", label="prm_auc")
            ax.set(xlabel="iteration + 1", title=title)
            ax.legend()
            written.append(_save(fig, out / name))
    plt.close("all")
    return written


def _save(fig, path) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # policies and iterations
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return str(path)

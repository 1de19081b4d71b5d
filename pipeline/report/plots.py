"""PNG plots of a run, rewritten after each iteration from the manifest."""

from __future__ import annotations

from pipeline.report.summary import CRITICS, policy_rows
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
    for draw in (_dpo_rewards, _within_problem_auc, _search_data):
        path = draw(plt, trained, out)
        if path:
            written.append(path)
    plt.close("all")
    return written


def _lines(plt, series: dict[str, list[tuple]], title: str, ylabel: str, path):
    """One line per non-empty series of (policy, value) points, saved; None when all are empty."""
    fig = _figure(plt, series, title, ylabel)
    return None if fig is None else _save(fig, path)


def _figure(plt, series: dict[str, list[tuple]], title: str, ylabel: str):
    """The figure _lines saves (None when every series is empty)."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="iteration + 1", ylabel=ylabel, title=title)
    ax.legend()
    return fig


def _points(rows: list[dict], get) -> list[tuple]:
    return [(r["policy"], get(r)) for r in rows if get(r) is not None]


def _dpo_rewards(plt, rows: list[dict], out):
    """DPO's implicit rewards of chosen and rejected (means over all pairs after DPO) and the
    chosen log-prob change against the reference: "From r to Q*" predicts the chosen likelihood falls."""
    references = sorted({r["reference"] for r in rows if r.get("reference")})
    return _lines(plt, {"chosen reward": _points(rows, lambda r: r.get("chosen_reward")),
                        "rejected reward": _points(rows, lambda r: r.get("rejected_reward")),
                        "chosen log-prob change": _points(rows, lambda r: r.get("chosen_dlogp"))},
                  f"DPO implicit rewards (reference: {', '.join(references) or '?'})",
                  "beta * log(pi / pi_ref); log-prob change", out / "dpo_rewards.png")


def _within_problem_auc(plt, rows: list[dict], out):
    series = {kind: _points(rows, lambda r, k=kind: (r.get("within_auc") or {}).get(k))
              for kind in CRITICS}
    title = "Within-problem AUC (completions held out from the heads, not from DPO)"
    return _lines(plt, series, title, "AUC", out / "within_problem_auc.png")


def _search_data(plt, rows: list[dict], out):
    """What each iteration's search gave the train stage (pairs, SFT rows, trees with both a
    correct and a wrong terminal) beside how sharp its options were: a sharper policy's
    resampled options merge, and its trees have less to pair."""
    counts = {"DPO pairs": _points(rows, lambda r: r.get("pairs")),
              "SFT rows": _points(rows, lambda r: r.get("sft_rows")),
              "trees with a right and a wrong answer": _points(rows, lambda r: r.get("contrast_problems"))}
    fig = _figure(plt, counts, "What each search gave training", "rows / trees")
    if fig is None:
        return None
    sharpness = _points(rows, lambda r: r.get("option_logp_per_token"))
    if sharpness:  # on a second axis, its legend apart from the counts'
        fig.axes[0].legend(loc="upper left", fontsize="small")
        twin = fig.axes[0].twinx()
        twin.plot(*zip(*sharpness), marker="x", linestyle="--", color="gray",
                  label="options' log-prob per token (right)")
        twin.set(ylabel="log-prob per token")
        twin.legend(loc="lower right", fontsize="small")
    return _save(fig, out / "search_data.png")


def _save(fig, path) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # policies and iterations
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return str(path)

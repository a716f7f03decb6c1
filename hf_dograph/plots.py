"""Plots of a DoGraph run: domain weights over steps, the domain graph, model × human domains.

All three are drawn from a DoGraph state (`checkpointing.dograph_state`, the content of
`dograph_state.json`), so they can be redrawn from any checkpoint or pushed repo, without the trainer.

What is drawn, and why:

1. **Domain weights over steps** (`domain_weights.png`). With persistent domains (the default) a domain
   keeps its identity across refits, so the figure draws (top) each model domain's smoothed weight w_j
   per optimizer step, (middle, when the data carries human labels) the weight each *human* domain
   received relative to its share of the samples (1 = what uniform mixing gives it; a 10-step moving
   average, since a batch holds few samples of a rare domain), and (bottom) the effective sample size
   of the step's weights and the effective number of domains. With per-batch domains (`domain_mode=
   "per_batch"`) the model domains are re-clustered every micro-batch, so "domain 3" at one step and
   at the next are unrelated clusters: a line per model domain id would mean nothing. Two things are
   meaningful over time and are drawn instead:
   - top panel: when the data carries human labels, the share of the gradient weight α each *human*
     domain received (`human_mass`, one line per human domain), averaged over the micro-batches of
     each optimizer step; without labels, the domain weights sorted in decreasing order (one line per
     rank: the largest weight, the second largest, ...);
   - bottom panel: the effective number of domains exp(H(w)) next to the number of domains m found.
2. **The domain graph** of the last micro-batch (`domain_graph.png`): nodes are the model domains
   (area ∝ weight w_j, label = size n_j), edges the affinity A_jk = max(0, cos(z̄_j, z̄_k)) between
   their mean gradient sketches (width ∝ A_jk; zero-affinity pairs have no edge).
3. **Model domain × human domain** (`domain_heatmap.png`): the sample counts of the last micro-batch
   (its own clustering; counts of different steps are not added up, their model domains being
   different clusters). Each row is also annotated with the domain's weight.

PNG files, matplotlib's Agg backend (no display needed). `log_to_tensorboard` adds the same figures
to a TensorBoard run.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

PLOTS_DIR = "dograph_plots"
PLOT_FILES = {
    "domain_weights": "domain_weights.png",
    "domain_graph": "domain_graph.png",
    "domain_heatmap": "domain_heatmap.png",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # never needs a display; keeps an already chosen non-GUI backend
    import matplotlib.pyplot as plt

    return plt


def domain_names_from(output_dir: str | os.PathLike | None) -> list[str] | None:
    """Human domain names from `domain_names.json` in a run folder (written by the CLI), if any."""
    if output_dir is None:
        return None
    from .errors import InputFileError
    from .jsonfiles import read_json

    path = Path(output_dir) / "domain_names.json"
    if not path.is_file():
        return None
    try:
        names = read_json(path, what="list of domain names",
                          fix="rewrite it as a JSON list of names in domain-id order, or delete it (domains are then "
                          "called 'domain 0', 'domain 1'...)")
    except InputFileError as err:  # names are a courtesy of plots and cards: never lose a finished run over them
        logging.getLogger(__name__).warning("%s (the plots and the card say 'domain 0', 'domain 1'... instead)", err)
        return None
    if not isinstance(names, list):
        logging.getLogger(__name__).warning("%s: not a JSON list of names, ignored", path)
        return None
    return [str(n) for n in names]


def _human_name(names: list[str] | None, d: int) -> str:
    return names[d] if names is not None and 0 <= d < len(names) else f"domain {d}"


def _entropy(weights: list[float]) -> float:
    return -sum(w * math.log(w) for w in weights if w > 0)


# ----------------------------------------------------------------------------- series from the history
def steps_series(history: list[dict]) -> OrderedDict:
    """History entries grouped by optimizer step (micro-batches of one step together), in order."""
    by_step: OrderedDict = OrderedDict()
    for entry in history:
        by_step.setdefault(int(entry["step"]), []).append(entry)
    return by_step


def human_mass_series(history: list[dict]) -> dict[int, list[float]]:
    """{human domain: [α mass per optimizer step]} (0 where a step's batches held none of it)."""
    by_step = steps_series(history)
    domains = sorted({int(d) for e in history for d in e.get("human_mass", {})})
    series = {d: [] for d in domains}
    for entries in by_step.values():
        for d in domains:
            vals = [_per_human_domain(e, "human_mass", d) for e in entries]
            series[d].append(sum(vals) / len(vals))
    return series


def _per_human_domain(entry: dict, key: str, d: int) -> float:
    """entry[key][d] (0 if absent): JSON turned the int keys into strings; accept both."""
    values = entry.get(key, {})
    return float(values.get(str(d), values.get(d, 0.0)))


def sorted_weight_series(history: list[dict]) -> list[list[float]]:
    """[rank][step]: the r-th largest domain weight at each step (mean over its micro-batches; NaN where
    fewer than r+1 domains were found)."""
    by_step = steps_series(history)
    ranks = max((len(e["domain_weights"]) for e in history), default=0)
    out = [[] for _ in range(ranks)]
    for entries in by_step.values():
        sorted_ws = [sorted(e["domain_weights"], reverse=True) for e in entries]
        for r in range(ranks):
            vals = [ws[r] for ws in sorted_ws if r < len(ws)]
            out[r].append(sum(vals) / len(vals) if vals else float("nan"))
    return out


# ----------------------------------------------------------------------------- the figures
def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        finite = [x for x in acc if math.isfinite(x)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def persistent_weights_figure(history: list[dict], domain_names: list[str] | None = None, window: int = 10):
    """Figure 1 for persistent domains (see the module docstring): one entry per optimizer step."""
    plt = _pyplot()
    entries = [e for e in history if e.get("persistent") and not e.get("warmup") and "domain_weights" in e]
    human = any("human_mass" in e for e in history)
    rows = 3 if human else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.6 * rows + 0.6), sharex=True)
    top, bottom = axes[0], axes[-1]
    steps = [int(e["step"]) for e in entries]
    m = max((len(e["domain_weights"]) for e in entries), default=0)
    cmap = plt.get_cmap("tab20")
    for j in range(m):
        top.plot(steps, [e["domain_weights"][j] if j < len(e["domain_weights"]) else float("nan") for e in entries],
                 color=cmap(j % 20), label=f"domain {j}", linewidth=1.2)
    top.set_ylabel("domain weight w_j")
    warm = [int(e["step"]) for e in history if e.get("warmup")]
    title = "DoGraph: persistent domains' weights (smoothed)"
    if warm:
        title += f"; weights uniform during the warm-up (steps ≤ {max(warm)})"
    top.set_title(title, fontsize=10)
    if m <= 12:
        top.legend(fontsize="x-small", ncol=4)
    top.grid(alpha=0.3)
    all_steps = [int(e["step"]) for e in history]
    if human:
        mid = axes[1]
        labels = sorted({int(d) for e in history for d in e.get("human_share", {})})
        for d in labels:
            ratio = []
            for e in history:
                share = _per_human_domain(e, "human_share", d)
                mass = _per_human_domain(e, "human_mass", d)
                ratio.append(mass / share if share > 0 else float("nan"))
            mid.plot(all_steps, _moving_average(ratio, window), label=_human_name(domain_names, d))
        mid.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        mid.set_ylabel(f"weight / sample share\n({window}-step average)")
        mid.set_title("Weight each human domain received, relative to uniform mixing", fontsize=10)
        mid.legend(fontsize="x-small", ncol=3)
        mid.grid(alpha=0.3)
    bottom.plot(all_steps, [float(e.get("ess", float("nan"))) for e in history], color="black",
                label="effective sample size / samples (1 = equal weights)")
    eff = [math.exp(_entropy(e["domain_weights"])) / max(1, len(e["domain_weights"])) for e in history]
    bottom.plot(all_steps, eff, color="gray", linestyle="--", label="effective domains exp(H(w)) / m")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("optimizer step")
    bottom.set_ylim(0, 1.05)
    bottom.legend(fontsize="x-small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def domain_weights_figure(history: list[dict], domain_names: list[str] | None = None):
    """Figure 1 (see the module docstring). Persistent domains: `persistent_weights_figure`. Per-batch: top axes
    one line per human domain (or per weight rank)."""
    if any(e.get("persistent") for e in history):
        return persistent_weights_figure(history, domain_names)
    plt = _pyplot()
    by_step = steps_series(history)
    steps = list(by_step)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    human = human_mass_series(history)
    if human:
        for d, values in human.items():
            top.plot(steps, values, marker=".", label=_human_name(domain_names, d))
        top.set_ylabel("share of gradient weight α")
        top.set_title("DoGraph: weight given to each human domain")
    else:
        for r, values in enumerate(sorted_weight_series(history)):
            top.plot(steps, values, marker=".", label=f"rank {r + 1}")
        top.set_ylabel("domain weight w (sorted)")
        top.set_title("DoGraph: domain weights, largest first (model domains are re-found every step)")
    top.legend(fontsize="small", ncol=2)
    top.grid(alpha=0.3)
    eff = [sum(math.exp(_entropy(e["domain_weights"])) for e in es) / len(es) for es in by_step.values()]
    num = [sum(len(e["domain_weights"]) for e in es) / len(es) for es in by_step.values()]
    bottom.plot(steps, eff, color="black", label="effective domains exp(H(w))")
    bottom.plot(steps, num, color="gray", linestyle="--", label="domains found m")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("domains")
    bottom.legend(fontsize="small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def graph_layout(m: int) -> list[tuple[float, float]]:
    """Nodes on a circle, domain 0 at the top, clockwise."""
    if m == 1:
        return [(0.0, 0.0)]
    return [(math.sin(2 * math.pi * j / m), math.cos(2 * math.pi * j / m)) for j in range(m)]


def domain_graph_figure(weights: list[float], affinity: list[list[float]] | None, sizes: list[int] | None = None):
    """Figure 2: nodes = model domains (area ∝ weight), edges = positive centroid affinities (width ∝ A_jk).

    Nodes are one scatter collection (m points); each edge is one line on the axes.
    """
    plt = _pyplot()
    m = len(weights)
    pos = graph_layout(m)
    fig, ax = plt.subplots(figsize=(6, 6))
    if affinity is not None:
        for j in range(m):
            for k in range(j + 1, m):
                a = float(affinity[j][k])
                if a > 0:
                    ax.plot([pos[j][0], pos[k][0]], [pos[j][1], pos[k][1]], color="tab:blue",
                            linewidth=0.5 + 6.0 * a, alpha=0.25 + 0.6 * a, zorder=1)
    wmax = max(weights) if weights else 1.0
    areas = [80 + 2400 * (w / wmax if wmax > 0 else 0) for w in weights]
    ax.scatter([p[0] for p in pos], [p[1] for p in pos], s=areas, c=weights, cmap="viridis", zorder=2,
               edgecolors="black")
    for j, (x, y) in enumerate(pos):
        label = f"{j}\nw={weights[j]:.2f}" + (f"\nn={sizes[j]}" if sizes is not None else "")
        below = math.sqrt(areas[j]) / 2 + 4  # scatter size is an area in points²: start under the disc
        ax.annotate(label, (x, y), xytext=(0, -below), textcoords="offset points", ha="center", va="top", fontsize=8)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.6, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    title = "DoGraph domain graph (last step): node area ∝ weight"
    ax.set_title(title + (", edge width ∝ max(0, cos)" if affinity is not None else " (no affinities recorded)"),
                 fontsize=9)
    fig.tight_layout()
    return fig


def domain_heatmap_figure(counts: list[list[int]], domain_names: list[str] | None = None,
                          weights: list[float] | None = None):
    """Figure 3: model domain (rows) × human domain (columns) sample counts of the last micro-batch."""
    plt = _pyplot()
    import numpy as np

    data = np.asarray(counts, dtype=float)
    m, h = data.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * h, 1.5 + 0.5 * m))
    image = ax.imshow(data, cmap="Blues", aspect="auto")
    for j in range(m):
        for d in range(h):
            ax.text(d, j, str(int(data[j, d])), ha="center", va="center", fontsize=8,
                    color="white" if data[j, d] > data.max() / 2 else "black")
    ax.set_xticks(range(h))
    ax.set_xticklabels([_human_name(domain_names, d) for d in range(h)], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(m))
    rows = [f"{j}" + (f" (w={weights[j]:.2f})" if weights is not None and j < len(weights) else "") for j in range(m)]
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("human domain")
    ax.set_ylabel("model domain (last step)")
    ax.set_title("Samples per model domain and human domain", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- from a state
def figures(state: dict, domain_names: list[str] | None = None) -> dict:
    """{name: Figure} for what the state has: the weights plot needs a history, the graph a last step,
    the heatmap a last step with human labels."""
    out = {}
    history = state.get("history") or []
    if history:
        out["domain_weights"] = domain_weights_figure(history, domain_names)
    last = state.get("last_step")
    if last:
        out["domain_graph"] = domain_graph_figure(last["domain_weights"], last.get("affinity"),
                                                  last.get("cluster_sizes"))
        if last.get("contingency"):
            out["domain_heatmap"] = domain_heatmap_figure(last["contingency"], domain_names, last["domain_weights"])
    return out


def write_plots(state: dict, output_dir: str | os.PathLike, domain_names: list[str] | None = None) -> dict:
    """Write the PNGs into `output_dir/dograph_plots/`; returns {name: path} of those written."""
    plt = _pyplot()
    folder = Path(output_dir) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures(state, domain_names).items():
        path = folder / PLOT_FILES[name]
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths[name] = path
    return paths


def tensorboard_dir(trainer) -> str:
    """The TensorBoard folder of the trainer's run: the TensorBoardCallback's, else its default place."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "logging_dir", None):
            return cb.logging_dir
    return os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(trainer.args.output_dir, "runs", "dograph")


def log_to_tensorboard(state: dict, log_dir: str, step: int, domain_names: list[str] | None = None) -> list[str]:
    """Add the figures to TensorBoard (tags `dograph/<name>`) in `log_dir`; returns the tags written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the PNGs in output_dir still exist
        return []
    tags = []
    writer = SummaryWriter(log_dir=log_dir)
    try:
        for name, fig in figures(state, domain_names).items():
            writer.add_figure(f"dograph/{name}", fig, global_step=step, close=True)  # close=True frees the figure
            tags.append(f"dograph/{name}")
    finally:
        writer.close()
    return tags

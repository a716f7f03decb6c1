"""Plots: valid PNGs with the expected content, drawn from a DoGraph state; TensorBoard gets them too."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from hf_dograph import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_state(human: bool = True) -> dict:
    """4 optimizer steps × 2 micro-batches, 3 human domains; the last step has 4 model domains."""
    history = []
    for step in range(4):
        for micro in range(2):
            m = 3 + (step + micro) % 2  # the number of domains found varies
            weights = [1.0 / m] * m if step == 0 else [0.5] + [0.5 / (m - 1)] * (m - 1)
            entry = {"step": step, "domain_weights": weights, "cluster_sizes": [2] * m}
            if human:
                # JSON keys are strings, as in a dograph_state.json read back
                entry["human_mass"] = {"0": 0.2 + 0.1 * step, "1": 0.5 - 0.1 * step, "2": 0.3}
                entry["human_share"] = {"0": 0.4, "1": 0.4, "2": 0.2}
            history.append(entry)
    affinity = [
        [0.0, 0.9, 0.0, 0.2],
        [0.9, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5],
        [0.2, 0.0, 0.5, 0.0],
    ]  # three positive pairs: (0,1), (0,3), (2,3)
    last = {"domain_weights": [0.1, 0.2, 0.3, 0.4], "cluster_sizes": [1, 2, 2, 3], "affinity": affinity}
    if human:
        last["contingency"] = [[1, 0, 0], [0, 2, 0], [1, 0, 1], [0, 3, 0]]
    return {"history": history, "last_step": last}


def assert_png(path, min_size=(200, 200)):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    pixels = mpimg.imread(path)
    assert pixels.shape[0] >= min_size[1] and pixels.shape[1] >= min_size[0]
    assert pixels[..., :3].std() > 0  # not a blank canvas


def test_pngs_written_and_valid(tmp_path):
    paths = plots.write_plots(synthetic_state(), tmp_path, domain_names=["web", "code", "math"])
    assert set(paths) == {"domain_weights", "domain_graph", "domain_heatmap"}
    for name, path in paths.items():
        assert path == tmp_path / plots.PLOTS_DIR / plots.PLOT_FILES[name]
        assert_png(path)
    # no human labels: no heatmap, the other two still drawn
    paths = plots.write_plots(synthetic_state(human=False), tmp_path / "nolabels")
    assert set(paths) == {"domain_weights", "domain_graph"}


def test_weights_plot_has_one_series_per_human_domain():
    state = synthetic_state()
    fig = plots.domain_weights_figure(state["history"], ["web", "code", "math"])
    top, bottom = fig.axes
    assert len(top.get_lines()) == 3
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["web", "code", "math"]
    web = top.get_lines()[0]
    assert list(web.get_xdata()) == [0, 1, 2, 3]  # one point per optimizer step (micro-batches averaged)
    assert web.get_ydata() == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert len(bottom.get_lines()) == 2  # effective domains, domains found
    assert bottom.get_lines()[1].get_ydata() == pytest.approx([3.5] * 4)
    plt.close(fig)


def test_weights_plot_without_labels_has_one_series_per_rank():
    state = synthetic_state(human=False)
    fig = plots.domain_weights_figure(state["history"])
    top = fig.axes[0]
    assert len(top.get_lines()) == 4  # at most 4 domains were found in a step
    largest = top.get_lines()[0].get_ydata()
    assert largest[0] == pytest.approx((1 / 3 + 1 / 4) / 2) and largest[1] == pytest.approx(0.5)
    plt.close(fig)


def test_graph_plot_nodes_and_edges():
    last = synthetic_state()["last_step"]
    fig = plots.domain_graph_figure(last["domain_weights"], last["affinity"], last["cluster_sizes"])
    ax = fig.axes[0]
    nodes = ax.collections[0]
    assert len(nodes.get_offsets()) == 4
    sizes = list(nodes.get_sizes())
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # area grows with the weight
    edges = ax.get_lines()
    assert len(edges) == 3  # the positive-affinity pairs only
    widths = sorted(e.get_linewidth() for e in edges)
    assert widths[-1] > widths[0]  # width grows with the affinity
    plt.close(fig)


def test_heatmap_holds_the_counts():
    last = synthetic_state()["last_step"]
    fig = plots.domain_heatmap_figure(last["contingency"], ["web", "code", "math"], last["domain_weights"])
    image = fig.axes[0].images[0]
    assert image.get_array().shape == (4, 3)
    assert image.get_array().tolist() == [[float(x) for x in row] for row in last["contingency"]]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["web", "code", "math"]
    plt.close(fig)


def test_trainer_writes_plots_and_logs_them_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

    rows = rows_from_batch(make_batch(seed=1)) + rows_from_batch(make_batch(seed=2))
    args = DoGraphConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=["tensorboard"],
        logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, num_domains=3, projection_dim=32,
        domain_warmup_samples=8,  # the domains exist after the first step, so the graph and heat map are drawn
    )
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator)
    trainer.train()
    for name in ("domain_weights", "domain_graph", "domain_heatmap"):
        assert_png(tmp_path / plots.PLOTS_DIR / plots.PLOT_FILES[name])
    log_dir = plots.tensorboard_dir(trainer)
    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"dograph/domain_weights", "dograph/domain_graph", "dograph/domain_heatmap"} <= set(events.Tags()["images"])
    assert "train/dograph/effective_domains" in events.Tags()["scalars"]  # the Trainer's own logging still works

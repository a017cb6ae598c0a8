import numpy as np
import pandas as pd
import pytest

from analysis import figures
from analysis.figures import family_of, size_of
from analysis.pareto import pareto_front

VARIANTS = {"Micro-4": (1e15, 9000.0), "B-32": (1e17, 4200.0), "L-32": (4e17, 1300.0), "L-16": (1.5e18, 420.0)}
FRACTIONS = (0.03, 0.1, 0.3, 1.0)


@pytest.fixture
def df():
    rows = []
    for i, (variant, (flops, throughput)) in enumerate(VARIANTS.items()):
        for j, fraction in enumerate(FRACTIONS):
            acc = 0.2 + 0.1 * i + 0.05 * j
            rows.append(
                {
                    "study": "data_fraction",
                    "trial": f"variant={variant},fraction={fraction}",
                    "status": "FINISHED",
                    "variant": variant,
                    "family": family_of(variant),
                    "size": size_of(variant),
                    "patch_size": int(variant.split("-")[1]),
                    "image_size": 224,
                    "fraction": fraction,
                    "train_images": int(fraction * 1_281_167),
                    "steps": 10_000,
                    "epochs": 10_000 * 4096 / (fraction * 1_281_167),
                    "images_seen": 10_000 * 4096,
                    "train_flops": flops * (1 + 0.01 * j),
                    "core_seconds": flops / 1e12,
                    "img_per_s_per_core": throughput,
                    "best_val_acc": acc + 0.1,
                    "final_val_acc": acc + 0.08,
                    "fewshot_1shot": acc - 0.1,
                    "fewshot_5shot": acc,
                    "fewshot_10shot": acc + 0.02,
                    "fewshot_25shot": acc + 0.03,
                }
            )
    df = pd.DataFrame(rows)
    df.loc[1, "fewshot_5shot"] = np.nan  # a trial still running
    return df


def _texts(fig):
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def _points(artists):
    return sum(len(a.get_offsets()) for a in artists)


def _assert_files(paths, *suffixes):
    assert sorted(p.suffix for p in paths) == sorted(suffixes)
    for p in paths:
        assert p.exists() and p.stat().st_size > 0


def test_size_and_family_of():
    assert size_of("B-16") == "B"
    assert size_of("Micro-4") == "Micro"
    assert size_of("L/32") == "L"
    assert size_of("S/8") == "S"
    assert family_of("B-16") == family_of("Nano-4") == "Mixer"
    assert size_of("custom") == family_of("custom") == "custom"


def _legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _size_order_df(df):
    """The fixture's rows relabelled as the four smallest-to-largest variants, listed in a scrambled order."""
    names = {"Micro-4": "S-32", "B-32": "Mini-4", "L-32": "Nano-4", "L-16": "Micro-4"}
    return df.assign(variant=df["variant"].map(names), family=np.nan, size=np.nan)


def test_legends_ordered_by_size_then_decreasing_patch(df):
    data = _size_order_df(df)
    order = ["Nano-4", "Micro-4", "Mini-4", "S-32"]
    (ax,) = figures._build_fig2_right(data, "fewshot_5shot").axes
    assert _legend_labels(ax) == order
    (ax,) = figures._build_fig2_left(data, "fewshot_5shot", "train_flops").axes
    assert _legend_labels(ax) == order + ["Pareto frontier"]
    left, right = figures._build_fig3(data, "fewshot_5shot").axes[:2]
    assert _legend_labels(right) == ["Mixer"] + order  # the family line, then its variants' points
    assert left.get_legend() is None  # one legend for both panels
    # Same size -> same colour; larger patch first; custom sizes from the table parse too.
    names = {"Micro-4": "B-16", "B-32": "S/8", "L-32": "B-32", "L-16": "Micro-2"}
    patches = df.assign(variant=df["variant"].map(names))
    (ax,) = figures._build_fig2_right(patches, "fewshot_5shot").axes
    assert _legend_labels(ax) == ["Micro-2", "S/8", "B-32", "B-16"]
    colours = {line.get_label(): line.get_color() for line in ax.lines}
    markers = {line.get_label(): line.get_marker() for line in ax.lines}
    assert colours["B-32"] == colours["B-16"] != colours["S/8"]
    assert markers["B-32"] != markers["B-16"]


def test_results_table_ordered_by_size(df, tmp_path):
    data = _size_order_df(df).sample(frac=1.0, random_state=1)
    _, csv = figures.results_table(data, tmp_path)
    order = ["Nano-4", "Micro-4", "Mini-4", "S-32"]
    assert pd.read_csv(csv)["variant"].tolist() == [v for v in order for _ in FRACTIONS]


def test_every_function_writes_png_and_pdf(df, tmp_path):
    rng = np.random.default_rng(0)
    for paths in (
        figures.fig2_left(df, tmp_path),
        figures.fig2_right(df, tmp_path),
        figures.fig3(df, tmp_path),
        figures.fig5_token_mixing([rng.normal(size=(8, 16)) for _ in range(3)], tmp_path),
    ):
        _assert_files(paths, ".png", ".pdf")
    _assert_files(figures.results_table(df, tmp_path), ".md", ".csv")


def test_fig2_left_points_and_frontier(df):
    fig = figures._build_fig2_left(df, "fewshot_5shot", "train_flops")
    (ax,) = fig.axes
    data = df.dropna(subset=["fewshot_5shot"])
    assert len(ax.collections) == len(VARIANTS)
    assert _points(ax.collections) == len(data)
    plotted_y = np.sort(np.concatenate([c.get_offsets()[:, 1] for c in ax.collections]))
    np.testing.assert_allclose(plotted_y, np.sort(100 * data["fewshot_5shot"]))
    (front_line,) = ax.lines
    front = pareto_front(data, "train_flops", "fewshot_5shot")
    assert front_line.get_linestyle() == "--"
    assert len(front_line.get_xdata()) == len(front)
    np.testing.assert_allclose(front_line.get_xdata(), front["train_flops"])
    assert ax.get_xscale() == "log"
    assert "FLOPs" in ax.get_xlabel() and "%" in ax.get_ylabel()


def test_fig2_right_one_sorted_line_per_variant(df):
    fig = figures._build_fig2_right(df, "fewshot_5shot")
    (ax,) = fig.axes
    assert len(ax.lines) == len(VARIANTS)
    assert sum(len(line.get_xdata()) for line in ax.lines) == df["fewshot_5shot"].notna().sum()
    for line in ax.lines:
        x = np.asarray(line.get_xdata())
        assert np.all(np.diff(x) >= 0) and line.get_marker() not in (None, "None", "")
    assert ax.get_xscale() == "log"


def test_fig3_one_line_per_family_points_per_variant(df):
    fig = figures._build_fig3(df, "fewshot_5shot")
    left, right = fig.axes[:2]
    n = df["fewshot_5shot"].notna().sum()
    for ax in (left, right):
        (line,) = ax.lines  # all variants are family "Mixer": one line through all rows, in x order
        assert line.get_label() == "Mixer" and len(line.get_xdata()) == n
        assert np.all(np.diff(np.asarray(line.get_xdata())) >= 0)
        assert len(ax.collections) == len(VARIANTS) and _points(ax.collections) == n
        assert ax.get_xscale() == "log"
    assert "FLOPs" in left.get_xlabel() and "img/s/core" in right.get_xlabel()
    # The same family and variant have the same colours in every panel.
    assert [line.get_color() for line in left.lines] == [line.get_color() for line in right.lines]
    colours = [tuple(map(tuple, c.get_facecolor())) for c in left.collections]
    assert colours == [tuple(map(tuple, c.get_facecolor())) for c in right.collections]


def test_fig3_family_from_column_for_unparsed_names(df):
    # Rows of another model family (names the Mixer parser does not know) keep their `family` column.
    other = df.assign(variant="ViT-" + df["variant"], family="ViT")
    fig = figures._build_fig3(pd.concat([df, other], ignore_index=True), "fewshot_5shot")
    left, right = fig.axes[:2]
    assert sorted(line.get_label() for line in left.lines) == ["Mixer", "ViT"]
    labels = _legend_labels(right)
    assert labels[:2] == ["Mixer", "ViT"] and labels[2:2 + len(VARIANTS)] == list(VARIANTS)  # parsed ones first


def test_missing_data_gives_explanatory_figure(df, tmp_path):
    no_fewshot = df.drop(columns=["fewshot_5shot"])
    fig = figures._build_fig2_left(no_fewshot, "fewshot_5shot", "train_flops")
    assert "fewshot_5shot" in _texts(fig)
    assert not fig.axes[0].collections and not fig.axes[0].lines

    all_nan = df.assign(fewshot_5shot=np.nan)
    fig = figures._build_fig2_right(all_nan, "fewshot_5shot")
    assert "no trials with train_images and fewshot_5shot yet" in _texts(fig)
    _assert_files(figures.fig2_right(all_nan, tmp_path), ".png", ".pdf")

    # One panel of Fig. 3 can be explained while the other is drawn.
    fig = figures._build_fig3(df.drop(columns=["img_per_s_per_core"]), "fewshot_5shot")
    left, right = fig.axes[:2]
    assert left.lines and not right.lines
    assert "img_per_s_per_core" in _texts(fig)
    assert _legend_labels(left)[0] == "Mixer"  # the legend moves to the panel that is drawn


def _inverse_pairs():
    """Units: a ramp, a checkerboard, two random ones and their negatives (half as large), shuffled.

    Returns the (8, 16) weights and where each base unit and its inverse ended up.
    """
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:4, :4]
    ramp = (xx - 1.5).ravel()  # low spatial frequency
    checker = ((-1.0) ** (xx + yy)).ravel()  # the Nyquist checkerboard: highest frequency
    base = np.stack([ramp, checker, rng.normal(size=16), rng.normal(size=16)])
    perm = rng.permutation(8)
    w = np.concatenate([base, -0.5 * base])[perm]
    where = np.argsort(perm)  # where[u] = row of w that holds unit u
    return w, {name: {int(where[u]), int(where[u + 4])} for u, name in enumerate(["ramp", "checker", "r1", "r2"])}


def test_fig5_pairs_inverse_units_and_sorts_by_frequency(tmp_path):
    w, pair_of = _inverse_pairs()
    pairs = figures.pair_units(w)
    assert sorted(map(sorted, pairs)) == sorted(map(sorted, pair_of.values()))
    assert set(pairs[0]) == pair_of["ramp"]
    assert set(pairs[-1]) == pair_of["checker"]

    fig = figures._build_fig5([w, w[::-1], w], "title", max_units=32)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3 * 8
    images = [np.asarray(ax.images[0].get_array()).ravel() for ax in image_axes[:8]]
    for a, b in zip(images[::2], images[1::2]):  # each unit is shown next to its inverse
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) == pytest.approx(-1.0)
    vmin, vmax = image_axes[0].images[0].get_clim()
    assert vmin == -vmax and vmax > 0
    _assert_files(figures.fig5_token_mixing([w], tmp_path), ".png", ".pdf")


def test_fig5_limits_units_and_rejects_non_square():
    rng = np.random.default_rng(2)
    fig = figures._build_fig5([rng.normal(size=(64, 49))], "t", max_units=8)
    assert len([ax for ax in fig.axes if ax.images]) == 8
    with pytest.raises(ValueError, match="15 tokens is not a perfect square"):
        figures._build_fig5([rng.normal(size=(8, 15))], "t", max_units=8)


def _plane_wave_units(n: int = 8, seed: int = 3):
    """Units ±cos(2π(a·y + b·x)/n + φ) of known, distinct radial frequencies √(a²+b²)/n, each with an inverse
    (-c times it, c in 0.3..2, plus 1 % noise), random phases, rows shuffled.

    Returns the (2K, n²) weights, the expected pairs (as sets of rows) from low to high frequency, and the
    frequencies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    waves = [(0, 1), (1, 1), (0, 2), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]  # radii strictly increasing
    radii = [np.hypot(a, b) / n for a, b in waves]
    assert np.all(np.diff(radii) > 0)
    base = np.stack([np.cos(2 * np.pi * (a * yy + b * xx) / n + rng.uniform(0, 2 * np.pi)).ravel() for a, b in waves])
    k = len(base)
    units = np.concatenate([base, -rng.uniform(0.3, 2.0, size=(k, 1)) * base])
    units += 0.01 * rng.normal(size=units.shape)
    perm = rng.permutation(2 * k)
    row = np.argsort(perm)  # row[u] = where unit u ended up
    return units[perm], [{int(row[u]), int(row[u + k])} for u in range(k)], radii


def test_spatial_frequency_of_plane_waves_is_their_radius():
    n = 8
    yy, xx = np.mgrid[:n, :n]
    for a, b in [(0, 0), (0, 1), (1, 2), (3, 3), (2, -3)]:
        for phase in (0.0, 1.0):
            wave = -2.5 * np.cos(2 * np.pi * (a * yy + b * xx) / n + phase)
            assert figures._spatial_frequency(wave) == pytest.approx(np.hypot(a, b) / n, abs=1e-12)
    assert figures._spatial_frequency((-1.0) ** (xx + yy)) == pytest.approx(np.sqrt(2) / 2)


def test_fig5_pairs_plane_waves_with_their_inverse_in_frequency_order():
    w, expected, radii = _plane_wave_units()
    pairs = figures.pair_units(w)
    assert [set(p) for p in pairs] == expected  # every pair found, and exactly in increasing frequency
    freqs = [figures._spatial_frequency(w[u].reshape(8, 8)) for u, _ in pairs]
    np.testing.assert_allclose(freqs, radii, atol=2e-3)  # 1 % noise moves the centroid a little
    # Odd D_S: the unit whose partner was removed is left as (u, None); the others still pair exactly.
    pairs = figures.pair_units(w[:-1])
    assert sum(v is None for _, v in pairs) == 1 and len(pairs) == len(expected)
    kept = [set(p) for p in pairs if None not in p]
    assert all(p in expected for p in kept) and len(kept) == len(expected) - 1

    fig = figures._build_fig5([w], "title", max_units=len(w))
    shown = [np.asarray(ax.images[0].get_array()).ravel() for ax in fig.axes if ax.images]
    assert len(shown) == len(w)
    for a, b in zip(shown[::2], shown[1::2]):  # each unit next to its inverse
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < -0.99
    np.testing.assert_allclose([figures._spatial_frequency(a.reshape(8, 8)) for a in shown[::2]], radii, atol=2e-3)


@pytest.fixture
def permute_df():
    """Two models x the three Fig. 4 pipelines; the Mixer has two seeds of `none`; one ResNet run is missing."""
    rows = [
        ("Micro-4", "none", 0.80), ("Micro-4", "none", 0.84), ("Micro-4", "patches", 0.82), ("Micro-4", "pixels", 0.44),
        ("BiT-Micro", np.nan, 0.90), ("BiT-Micro", "pixels", 0.225),
    ]
    return pd.DataFrame([{"variant": v, "permute": p, "fewshot_5shot": acc, "status": "FINISHED"}
                         for v, p, acc in rows])


def _bars(ax):
    """(x centre, height) of the bars of a panel, left to right."""
    return sorted((round(r.get_x() + r.get_width() / 2, 6), r.get_height()) for r in ax.patches)


def test_fig4_one_panel_per_model_bars_per_pipeline(permute_df, tmp_path):
    fig = figures._build_fig4(permute_df, "fewshot_5shot")
    mixer, resnet = fig.axes[:2]  # Mixer variants first (size order), other names after
    assert mixer.get_title() == "Micro-4" and resnet.get_title() == "BiT-Micro"
    assert [t.get_text() for t in mixer.get_xticklabels()] == ["original", "patches", "pixels"]
    np.testing.assert_allclose(_bars(mixer), [(0, 82.0), (1, 82.0), (2, 44.0)])  # mean of the two `none` runs
    np.testing.assert_allclose(_bars(resnet), [(0, 90.0), (2, 22.5)])  # NaN permute = original; no `patches` run
    texts = _texts(fig)
    assert "-75.0%" in texts and "-46.3%" in texts and "no run" in texts  # change relative to the original images
    assert mixer.get_shared_y_axes().joined(mixer, resnet)
    _assert_files(figures.fig4_permutation(permute_df, tmp_path), ".png", ".pdf")


def test_fig4_explains_missing_data(permute_df):
    fig = figures._build_fig4(permute_df.drop(columns=["permute"]), "fewshot_5shot")
    assert "no column permute" in _texts(fig) and not fig.axes[0].patches
    fig = figures._build_fig4(permute_df.assign(fewshot_5shot=np.nan), "fewshot_5shot")
    assert "no trials with fewshot_5shot yet" in _texts(fig)


def test_results_table(df, tmp_path):
    shuffled = df.sample(frac=1.0, random_state=0).drop(columns=["core_seconds"])
    md, csv = figures.results_table(shuffled, tmp_path)
    table = pd.read_csv(csv)
    assert len(table) == len(df)
    order = ["Micro-4", "B-32", "L-32", "L-16"]
    assert table["variant"].tolist() == [v for v in order for _ in FRACTIONS]
    assert table["fraction"].tolist() == list(FRACTIONS) * len(VARIANTS)
    assert table["core_seconds"].isna().all()
    text = md.read_text()
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(df)
    assert "5-shot acc (%)" in lines[0] and "train FLOPs" in lines[0]
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[:3] == ["Micro-4", "224", "3%"]
    assert first[7] == "20.0"  # 5-shot accuracy in percent, one decimal
    assert first[8] == "–"  # no fine-tuned top-1 in these rows
    assert first[10] == "1.00e+15" and first[11] == "–"
    assert "–" in lines[3]  # the missing 5-shot value


def test_results_table_empty(tmp_path):
    md, csv = figures.results_table(pd.DataFrame(), tmp_path)
    assert "No trials" in md.read_text()
    assert csv.stat().st_size > 0

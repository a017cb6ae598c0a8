"""Paper-style figures and Table 3 from the results DataFrame (one row per trial).

Every public function writes its files under `out_dir` and returns their paths.
A figure whose data are missing still gets written, as a figure that says what
is missing, so that a half-finished study never yields a silently empty plot.
Figures are built on `matplotlib.figure.Figure` without pyplot: rendering goes
through the Agg (PNG) and PDF canvases whatever the session's backend is, and
no global figure registry is touched.
"""

import logging
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from analysis.pareto import pareto_front
from analysis.replicates import CI_SUFFIX
from workers.models.registry import FAMILIES, Variant, get_variant

logger = logging.getLogger(__name__)

# Styles follow the paper's grouping of models (workers.models.registry kinds): Mixer, attention (ViT), convolution
# (BiT).
# Colour: one hue per kind (Mixer red, attention blue, convolution green), darker the larger the size (the registry's
# size_rank, one scale across families), fixed by the name, so a variant looks the same in every figure whatever
# subset of the data is shown. Names no parser knows get a spare colour (tab10 hues other than those three).
_KIND_COLOURMAPS = {"Mixer": "Reds", "attention": "Blues", "convolution": "Greens"}
_MAX_RANK = 7.0  # Mixer Nano 0 ... H 6, larger models (BiT-R152x4) 7
_SPARE_COLOURS = ["C1", "C4", "C5", "C6", "C7", "C8", "C9"]
# Marker per patch size: same size, different patch -> same colour, other marker; BiT (no patches) a hexagon.
_PATCH_MARKERS = {32: "o", 16: "s", 14: "^", 8: "D", 4: "v", 2: "<"}
_KIND_MARKERS = {"convolution": "h"}
# Line style per kind, as the paper's Fig. 2 (right): "Mixer (solid) ... BiT (dotted) and ViT (dashed)"; used for
# each model's curve (Fig. 2 right) and each family's line (Fig. 3).
_KIND_LINESTYLES = {"Mixer": "-", "attention": "--", "convolution": ":"}
_SPARE_LINESTYLES = ("-.",)
_ACC = re.compile(r"fewshot_(\d+)shot|best_val_acc|final_val_acc|finetune_top1")
_LABELS = {
    "train_flops": "total pre-training compute (FLOPs)",
    "core_seconds": "total pre-training compute (core-seconds)",
    "images_seen": "images seen in pre-training",
    "train_images": "pre-training set size (images)",
    "img_per_s_per_core": "inference throughput (img/s/core)",
    "best_val_acc": "best upstream validation top-1 (%)",
    "final_val_acc": "final upstream validation top-1 (%)",
    "finetune_top1": "downstream top-1 after fine-tuning (%)",
}


def _parse(variant: object) -> Variant | None:
    """The variant named by ``variant`` (workers.models.registry's one parser, every family), or None if it names
    none."""
    try:
        return get_variant(variant) if isinstance(variant, str) else None
    except ValueError:
        return None


def size_of(variant: str) -> str:
    """Size of a variant: 'B-16' -> 'B', 'Micro-4' -> 'Micro', 'ViT-B/16' -> 'B', 'BiT-R50x1' -> 'R50x1';
    a name that does not parse is its own size."""
    v = _parse(variant)
    return v.size if v else str(variant)


def family_of(variant: str) -> str:
    """Model family of a variant: 'B-16' -> 'Mixer', 'ViT-B/16' -> 'ViT', 'BiT-R50x1' -> 'BiT'; a name that does
    not parse is its own family."""
    v = _parse(variant)
    return v.family if v else str(variant)


def kind_of(variant: str) -> str:
    """The paper's model kind: 'B-16' -> 'Mixer', 'ViT-B/16' -> 'attention', 'BiT-R50x1' -> 'convolution'; a name
    that does not parse is its own kind."""
    v = _parse(variant)
    return v.kind if v else str(variant)


def _spare(name: str, choices: Sequence[str]) -> str:
    """A choice fixed by the name (not by the data shown), for names outside the known ones."""
    return choices[zlib.crc32(name.encode()) % len(choices)]


def _shade(kind: str, rank: float) -> str:
    """The kind's hue, from light (rank 0) to dark (rank ``_MAX_RANK``)."""
    cmap = colormaps[_KIND_COLOURMAPS[kind]]
    return to_hex(cmap(0.35 + 0.6 * min(max(rank, 0.0), _MAX_RANK) / _MAX_RANK))


def _style(variant: str) -> dict:
    """Scatter/line style of a variant: hue per kind, shade per size, marker per patch size (BiT: its own)."""
    v = _parse(variant)
    if v is None or v.kind not in _KIND_COLOURMAPS:
        return {"color": _spare(str(variant), _SPARE_COLOURS), "marker": "P"}
    marker = _PATCH_MARKERS.get(v.patch_size, "P") if v.patch_size else _KIND_MARKERS.get(v.kind, "P")
    return {"color": _shade(v.kind, v.size_rank), "marker": marker}


def _linestyle(variant: str) -> str:
    """Line style of a variant's curve: its kind's (Mixer solid, attention dashed, convolution dotted)."""
    v = _parse(variant)
    return _KIND_LINESTYLES.get(v.kind, "-.") if v else _spare(str(variant), _SPARE_LINESTYLES)


def _family_kind(family: str) -> str | None:
    return FAMILIES[family].kind if family in FAMILIES else None


def _family_linestyle(family: str) -> str:
    return _KIND_LINESTYLES.get(_family_kind(family)) or _spare(family, _SPARE_LINESTYLES)


def _family_colour(family: str) -> str:
    """A family's line: the middle shade of its kind's hue; grey for a family outside the registry."""
    kind = _family_kind(family)
    return _shade(kind, _MAX_RANK / 2) if kind in _KIND_COLOURMAPS else "0.35"


def _family_key(family: str) -> tuple:
    """Families in the registry's (the paper's) order, Mixer, ViT, BiT; others after them, by name."""
    return (list(FAMILIES).index(family) if family in FAMILIES else len(FAMILIES)), family


def _variant_key(variant: str) -> tuple:
    """Sort key: by family (Mixer, ViT, BiT), size rank (small to large), then decreasing patch size (increasing
    cost); names that do not parse come last, by name."""
    v = _parse(variant)
    if v is None:
        return 1, 0, 0, 0, str(variant)
    return 0, _family_key(v.family)[0], v.size_rank, -(v.patch_size or 0), v.name


def _label(col: str) -> str:
    m = re.fullmatch(r"fewshot_(\d+)shot", col)
    return f"linear {m.group(1)}-shot top-1 (%)" if m else _LABELS.get(col, col)


def _values(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column as plotted: accuracies in [0, 1] are shown in percent."""
    scale = 100.0 if _ACC.fullmatch(col) else 1.0
    return df[col].to_numpy(dtype=float) * scale


def _errors(df: pd.DataFrame, col: str) -> np.ndarray | None:
    """The 95 % half-widths over seeds of a plotted column (``<col>_ci``, analysis.replicates), in its plotted unit;
    None where no point has one (one seed per point: the figure looks as it does without replicates)."""
    if col + CI_SUFFIX not in df.columns:
        return None
    err = _values(df.assign(**{col: pd.to_numeric(df[col + CI_SUFFIX], errors="coerce")}), col)
    return err if np.isfinite(err).any() else None


def _select(
    df: pd.DataFrame, numeric: Sequence[str], log: Sequence[str] = (), key: str = "variant"
) -> tuple[pd.DataFrame, str | None]:
    """Rows with a `key` and numbers in all `numeric` columns (> 0 for `log` axes), or why none."""
    missing = [c for c in (key, *numeric) if c not in df.columns]
    if missing:
        return df.iloc[:0], f"no column {', '.join(missing)} in the results yet"
    data = df.assign(**{c: pd.to_numeric(df[c], errors="coerce") for c in numeric})
    ok = data[[key, *numeric]].notna().all(axis=1)
    for c in log:
        ok &= data[c] > 0
    if not ok.any():
        positive = f" (> 0 for the log axis: {', '.join(log)})" if log else ""
        return data.iloc[:0], f"no trials with {' and '.join(numeric)} yet{positive}"
    return data[ok], None


def _groups(data: pd.DataFrame, key: str) -> Iterator[tuple[str, pd.DataFrame]]:
    """(name, rows) per value of `key`, in model-size order."""
    for name in sorted(data[key].unique(), key=_variant_key):
        yield name, data[data[key] == name]


def _with_family(data: pd.DataFrame) -> pd.DataFrame:
    """`family` (the model family, e.g. "Mixer") parsed from `variant`; for a name that does not parse,
    the `family` column where given, else the name itself."""
    parsed = data["variant"].map(lambda name: v.family if (v := _parse(name)) else None)
    given = data["family"] if "family" in data.columns else pd.Series(None, index=data.index, dtype=object)
    family = parsed.fillna(given).fillna(data["variant"])
    return data.assign(family=family.astype(str))


def _log_x(ax: Axes) -> None:
    """A log x axis labelled at the decades only: over less than a decade matplotlib labels the minor ticks too,
    and their labels run into each other."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_beside(ax: Axes) -> None:
    """The legend to the right of the axes: inside, matplotlib's "best" spot still covers a point or an error bar
    when every corner has one."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _finish(ax: Axes, x: str, y: str, legend: bool = True) -> None:
    """What every accuracy-vs-cost panel ends with: log x at decades, labelled axes, a light grid, and (unless
    ``legend`` is False) the legend beside the axes."""
    _log_x(ax)
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.grid(alpha=0.3)
    if legend:
        _legend_beside(ax)


def _error_bars(ax: Axes, rows: pd.DataFrame, x: str, y: str, colour: str) -> None:
    """Vertical 95 % error bars over seeds at the plotted points, where the rows have them."""
    err = _errors(rows, y)
    if err is not None:
        ax.errorbar(rows[x], _values(rows, y), yerr=err, fmt="none", ecolor=colour, capsize=2, lw=1, zorder=2)


def _note(ax: Axes, message: str) -> None:
    """Replace a plot that has no data by the reason, in words."""
    logger.warning("%s: %s", ax.get_title() or ax.figure.get_suptitle(), message)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<stem>.png`` and ``.pdf`` (150 dpi, tight), the one format of every figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _single_panel(title: str, df: pd.DataFrame, x: str, y: str) -> tuple[Figure, Axes, pd.DataFrame | None]:
    """A one-panel figure of ``y`` vs log ``x``: (figure, axes, the plottable rows), or rows None when there are
    none (the panel then says why)."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    data, why = _select(df, [x, y], log=[x])
    if why:
        _note(ax, why)
        return fig, ax, None
    return fig, ax, data


def _build_fig2_left(df: pd.DataFrame, quality: str, cost: str) -> Figure:
    fig, ax, data = _single_panel(f"Fig. 2 (left): {_label(quality)} vs {_label(cost)}", df, cost, quality)
    if data is None:
        return fig
    for variant, rows in _groups(data, "variant"):
        ax.scatter(rows[cost], _values(rows, quality), label=variant, zorder=3, **_style(variant))
        _error_bars(ax, rows, cost, quality, _style(variant)["color"])
    front = pareto_front(data, cost, quality)
    ax.plot(front[cost], _values(front, quality), "k--", lw=1, label="Pareto frontier", zorder=2)
    _finish(ax, cost, quality)
    return fig


def fig2_left(
    df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot", cost: str = "train_flops"
) -> list[Path]:
    """Accuracy vs total pre-training compute (log x), points per variant, Pareto frontier dashed."""
    return save_figure(_build_fig2_left(df, quality, cost), out_dir, f"fig2_left_{quality}_vs_{cost}")


def _build_fig2_right(df: pd.DataFrame, quality: str) -> Figure:
    size = "train_images"
    fig, ax, data = _single_panel(f"Fig. 2 (right): {_label(quality)} vs pre-training set size", df, size, quality)
    if data is None:
        return fig
    for variant, rows in _groups(data, "variant"):
        rows = rows.sort_values(size, kind="stable")
        ax.plot(rows[size], _values(rows, quality), label=variant, linestyle=_linestyle(variant), **_style(variant))
        err = _errors(rows, quality)
        if err is not None:  # the 95 % band over seeds
            y = _values(rows, quality)
            ax.fill_between(rows[size], y - err, y + err, color=_style(variant)["color"], alpha=0.2, linewidth=0)
    _finish(ax, size, quality)
    return fig


def fig2_right(df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot") -> list[Path]:
    """Accuracy vs pre-training set size (log x), one curve per model (variant): Mixer solid, ViT dashed, BiT
    dotted, as the paper's Fig. 2 (right); hue per kind, shade per size, marker per patch size."""
    return save_figure(_build_fig2_right(df, quality), out_dir, f"fig2_right_{quality}")


def _build_fig3(df: pd.DataFrame, quality: str) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    fig.suptitle(f"Fig. 3: {_label(quality)} vs compute and throughput, per model family")
    left, right = fig.subplots(1, 2)
    drawn = []
    for ax, x, title in (
        (left, "train_flops", "vs total pre-training compute"),
        (right, "img_per_s_per_core", "vs inference throughput"),
    ):
        ax.set_title(title)
        data, why = _select(df, [x, quality], log=[x])
        if why:
            _note(ax, why)
            continue
        data = _with_family(data)
        # One line per model family through all its rows, as the paper's Fig. 3; each point styled by variant.
        for family in sorted(data["family"].unique(), key=_family_key):
            rows = data[data["family"] == family].sort_values(x, kind="stable")
            ax.plot(rows[x], _values(rows, quality), _family_linestyle(family), color=_family_colour(family), lw=1,
                    label=family, zorder=2)
        for variant, rows in _groups(data, "variant"):
            ax.scatter(rows[x], _values(rows, quality), label=variant, zorder=3, **_style(variant))
            _error_bars(ax, rows, x, quality, _style(variant)["color"])
        _finish(ax, x, quality, legend=False)
        drawn.append(ax)
    if drawn:  # both panels show the same lines and points: one legend, beside the last panel drawn
        _legend_beside(drawn[-1])
    return fig


def fig3(df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot") -> list[Path]:
    """Accuracy vs pre-training FLOPs (left) and vs throughput img/s/core (right), per model family.

    Each family's line (Mixer, ViT, BiT; in its kind's hue and line style) joins all its rows in order of the x
    axis, and each point is marked as its variant (hue per kind, shade per size, marker per patch); pass one
    study's rows at fixed data (model scale).
    """
    return save_figure(_build_fig3(df, quality), out_dir, f"fig3_{quality}")


# Fig. 4 pipelines (the `permute` column, data.permute): tick label, legend text, colour; fixed, so a pipeline
# looks the same in every panel. Runs from before data.permute existed (NaN) trained on the original images.
PERMUTE_PIPELINES = {
    "none": ("original", "original images", "0.45"),
    "patches": ("patches", "patch order shuffled + pixels in patch permuted (one shared permutation)", "tab:orange"),
    "pixels": ("pixels", "all pixels permuted globally", "tab:red"),
}


def _permute_column(data: pd.DataFrame) -> pd.Series:
    return data["permute"].where(data["permute"].notna(), "none").astype(str)


def _build_fig4(df: pd.DataFrame, quality: str) -> Figure:
    title = f"Fig. 4: {_label(quality)} per input pipeline (one fixed permutation for all images)"
    data, why = _select(df, [quality])
    if why is None and "permute" not in data.columns:
        why = "no column permute in the results yet (data.permute of each trial)"
    if why:
        fig = Figure(figsize=(6.5, 4.5), layout="constrained")
        fig.suptitle(title)
        _note(fig.add_subplot(), why)
        return fig
    data = data.assign(permute=_permute_column(data))
    pipelines = [*PERMUTE_PIPELINES, *sorted(set(data["permute"]) - set(PERMUTE_PIPELINES))]
    groups = list(_groups(data, "variant"))
    fig = Figure(figsize=(1.2 + 0.9 * len(pipelines) * len(groups), 4.8), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (variant, rows) in zip(axes, groups):
        # One panel per model, as the paper's (Mixer-B/16 | BiT-R50x1); one bar per pipeline: the mean over the
        # model's trials of that pipeline (error bar: their min..max when there are several, else the 95 %
        # interval over seeds where the row has one).
        ax.set_title(str(variant))
        values = pd.Series(_values(rows, quality), index=rows["permute"].to_numpy())
        half_widths = _errors(rows, quality)
        errors = pd.Series(np.nan if half_widths is None else half_widths, index=values.index)
        original = values.get("none")
        reference = float(np.mean(original)) if original is not None else None
        for x, pipeline in enumerate(pipelines):
            if pipeline not in values.index:
                ax.text(x, 0, "no run", ha="center", va="bottom", rotation=90, fontsize="small", color="0.5")
                continue
            v = np.atleast_1d(values.loc[pipeline]).astype(float)
            mean = float(v.mean())
            ci = float(np.atleast_1d(errors.loc[pipeline])[0])
            err = [[mean - v.min()], [v.max() - mean]] if len(v) > 1 else ([[ci], [ci]] if np.isfinite(ci) else None)
            colour = PERMUTE_PIPELINES.get(pipeline, (pipeline, pipeline, _spare(pipeline, _SPARE_COLOURS)))[2]
            bars = ax.bar(x, mean, width=0.7, color=colour, yerr=err, capsize=3)
            # Relative change to the original images (the paper: pixels -45 % Mixer, -75 % ResNet).
            change = ""
            if reference and pipeline != "none":
                percent = round(100 * (mean / reference - 1), 1) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0
                change = f"\n{percent:+.1f}%"
            ax.bar_label(bars, labels=[f"{mean:.1f}{change}"], fontsize="small")
        ax.set_xticks(range(len(pipelines)), [PERMUTE_PIPELINES.get(p, (p,))[0] for p in pipelines])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(_label(quality))
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.1)  # room for the two-line labels above the tallest bar
    specs = [PERMUTE_PIPELINES.get(p, (p, p, _spare(p, _SPARE_COLOURS))) for p in pipelines]
    handles = [Patch(color=colour, label=text) for _, text, colour in specs]
    fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize="small")
    return fig


def fig4_permutation(df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot") -> list[Path]:
    """The permutation study (paper Fig. 4): per model (variant) one panel, one bar per input pipeline.

    Pipelines are the `permute` column (data.permute): none (original), patches (patch order shuffled and the
    pixels inside every patch permuted with one shared permutation), pixels (global pixel permutation); each
    bar is the mean `quality` of that model's trials (min..max error bar if several) with its change relative to
    the original images. The paper's finding: Mixer's bars for none and patches match (it is exactly invariant
    to `patches` when its patch size is the permutation's, see workers.data.permute); under pixels Mixer drops less
    than the ResNet.
    """
    return save_figure(_build_fig4(df, quality), out_dir, f"fig4_permutation_{quality}")


def _side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"token-mixing weights: S = {num_tokens} tokens is not a perfect square")
    return side


def _spatial_frequency(image: np.ndarray) -> float:
    """The filter frequency of Fig. 5's ordering: the centroid of the radial frequency under the 2-D power spectrum,

        f(w) = Σ_k |Ŵ(k)|² · |k| / Σ_k |Ŵ(k)|²,   k = (k_y, k_x) in cycles/pixel (numpy's fftfreq, in [-1/2, 1/2)),

    so a plane wave cos(2π(a·y + b·x)/n + φ) on an n x n grid (0 <= a, b < n/2) has f = √(a² + b²)/n exactly,
    whatever its phase and sign; the DC term counts at |k| = 0 (a constant image: 0), and the Nyquist
    checkerboard is the maximum √2/2. Scale-free: f(c·w) = f(w) for any c != 0, so a unit and its inverse agree.
    """
    power = np.abs(np.fft.fft2(image)) ** 2
    f = np.fft.fftfreq(image.shape[0])
    radius = np.hypot(f[:, None], f[None, :])
    return float((power * radius).sum() / max(power.sum(), 1e-300))


def pair_units(w: np.ndarray) -> list[tuple[int, int | None]]:
    """Hidden units of a (D_S, S) token-mixing weight paired with their closest inverse, low frequency first.

    Closest inverse (the paper's Fig. 5 pairing): after normalising every row, ŵ = w / ||w||, the inverse of u
    closest to it is the unit v minimising ||ŵ_u + ŵ_v||; since ||ŵ_u + ŵ_v||² = 2 + 2·cos(w_u, w_v), that is
    the most anti-correlated unit (scale-free: a unit and -c times it, c > 0, are at distance 0).

    Matching: greedy, closest pair first. All D_S(D_S-1)/2 distances are sorted once; a pair is taken when both
    of its units are still unpaired (stable order on ties, so the result is deterministic). This is exact
    whenever the units come in mutually closest inverse pairs (each is the other's closest inverse, as for the
    ±pairs the trained weights show); otherwise it is the usual greedy approximation of the minimum-distance
    perfect matching (not the optimum, which would need Edmonds' blossom algorithm), and the last pairs of a
    set without enough inverses may even be positively correlated. With odd D_S, one unit is left as (u, None).

    Order: pairs sorted by their filter frequency, the mean of the two units' :func:`_spatial_frequency`
    (the centroid of the 2-D power spectrum of the unit's √S×√S image; equal for an exact inverse pair),
    low first; ties keep the matching order.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or len(w) == 0:
        raise ValueError(
            f"token-mixing weights: expected a non-empty 2-D (D_S, S) array, got shape {w.shape}"
        )
    side = _side(w.shape[1])
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    i, j = np.triu_indices(len(w), k=1)
    free = np.ones(len(w), dtype=bool)
    pairs: list[tuple[int, int | None]] = []
    order = np.argsort(cos[i, j], kind="stable")
    for a, b in zip(i[order], j[order]):
        if free[a] and free[b]:
            pairs.append((int(a), int(b)))
            free[a] = free[b] = False
    pairs += [(int(u), None) for u in np.flatnonzero(free)]

    def frequency(pair):
        return np.mean([_spatial_frequency(w[u].reshape(side, side)) for u in pair if u is not None])

    return sorted(pairs, key=frequency)


FIG5_TITLE = (
    "Fig. 5: hidden units of the first token-mixing MLPs (pairs with their inverse, low frequency first)"
)


def _build_fig5(weights: Sequence[np.ndarray], title: str, max_units: int) -> Figure:
    if not weights:
        raise ValueError("weights: expected the token-mixing weights of at least one block, got none")
    if max_units < 2:
        raise ValueError(f"max_units: expected at least 2 (one pair), got {max_units}")
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    rows = []
    for w in weights:
        pairs = pair_units(w)
        # Too many pairs: show evenly spaced ones, so the frequency range is covered.
        shown = np.unique(np.linspace(0, len(pairs) - 1, min(len(pairs), max_units // 2)).round())
        rows.append([u for p in shown.astype(int) for u in pairs[p]])
    cols = max(len(r) for r in rows)
    fig = Figure(figsize=(max(4.0, 0.55 * cols + 1.2), 0.7 * len(rows) + 0.8), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for block, (w, units) in enumerate(zip(weights, rows)):
        side = _side(w.shape[1])
        # Symmetric colour range per block, so that white is exactly 0.
        vmax = max(np.abs(w[[u for u in units if u is not None]]).max(), 1e-12)
        for ax, u in zip(axes[block], units + [None] * (cols - len(units))):
            ax.set_xticks([])
            ax.set_yticks([])
            if u is None:
                ax.set_axis_off()
                continue
            image = ax.imshow(w[u].reshape(side, side), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        axes[block, 0].set_ylabel(f"block {block}")
        fig.colorbar(image, ax=axes[block].tolist(), fraction=0.02, pad=0.01)
    return fig


def fig5_token_mixing(
    weights: Sequence[np.ndarray],
    out_dir: str | Path,
    title: str = FIG5_TITLE,
    max_units: int = 32,
) -> list[Path]:
    """One row of √S×√S unit images per (D_S, S) weight (first token-mixing Linear of blocks 0, 1, ...)."""
    return save_figure(_build_fig5(weights, title, max_units), out_dir, "fig5_token_mixing")


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


# (source column, markdown header, markdown format)
_TABLE = (
    ("variant", "model", str),
    ("image_size", "image size", _fmt_int),
    ("fraction", "fraction", lambda x: f"{100 * x:g}%"),
    ("train_images", "train images", _fmt_int),
    ("steps", "steps", _fmt_int),
    ("epochs", "epochs", lambda x: f"{x:.1f}"),
    ("best_val_acc", "best val acc (%)", lambda x: f"{100 * x:.1f}"),
    ("fewshot_5shot", "5-shot acc (%)", lambda x: f"{100 * x:.1f}"),
    ("finetune_top1", "fine-tuned top-1 (%)", lambda x: f"{100 * x:.1f}"),
    ("img_per_s_per_core", "throughput (img/s/core)", _fmt_int),
    ("train_flops", "train FLOPs", lambda x: f"{x:.2e}"),
    ("core_seconds", "core-seconds", _fmt_int),
)


def results_table(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Table-3-style summary, sorted by variant (model size) then fraction.

    Writes `table3.csv` (source column names, raw values, accuracies in [0, 1])
    and `table3.md` (formatted; "–" where a value is missing). Rows summarised over seeds (analysis.replicates)
    show mean ± the 95 % interval (`<col>_ci` in the CSV), their seeds (n) and, where a sweep chose among
    settings, the kept one.
    """
    spec = list(_TABLE)
    if "kept" in df.columns and (df["kept"].fillna("base") != "base").any():
        spec.insert(3, ("kept", "kept setting", str))
    if "n" in df.columns and (df["n"] > 1).any():
        spec.insert(3, ("n", "seeds", _fmt_int))
    table = pd.DataFrame(index=df.index)
    for col, _, _ in spec:
        if col in ("variant", "kept"):
            table[col] = df[col].astype(str) if col in df.columns else "?"
        else:
            table[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    intervals = [col for col, _, _ in spec if col + CI_SUFFIX in df.columns and df[col + CI_SUFFIX].notna().any()]
    table = table.assign(**{col + CI_SUFFIX: pd.to_numeric(df[col + CI_SUFFIX], errors="coerce") for col in intervals})
    rank = {v: i for i, v in enumerate(sorted(table["variant"].unique(), key=_variant_key))}
    table = (
        table.assign(_rank=table["variant"].map(rank))
        .sort_values(["_rank", "fraction"], kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "table3.csv", out / "table3.md"
    table.to_csv(csv_path, index=False)

    lines = [
        "| " + " | ".join(header for _, header, _ in spec) + " |",
        "|" + "|".join("---" if col in ("variant", "kept") else "---:" for col, _, _ in spec) + "|",
    ]
    for _, row in table.iterrows():
        cells = ["–" if pd.isna(row[col]) else fmt(row[col])
                 + (f" ± {fmt(row[col + CI_SUFFIX])}" if np.isfinite(row.get(col + CI_SUFFIX, np.nan)) else "")
                 for col, _, fmt in spec]
        lines.append("| " + " | ".join(cells) + " |")
    if table.empty:
        lines.append("\nNo trials in the results yet.")
    elif intervals:
        lines.append("\nMean ± 95 % Student-t interval over the seeds (none where a point has one seed).")
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path]

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
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.pareto import pareto_front
from workers.model import SIZES, MixerVariant, get_variant

logger = logging.getLogger(__name__)

_TAB10 = [f"C{i}" for i in range(10)]
# Colour per Mixer size, small to large (the order of workers.model.SIZES), fixed so that a size looks the
# same in every figure whatever subset of the data is shown; names that do not parse get a spare colour.
_SIZE_COLOURS = dict(zip(SIZES, _TAB10))
_SPARE_COLOURS = _TAB10[len(_SIZE_COLOURS):] or _TAB10
# Marker per patch size: same size, different patch -> same colour, other marker.
_PATCH_MARKERS = {32: "o", 16: "s", 14: "^", 8: "D", 4: "v", 2: "<"}
# Line style per model family in Fig. 3 (one line per family, as the paper's Fig. 3).
_FAMILY_LINESTYLES = {"Mixer": "-"}
_SPARE_LINESTYLES = ("--", ":", "-.")
_ACC = re.compile(r"fewshot_(\d+)shot|best_val_acc|final_val_acc")
_LABELS = {
    "train_flops": "total pre-training compute (FLOPs)",
    "core_seconds": "total pre-training compute (core-seconds)",
    "images_seen": "images seen in pre-training",
    "train_images": "pre-training set size (images)",
    "img_per_s_per_core": "inference throughput (img/s/core)",
    "best_val_acc": "best upstream validation top-1 (%)",
    "final_val_acc": "final upstream validation top-1 (%)",
}


def _parse(variant: object) -> MixerVariant | None:
    """The variant named by ``variant`` (workers.model's one parser), or None if it names none."""
    try:
        return get_variant(variant) if isinstance(variant, str) else None
    except ValueError:
        return None


def size_of(variant: str) -> str:
    """Size of a variant: 'B-16' -> 'B', 'Micro-4' -> 'Micro'; a name that does not parse is its own size."""
    v = _parse(variant)
    return v.size if v else str(variant)


def family_of(variant: str) -> str:
    """Model family of a variant: 'B-16' -> 'Mixer'; a name that does not parse is its own family."""
    v = _parse(variant)
    return v.family if v else str(variant)


def _spare(name: str, choices: Sequence[str]) -> str:
    """A choice fixed by the name (not by the data shown), for names outside the known ones."""
    return choices[zlib.crc32(name.encode()) % len(choices)]


def _style(variant: str) -> dict:
    """Scatter/line style of a variant: colour per size, marker per patch size."""
    v = _parse(variant)
    if v is None:
        return {"color": _spare(str(variant), _SPARE_COLOURS), "marker": "P"}
    colour = _SIZE_COLOURS.get(v.size) or _spare(v.size, _SPARE_COLOURS)
    return {"color": colour, "marker": _PATCH_MARKERS.get(v.patch_size, "P")}


def _family_linestyle(family: str) -> str:
    return _FAMILY_LINESTYLES.get(family) or _spare(family, _SPARE_LINESTYLES)


def _variant_key(variant: str) -> tuple:
    """Sort key: by family, size rank (small to large), then decreasing patch size (increasing cost);
    names that do not parse come last, by name."""
    v = _parse(variant)
    if v is None:
        return 1, "", 0, 0, str(variant)
    return 0, v.family, v.size_rank, -v.patch_size, v.name


def _label(col: str) -> str:
    m = re.fullmatch(r"fewshot_(\d+)shot", col)
    return f"linear {m.group(1)}-shot top-1 (%)" if m else _LABELS.get(col, col)


def _values(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column as plotted: accuracies in [0, 1] are shown in percent."""
    scale = 100.0 if _ACC.fullmatch(col) else 1.0
    return df[col].to_numpy(dtype=float) * scale


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


def _note(ax: Axes, message: str) -> None:
    """Replace a plot that has no data by the reason, in words."""
    logger.warning("%s: %s", ax.get_title() or ax.figure.get_suptitle(), message)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _build_fig2_left(df: pd.DataFrame, quality: str, cost: str) -> Figure:
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"Fig. 2 (left): {_label(quality)} vs {_label(cost)}")
    data, why = _select(df, [cost, quality], log=[cost])
    if why:
        _note(ax, why)
        return fig
    for variant, rows in _groups(data, "variant"):
        ax.scatter(rows[cost], _values(rows, quality), label=variant, zorder=3, **_style(variant))
    front = pareto_front(data, cost, quality)
    ax.plot(front[cost], _values(front, quality), "k--", lw=1, label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel(_label(cost))
    ax.set_ylabel(_label(quality))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def fig2_left(
    df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot", cost: str = "train_flops"
) -> list[Path]:
    """Accuracy vs total pre-training compute (log x), points per variant, Pareto frontier dashed."""
    return _save(_build_fig2_left(df, quality, cost), out_dir, f"fig2_left_{quality}_vs_{cost}")


def _build_fig2_right(df: pd.DataFrame, quality: str) -> Figure:
    size = "train_images"
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"Fig. 2 (right): {_label(quality)} vs pre-training set size")
    data, why = _select(df, [size, quality], log=[size])
    if why:
        _note(ax, why)
        return fig
    for variant, rows in _groups(data, "variant"):
        rows = rows.sort_values(size, kind="stable")
        ax.plot(rows[size], _values(rows, quality), label=variant, **_style(variant))
    ax.set_xscale("log")
    ax.set_xlabel(_label(size))
    ax.set_ylabel(_label(quality))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def fig2_right(df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot") -> list[Path]:
    """Accuracy vs pre-training set size (log x), one line per variant."""
    return _save(_build_fig2_right(df, quality), out_dir, f"fig2_right_{quality}")


def _build_fig3(df: pd.DataFrame, quality: str) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    fig.suptitle(f"Fig. 3: {_label(quality)} vs compute and throughput, per model family")
    left, right = fig.subplots(1, 2)
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
        for family in sorted(data["family"].unique()):
            rows = data[data["family"] == family].sort_values(x, kind="stable")
            ax.plot(rows[x], _values(rows, quality), _family_linestyle(family), color="0.35", lw=1, label=family,
                    zorder=2)
        for variant, rows in _groups(data, "variant"):
            ax.scatter(rows[x], _values(rows, quality), label=variant, zorder=3, **_style(variant))
        ax.set_xscale("log")
        ax.set_xlabel(_label(x))
        ax.set_ylabel(_label(quality))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def fig3(df: pd.DataFrame, out_dir: str | Path, quality: str = "fewshot_5shot") -> list[Path]:
    """Accuracy vs pre-training FLOPs (left) and vs throughput img/s/core (right), per model family.

    Each family's line (all Mixer sizes are family "Mixer") joins all its rows in order of the x axis, and
    each point is marked as its variant (colour per size, marker per patch); pass one study's rows at fixed
    data (model scale).
    """
    return _save(_build_fig3(df, quality), out_dir, f"fig3_{quality}")


def _side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"token-mixing weights: S = {num_tokens} tokens is not a perfect square")
    return side


def _spatial_frequency(image: np.ndarray) -> float:
    """Power-weighted mean spatial frequency (cycles/pixel) of the image's 2-D FFT.

    0 for a constant image; up to √2/2 for a checkerboard (the Nyquist corner).
    """
    power = np.abs(np.fft.fft2(image)) ** 2
    f = np.fft.fftfreq(image.shape[0])
    radius = np.hypot(f[:, None], f[None, :])
    return float((power * radius).sum() / max(power.sum(), 1e-300))


def pair_units(w: np.ndarray) -> list[tuple[int, int | None]]:
    """Hidden units of a (D_S, S) token-mixing weight paired with their closest inverse.

    With unit-norm rows ŵ, ||ŵ_u + ŵ_v||² = 2 + 2·cos(w_u, w_v): the closest
    inverse of u is its most anti-correlated unit. Pairs are taken greedily,
    closest first, among units still unpaired; an odd unit out gets None.
    Pairs are sorted by the mean spatial frequency of their √S×√S images, low first.
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
    return _save(_build_fig5(weights, title, max_units), out_dir, "fig5_token_mixing")


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
    ("img_per_s_per_core", "throughput (img/s/core)", _fmt_int),
    ("train_flops", "train FLOPs", lambda x: f"{x:.2e}"),
    ("core_seconds", "core-seconds", _fmt_int),
)


def results_table(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Table-3-style summary, sorted by variant (model size) then fraction.

    Writes `table3.csv` (source column names, raw values, accuracies in [0, 1])
    and `table3.md` (formatted; "–" where a value is missing).
    """
    table = pd.DataFrame(index=df.index)
    for col, _, _ in _TABLE:
        if col == "variant":
            table[col] = df[col].astype(str) if col in df.columns else "?"
        else:
            table[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
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
        "| " + " | ".join(header for _, header, _ in _TABLE) + " |",
        "|" + "|".join("---" if col == "variant" else "---:" for col, _, _ in _TABLE) + "|",
    ]
    for _, row in table.iterrows():
        cells = ["–" if pd.isna(row[col]) else fmt(row[col]) for col, _, fmt in _TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    if table.empty:
        lines.append("\nNo trials in the results yet.")
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path]

"""Figures of a run (one per architecture, and time against the cost model) and the plugins' fixed styles.

Every plugin has the same colour and marker in every run and every figure:
the built-ins have hand-picked ones, any other name gets one derived from a
hash of the name (never from its position in a run). Peers (other libraries)
are drawn dashed with hollow markers; ours solid and filled; ``auto`` black,
on top, since it overlaps the plugin it picked.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd


@dataclasses.dataclass(frozen=True)
class Style:
    """How one plugin is drawn in every figure: its color and marker; a peer's lines are dashed and its markers open."""

    color: str
    marker: str
    peer: bool

    @property
    def linestyle(self) -> str:
        """Dashed for a peer, solid for ours."""
        return "--" if self.peer else "-"

    def kwargs(self, hollow: bool = False) -> dict:
        """matplotlib keyword arguments for a line of this plugin (``hollow``: an open marker)."""
        open_marker = hollow or self.peer
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle,
                "markerfacecolor": "white" if open_marker else self.color, "markeredgecolor": self.color}


# Ours: tab10's colours, one marker each. auto is black and drawn last.
_OURS = {
    "jacobian_contraction": ("#1f77b4", "o"),
    "ntk_vector_products": ("#ff7f0e", "v"),
    "autograd_loop": ("#7f7f7f", "X"),
    "explicit_mlp": ("#2ca02c", "^"),
    "backpack_batchgrad": ("#bcbd22", "<"),
    "backpack_sqrtggn": ("#17becf", ">"),
    "structured": ("#d62728", "D"),
    "auto": ("#000000", "*"),
}
# Peers: a colour family per library (the name's first word), a marker per routine.
_PEER_FAMILIES = {
    "nt": ("#9467bd", "#c5b0d5", "#5b2a86"),
    "asdl": ("#8c564b", "#c49c94", "#5a3a2e"),
    "nngeometry": ("#e377c2", "#f7b6d2", "#a0307e"),
    "curvlinops": ("#008080", "#66b2b2", "#004c4c"),
    "laplace": ("#b8860b", "#e0c060", "#7a5a00"),
}
_PEERS = {
    "nt_jacobian_contraction": ("#9467bd", "s"),
    "nt_ntk_vector_products": ("#c5b0d5", "p"),
    "nt_structured_derivatives": ("#5b2a86", "h"),
}
_MARKERS = ("o", "s", "^", "v", "D", "p", "h", "<", ">", "P", "X", "d", "8")
_EXTRA_COLORS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#393b79", "#637939", "#8c6d31", "#843c39",
                 "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#dbdb8d", "#9edae5")


# name -> peer or not, as the rows of the run being drawn say (their ``origin`` field): a report
# needs no registry
IS_PEER: dict[str, bool] = {}


def is_peer(name: str) -> bool:
    """Whether ``name`` is another library's routine (origin ``peer``), not one of ours: as the run's rows say
    (``IS_PEER``), else by its name (a peer library's prefix), else by the registry where it is already loaded (a
    report does not import torch and the plugins for this)."""
    if name in IS_PEER:
        return IS_PEER[name]
    if name.startswith("nt_") or name in _PEERS or name.split("_")[0].lower() in _PEER_FAMILIES:
        return True
    if "ntk_bench.implementations" not in sys.modules:
        return False
    try:
        from ntk_bench import implementations

        return implementations.origin_of(name) == "peer"
    except Exception:  # not registered here (a plugin of the machine that ran the sweep): by its name alone
        return False


def style(name: str) -> Style:
    """The plugin's fixed colour, marker and line style (the same in every run)."""
    if name in _OURS:
        return Style(*_OURS[name], peer=False)
    if name in _PEERS:
        return Style(*_PEERS[name], peer=True)
    h = zlib.crc32(name.encode())
    peer = is_peer(name)
    family = _PEER_FAMILIES.get(name.split("_")[0].lower()) if peer else None
    colors = family or _EXTRA_COLORS
    return Style(colors[h % len(colors)], _MARKERS[(h // 7) % len(_MARKERS)], peer)


def fmt_time(s: float) -> str:
    """Seconds in the unit that reads best (s, ms, µs, three significant digits); empty for None or a non-finite
    value."""
    if s is None or not np.isfinite(s):
        return ""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(b: float) -> str:
    """Bytes in the binary unit that reads best (GiB, MiB, KiB, B); empty for None or a non-finite value."""
    if b is None or not np.isfinite(b):
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def _tick_label(fmt):
    def f(v, _pos):
        return fmt(v).replace(".0 ", " ")
    return f


def _legend_columns(fig, entries: int) -> int:
    """As many legend columns as fit the figure's width (an entry takes about 2.1 inches at font size 8)."""
    return max(1, min(entries, int(fig.get_figwidth() / 2.1)))


def _log_ticks(ax, kind: str, fmt) -> None:
    """Readable major ticks on a log y axis: decades of seconds (1 ms, 10 ms, ...) or of KiB/MiB/GiB, with
    1-2-5 steps when the data span less than about a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = ax.get_ylim()
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        return
    units = [1e-9, 1e-6, 1e-3, 1.0, 60.0] if kind == "time" else [1.0, 2.0**10, 2.0**20, 2.0**30, 2.0**40]
    for steps, enough in (((1,), 3), ((1, 3), 3), ((1, 2, 5), 3), ((1, 2, 5), 2), (tuple(range(1, 10)), 2)):
        ticks = sorted({u * m * 10**k for u in units for k in range(3) for m in steps if lo <= u * m * 10**k <= hi})
        if len(ticks) >= enough:
            break
    if len(ticks) < 2:  # less than a ninth of a decade: the ends of the axis
        ticks = [lo * 1.02, hi / 1.02]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_label(fmt)))
    # no minor ticks: unlabelled, they were most of a figure's artists and of a large run's report time
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(lo, hi)


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    """log-log slope, only from at least 2 distinct finite positive x (else None)."""
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def slope(x, y) -> float | None:
    """The log-log slope of y against x (how time or memory grows with N), from the finite positive points; None with
    fewer than two distinct x."""
    return _slope(np.asarray(x, dtype=float), np.asarray(y, dtype=float))


def _panel_title(key: tuple, p_values) -> str:
    o, mode, dtype, device, budget = key
    parts = [f"O={_num(o)}", str(mode), str(dtype), str(device)]
    if budget:
        parts.append(budget)
    ps = sorted({int(p) for p in p_values if pd.notna(p)})
    if len(ps) == 1:
        parts.append(f"P={ps[0]:,}")
    return ", ".join(parts)


def _num(v) -> str:
    try:
        return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:g}"
    except (TypeError, ValueError):
        return str(v)


_DRAWN = ("impl", "status", "N", "M", "x2", "time_median_s", "time_iqr_s", "peak_mem_bytes", "P")


def arch_figure(config_title: str, groups: list[tuple[tuple, pd.DataFrame]], impls: list[str], path: Path | None):
    """One figure for an architecture: per group (O, mode, dtype, device, budget) a column with time (top) and
    peak memory (bottom) against N, log-log; N = M filled markers joined by lines, N ≠ M hollow markers at
    √(N·M) labelled N×M; the interquartile range as a bar; one legend for the figure. Written to ``path``; with
    ``path=None`` the figure is returned instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    # the columns drawn, each group's rows split by plugin once (selections of a wide frame per plugin and axis
    # took most of a large run's figures)
    groups = [(key, g[[c for c in _DRAWN if c in g]]) for key, g in groups]
    every = pd.concat([g for _, g in groups])
    ok_all = every[every["status"] == "ok"]
    used = [i for i in impls if (ok_all["impl"] == i).any()]
    any_nm = bool((ok_all["x2"] != "x1").any())
    # The layout in inches, set by hand (matplotlib's tight_layout took most of a report's time).
    ncols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / ncols)
    pw, ph, left, right, gap_x, top, gap_tm, gap_pair = 3.7, 2.5, 0.95, 0.3, 1.0, 0.9, 0.6, 0.9
    width = left + ncols * pw + (ncols - 1) * gap_x + right
    if width < 7.6:
        pw += (7.6 - width) / ncols
        width = 7.6
    entries = len(used) + any_nm + 1
    ncol = max(1, min(entries, int(width / 2.1)))
    bottom = 0.65 + 0.2 * math.ceil(entries / ncol)
    height = top + nrows * (2 * ph + gap_tm) + (nrows - 1) * gap_pair + bottom
    fig = plt.figure(figsize=(width, height))
    for k, (key, g) in enumerate(groups):
        r, c = divmod(k, ncols)
        x0, y_top = left + c * (pw + gap_x), height - top - r * (2 * ph + gap_tm + gap_pair)
        ax_t = fig.add_axes((x0 / width, (y_top - ph) / height, pw / width, ph / height))
        ax_m = fig.add_axes((x0 / width, (y_top - 2 * ph - gap_tm) / height, pw / width, ph / height))
        ok = g[g["status"] == "ok"]
        # numpy arrays, masked per plugin: selections of a frame per plugin and axis took most of a large
        # run's figures
        a_impl = ok["impl"].to_numpy(object)
        a_n, a_m = ok["N"].to_numpy(float), ok["M"].to_numpy(float)
        a_sq = (ok["x2"] == "x1").to_numpy(bool)
        vals = {c: pd.to_numeric(ok[c], errors="coerce").to_numpy(float)
                for c in ("time_median_s", "peak_mem_bytes", "time_iqr_s") if c in ok}
        xs: set = set()
        nm_labels: dict[float, str] = {}
        for impl in impls:
            sel = a_impl == impl
            if not sel.any():
                continue
            st = style(impl)
            z = 5 if impl == "auto" else 3 if not st.peer else 2
            ms = 9 if impl == "auto" else 6
            lw = 1.0 if impl == "auto" else 1.6
            for ax, col in ((ax_t, "time_median_s"), (ax_m, "peak_mem_bytes")):
                y = vals[col]
                with np.errstate(invalid="ignore"):
                    keep = sel & ~np.isnan(y) & (y > 0)
                sq, nm = keep & a_sq, keep & ~a_sq
                if sq.any():
                    order = np.argsort(a_n[sq], kind="stable")
                    ax.plot(a_n[sq][order], y[sq][order], **st.kwargs(), markersize=ms, linewidth=lw, zorder=z)
                    xs.update(a_n[sq].tolist())
                if nm.any():
                    x = np.sqrt(a_n[nm] * a_m[nm])
                    ax.plot(x, y[nm], **{**st.kwargs(hollow=True), "linestyle": "none"},
                            markersize=ms + 1, markeredgewidth=1.5, zorder=z)
                    nm_labels.update({float(xi): f"{int(n)}×{int(m)}" for xi, n, m in zip(x, a_n[nm], a_m[nm])})
                    xs.update(x.tolist())
                if col == "time_median_s" and "time_iqr_s" in vals:
                    e = keep & ~np.isnan(vals["time_iqr_s"])
                    if e.any():
                        x = np.where(a_sq[e], a_n[e], np.sqrt(a_n[e] * a_m[e]))
                        med, half = y[e], vals["time_iqr_s"][e] / 2
                        ax.errorbar(x, med, yerr=np.vstack([np.minimum(half, 0.9 * med), half]), fmt="none",
                                    ecolor=st.color, elinewidth=0.8, alpha=0.6, zorder=z - 1)
        title = _panel_title(key, g["P"])
        for ax, ylabel, fmt in ((ax_t, "median time", fmt_time), (ax_m, "peak memory", fmt_bytes)):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(title if ax is ax_t else "", fontsize=9)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("N (N = M)" + ("; hollow: N×M at √(N·M)" if nm_labels else ""), fontsize=8)
            if xs:
                ticks = sorted({float(x) for x in xs if x == int(x)} or xs)
                ax.xaxis.set_major_locator(FixedLocator(ticks))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_minor_formatter(NullFormatter())
                lo, hi = min(xs), max(xs)
                ax.set_xlim(lo / 1.25, hi * 1.25) if hi > lo else ax.set_xlim(lo / 2, hi * 2)
            else:
                ax.text(0.5, 0.5, "no ok rows", transform=ax.transAxes, ha="center", va="center", color="grey")
            for xi, label in nm_labels.items():
                ax.axvline(xi, color="grey", linestyle=":", linewidth=0.8, zorder=0)
                ax.text(xi, 0.02, label, transform=ax.get_xaxis_transform(), fontsize=7, color="dimgrey",
                        ha="center", va="bottom", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8,
                                                        "pad": 1}, zorder=6)
            _log_ticks(ax, "time" if ax is ax_t else "bytes", fmt)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=8)
    handles = [Line2D([], [], **style(i).kwargs(), markersize=8 if i == "auto" else 6, label=i) for i in used]
    if any_nm:
        handles.append(Line2D([], [], color="grey", marker="o", linestyle="none", markerfacecolor="white",
                              label="hollow: N ≠ M"))
    handles.append(Line2D([], [], color="grey", linestyle="none", marker="|", markersize=10,
                          label="bar: interquartile range"))
    fig.suptitle(config_title, fontsize=12, y=1 - 0.12 / height, va="top")
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.05 / height), ncol=ncol, fontsize=8,
               frameon=False)
    if path is None:  # the caller looks at the figure (and closes it)
        return fig
    save(fig, path)
    plt.close(fig)
    return None


def save(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written whole and never through a link there (``safefs.write_file``)."""
    import io

    from ..store import safefs

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    safefs.write_file(path, buf.getvalue())


def cost_model_figure(ok: pd.DataFrame, impls: list[str], path: Path) -> None:
    """Measured time against the cost model's FLOPs (NTK-VP's model for the NTK-VP plugins, JC's otherwise), a
    panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    devices = sorted(ok["device"].astype(str).unique())
    fig, axes = plt.subplots(1, len(devices), figsize=(max(6.2 * len(devices), 7.6), 5.6), squeeze=False)
    used = []
    for ax, device in zip(axes[0], devices):
        d = ok[ok["device"].astype(str) == device]
        for impl in impls:
            s = d[d["impl"] == impl]
            x = s["predicted_vp_flops"] if impl in ("ntk_vector_products", "nt_ntk_vector_products") \
                else s["predicted_jc_flops"]
            keep = x.notna() & (x > 0) & s["time_median_s"].notna() & (s["time_median_s"] > 0)
            if keep.any():
                st = style(impl)
                ax.plot(x[keep], s["time_median_s"][keep], linestyle="none", marker=st.marker, color=st.color,
                        markerfacecolor="white" if st.peer else st.color, markersize=5, alpha=0.8)
                if impl not in used:
                    used.append(impl)
        ax.set(xscale="log", yscale="log", xlabel="predicted FLOPs (JC's model; NTK-VP's for NTK-VP)",
               ylabel="median time", title=f"time against the cost model, {device}")
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_label(fmt_time)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker=style(i).marker, color=style(i).color,
                      markerfacecolor="white" if style(i).peer else style(i).color, label=i) for i in used]
    ncol = _legend_columns(fig, len(handles))
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.2 + 0.22 * rows) / fig.get_figheight(), 1, 1))
    save(fig, path)
    plt.close(fig)

"""The benchmark's pictures: latency CDF per path, throughput against concurrency, runtime bars."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench.loadgen import LoadResult  # noqa: E402
from bench.runtime import RuntimeResult  # noqa: E402


def _save(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str, destination: Path,
          **grid: object) -> None:
    """Every plot's labels, grid and legend, written to ``destination`` (``grid``: e.g. ``which="both"``)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, **grid)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(destination, dpi=110)
    plt.close(fig)


def latency_cdf(results: list[LoadResult], destination: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        if r.mode == "closed" and r.concurrency and r.concurrency < 8:
            continue  # the sweep's light runs would crowd the picture
        points = sorted(r.latency_ms.items())
        ax.plot([v for _, v in points], [p / 100 for p, _ in points], marker=".", label=r.name)
    ax.set_xscale("log")
    _save(fig, ax, "Latency CDF per path", "latency, ms (log)", "share of requests at or below", destination,
          which="both")


def throughput_sweep(results: list[LoadResult], destination: Path) -> None:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        if r.mode == "closed" and r.path_is_sweep():
            lines[r.extra["server"]].append((r.concurrency or 0, r.throughput))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for server, points in lines.items():
        points.sort()
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=server)
    ax.set_xscale("log", base=2)
    _save(fig, ax, "Single-row /predict throughput against concurrency", "connections (closed loop)",
          "requests / s", destination)


def busiest_share(lines: dict[str, list[float]], every_s: float, destination: Path) -> None:
    """``python -m bench.connections``: the busiest worker's share of CPU each ``every_s`` after a
    worker restart, one line per connection age."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, shares in lines.items():
        ax.plot([every_s * (i + 1) for i in range(len(shares))], shares, marker=".", label=name)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0.4, 1.02)
    _save(fig, ax, "Kept-alive connections after a worker restart",
          "seconds since one worker was killed and the connections opened", "busiest worker's share of CPU",
          destination)


def runtime_bars(results: list[RuntimeResult], destination: Path) -> None:
    tags = list(dict.fromkeys(r.tag for r in results))
    batches = sorted({r.batch for r in results})
    by_key = {(r.tag, r.batch): r.median_ms for r in results}
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        ax.bar([x + i * width for x in range(len(tags))], [by_key.get((t, batch), 0) for t in tags], width,
               label=f"batch {batch}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tags))], tags, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per call (log), one thread")
    ax.set_title("Runtime latency: native sources and their ONNX twins")
    ax.legend()
    fig.tight_layout()
    fig.savefig(destination, dpi=110)
    plt.close(fig)

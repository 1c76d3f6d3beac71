"""The PNGs of ``moeflow demo``: loss, expert load over time, and load balance, from its report;
with ``--pp``, the loss and the last step's timeline per rank (:func:`plot_pipeline`).

:func:`plot_training` draws three panels over the training steps, each with the run's events
marked (rebalances as dashed lines, an elastic run's lost and joined ranks as solid ones, the
window the report's balance figures average over shaded):

- loss: training (per step) and validation (points), with the unigram baseline;
- expert load / mean, per expert and step (summed over the MoE layers): a diverging colour scale
  centred on 1 (balanced), clipped at the 99th percentile so that the early spikes do not turn
  the balanced rest of the run into one flat colour (the colour bar says where it clips);
- max / mean load over experts and over ranks, per step (a moving average over 10 steps), the
  quantities the report and the README quote.

The title carries the run's flags. Needs matplotlib (the ``demo`` extra).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["plot_training", "plot_pipeline", "elastic_events", "load_share", "colour_range", "title_text",
           "CLIP_PERCENTILE"]

#: the colour scale of the load panel ends at this percentile of the load / mean values
CLIP_PERCENTILE = 99.0


def _moving_average(values, window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    kernel = np.ones(min(window, v.size)) / min(window, v.size)
    head = np.array([v[:i + 1].mean() for i in range(min(window, v.size) - 1)])  # shorter windows first
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def load_share(expert_load) -> np.ndarray:
    """``[steps, E]`` loads (summed over layers) -> each expert's load over the step's mean."""
    load = np.asarray(expert_load, dtype=np.float64)
    return load / np.clip(load.mean(1, keepdims=True), 1e-9, None)


def colour_range(share: np.ndarray) -> tuple[float, float]:
    """``(vmin, vmax)`` of the load panel: the smallest value, and the :data:`CLIP_PERCENTILE`-th
    percentile (a few early spikes do not stretch the scale); 1 (balanced) always strictly inside."""
    vmax = max(float(np.percentile(share, CLIP_PERCENTILE)), 1.0 + 1e-3)
    vmin = min(float(share.min()), 1.0 - 1e-3)
    return vmin, vmax


def title_text(report: dict, flags: str = "") -> str:
    """The command with the run's flags, then the model and the seed."""
    cfg = report["config"]
    top_k = cfg.get("num_topk", cfg.get("top_k"))
    return (f"moeflow demo {flags}".rstrip() + f" | {report['ranks']} ranks, {cfg['num_layers']} layers, "
            f"{cfg['num_experts']} experts top-{top_k}, {report['num_params'] / 1e6:.1f}M parameters, "
            f"seed {cfg['seed']}")


def elastic_events(report: dict) -> list[tuple[str, int, str]]:
    """``(label, step, colour)`` per recovery or join of an elastic run (``moeflow demo
    --elastic``): the line stands before the step that ran first on the new group."""
    out = []
    for e in report.get("elastic", {}).get("events", []):
        if e["kind"] == "loss":
            took = f", step done {e['step_done_s']:.1f} s after the kill" if e.get("step_done_s") is not None else ""
            lost = f", {e['steps_lost']} steps lost for {sum(map(len, e['restored'].values()))} experts" \
                if e["restored"] else ", no step lost"
            out.append((f"{', '.join(e['lost'])} lost at step {e['step']}{took}{lost}", e["step"], "black"))
        else:
            out.append((f"{', '.join(e['joined'])} joined: {len(e['members'])} ranks", e["step"], "green"))
    return out


def _loss_panel(ax, report: dict) -> None:
    """Training loss per step and validation loss (points) against the unigram baseline."""
    h = report["history"]
    ax.plot(h["step"], h["loss"], label="train", lw=1)
    ax.plot(h["val_step"], h["val_loss"], "o-", label="validation")
    ax.axhline(report["unigram_val_loss"], color="gray", ls=":", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"loss: validation {report['final_val_loss']:.3f}")


def plot_training(report: dict, path: str, flags: str = "", title: Optional[str] = None) -> str:
    """Write the demo's figure for ``report`` (what :func:`moeflow.demo.train` returns) to ``path``.

    Args:
        report: the demo report (``history``, ``config``, ``ranks``, ``num_params``, ...).
        path: where to write the PNG.
        flags: the command line's flags, shown in the title (e.g. ``"--no-bias --steps 300"``).
        title: replaces the whole title when given.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    h = report["history"]
    steps = np.asarray(h["step"])
    rebalances = [r["step"] for r in h.get("rebalance", [])]
    tail = max(1, len(steps) // 10)  # the report's balance figures average over the last 10% of steps
    window = (steps[-tail], steps[-1]) if len(steps) else None

    elastic_marks = elastic_events(report)
    fig, (ax_loss, ax_load, ax_bal) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw=dict(width_ratios=[1, 1.25, 1]))

    def mark_events(ax, label: bool) -> None:
        for i, s in enumerate(rebalances):  # black on the red/blue load panel, crimson elsewhere
            ax.axvline(s + 0.5, color="black" if ax is ax_load else "crimson", ls="--", lw=1.2,
                       label="rebalance" if label and i == 0 else None)
        for text, s, colour in elastic_marks:  # moeflow demo --elastic: losses and joins
            ax.axvline(s - 0.5, color=colour, ls="-", lw=1.6, label=text if label else None)
        if window is not None and ax is not ax_load:
            ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="gray", alpha=0.12,
                       label="last 10% (report window)" if label else None)

    _loss_panel(ax_loss, report)
    mark_events(ax_loss, label=True)
    ax_loss.legend(fontsize=8)

    share = load_share(h["expert_load"])
    vmin, vmax = colour_range(share)
    im = ax_load.imshow(share.T, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                        norm=TwoSlopeNorm(vmin=vmin, vcenter=1.0, vmax=vmax),
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, share.shape[1] - 0.5, -0.5))
    mark_events(ax_load, label=False)
    ax_load.set_xlabel("step")
    ax_load.set_ylabel("expert")
    ax_load.set_title(f"expert load / mean (all layers); colours clipped at {vmax:.2f} "
                      f"(p{CLIP_PERCENTILE:g}; max {share.max():.2f})", fontsize=9)
    bar = fig.colorbar(im, ax=ax_load, extend="max" if share.max() > vmax else "neither")
    bar.set_label("load / mean (1 = balanced)")

    ax_bal.plot(steps, _moving_average(h["max_over_mean_expert"]), label="over experts (mean of layers)")
    ax_bal.plot(steps, _moving_average(h["max_over_mean_rank"]), label="over ranks")
    ax_bal.axhline(1.0, color="gray", ls=":", lw=1)
    mark_events(ax_bal, label=True)
    ax_bal.set_xlabel("step")
    ax_bal.set_ylabel("max / mean load (10-step average)")
    ax_bal.set_title(f"balance, last 10%: experts {report['max_over_mean_expert_last']:.2f}, "
                     f"ranks {report['max_over_mean_rank_last']:.2f}", fontsize=10)
    ax_bal.legend(fontsize=8)

    fig.suptitle(title if title is not None else title_text(report, flags), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# span kind -> (colour, legend label) of the pipelined demo's timeline
_SPANS = {"F": ("#4c72b0", "forward"), "B": ("#55a868", "backward"), "W": ("#b5bd68", "weight grad"),
          "issue": ("#c44e52", "comm issue"), "wait": ("#f0a030", "comm wait"), "switch": ("#222222", "hand-over")}


def plot_pipeline(report: dict, path: str, flags: str = "", title: Optional[str] = None) -> str:
    """Write the pipelined demo's figure (``moeflow demo --pp``, :func:`moeflow.demo_pipeline.train`'s
    report) to ``path``: the loss, and the last step as a timeline per rank (each action's
    forward in the upper half of the rank's row, backward in the lower half, its communication
    drawn over it). Arguments and return as :func:`plot_training`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = report["ranks"]
    fig, (ax_loss, ax_time) = plt.subplots(2, 1, figsize=(12, 6.5 + 0.6 * R),
                                           gridspec_kw=dict(height_ratios=[3, 1 + 0.6 * R]))
    _loss_panel(ax_loss, report)
    ax_loss.legend(fontsize=8)
    for r, spans in enumerate(report["last_step_spans"]):
        actions = {}  # lane -> its actions' (start, end, half): 0 forward, 1 backward
        for lane, kind, start, end in spans:
            if kind in ("F", "B", "W"):
                actions.setdefault(lane, []).append((start, end, 0 if kind == "F" else 1))
        for lane, kind, start, end in spans:
            if kind in ("F", "B", "W"):
                half = 0 if kind == "F" else 1
                ax_time.broken_barh([(start * 1e3, (end - start) * 1e3)], (r - 0.4 + 0.4 * half, 0.38),
                                    facecolors=_SPANS[kind][0], alpha=0.6)
            else:  # communication: over the action of its lane that holds it
                half = next((h for s0, e0, h in actions.get(lane, []) if s0 <= start and end <= e0), 0)
                ax_time.broken_barh([(start * 1e3, (end - start) * 1e3)], (r - 0.3 + 0.4 * half, 0.18),
                                    facecolors=_SPANS[kind][0], zorder=3)
    s = report["step_seconds"]
    p = report["pipeline"]
    ax_time.set_title(f"last step per rank ({p['schedule']}{' with overlap' if p['overlap'] else ''}, "
                      f"{p['num_microbatches']} micro-batches); per step, last 10%: "
                      f"compute {s['compute'] * 1e3:.0f} ms, "
                      f"exposed comm {s['exposed_comm'] * 1e3:.0f} ms, bubble {s['bubble'] * 1e3:.0f} ms, "
                      f"hand-overs {s['switching'] * 1e3:.0f} ms", fontsize=10)
    ax_time.set_yticks(range(R), [f"rank {r}" for r in range(R)])
    ax_time.invert_yaxis()
    ax_time.set_xlabel("ms since the step started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour, _ in _SPANS.values()]
    ax_time.legend(handles, [label for _, label in _SPANS.values()], loc="upper center", bbox_to_anchor=(0.5, -0.1),
                   fontsize=8, ncol=6, frameon=False)  # below the axes: over them it would hide rank 0's spans
    fig.suptitle(title if title is not None else title_text(report, flags), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

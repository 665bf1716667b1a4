"""The figures a run writes: their style, and checks on them."""

import matplotlib
from cycler import cycler

# Okabe & Ito (2008): eight colours told apart under every common colour-vision
# deficiency (no red/green pair); the runs' line and marker colours, in order.
PALETTE = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
)


def style():
    """A context in which matplotlib draws with the runs' style: the
    colour-blind-safe `PALETTE` as the colour cycle."""
    return matplotlib.rc_context({"axes.prop_cycle": cycler(color=list(PALETTE))})


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of texts that overlap on the drawn figure: titles, axis labels and
    tick labels of different axes, and the figure's title against them all."""
    renderer = fig.canvas.get_renderer()
    groups = []
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):  # tick labels drawn: inside the view
            lo, hi = sorted(axis.get_view_interval())
            texts += [
                tick.label1
                for tick in axis.get_major_ticks()
                if lo <= tick.get_loc() <= hi
            ]
        groups.append([t for t in texts if t.get_visible() and t.get_text()])
    if fig._suptitle is not None:
        groups.append([fig._suptitle])
    boxes = [
        [(t.get_text(), t.get_window_extent(renderer)) for t in group]
        for group in groups
    ]
    found = []
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            for a, box_a in first:
                for b, box_b in second:
                    if box_a.overlaps(box_b):
                        found.append((a, b))
    return found

"""A layers x experts load heatmap with a colour scale, drawn with NumPy only.

TensorBoard shows images but cannot plot a matrix, and the package does not
depend on matplotlib, so the heatmap is drawn into an RGB array here: one row
per MoE layer, one column per expert, each cell coloured by the expert's load
relative to a perfectly even split (1 = balanced, 0 = idle, `E` = the expert
gets everything), a colour bar with its scale, and the layer index beside
each row.
"""

import math

import numpy as np

# Anchor colours of matplotlib's "viridis" (perceptually uniform, readable
# in grey scale), interpolated linearly in between.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [110, 206, 88],
        [181, 222, 43],
        [253, 231, 37],
    ],
    dtype=np.float64,
)

# 3 x 5 pixel digits (and a point), one string of rows per glyph.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
}
_TEXT_SCALE = 2
_CHAR_WIDTH = 4 * _TEXT_SCALE  # 3 columns and a space
_CHAR_HEIGHT = 5 * _TEXT_SCALE
_BACKGROUND = np.array([255, 255, 255], np.uint8)
_MISSING = np.array([200, 200, 200], np.uint8)  # no such expert in the layer
_INK = np.array([0, 0, 0], np.uint8)


def colormap(values):
    """Viridis colours of `values` in [0, 1] (clipped), as uint8 `[..., 3]`."""
    values = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    position = values * (len(_VIRIDIS) - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, len(_VIRIDIS) - 1)
    weight = (position - lower)[..., None]
    colours = _VIRIDIS[lower] * (1.0 - weight) + _VIRIDIS[upper] * weight
    return np.round(colours).astype(np.uint8)


def _draw_text(image, text, top, left):
    """Draw digits and points into `image` (in place); skips what overflows."""
    for i, char in enumerate(text):
        glyph = _GLYPHS.get(char)
        if glyph is None:
            continue
        bitmap = np.array([[c == "1" for c in row] for row in glyph])
        bitmap = np.kron(bitmap, np.ones((_TEXT_SCALE, _TEXT_SCALE), bool))
        y0, x0 = top, left + i * _CHAR_WIDTH
        y1, x1 = y0 + bitmap.shape[0], x0 + bitmap.shape[1]
        if y0 < 0 or x0 < 0 or y1 > image.shape[0] or x1 > image.shape[1]:
            continue
        image[y0:y1, x0:x1][bitmap] = _INK


def _format_tick(value):
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"


def render_load_heatmap(loads, vmax=None):
    """Draw a layers x experts load heatmap with a colour bar.

    Each row is one layer's load (fractions of its routed choices per
    expert), shown relative to an even split: a cell holds `load * E`, so 1
    is a balanced expert, 0 an idle one, and a collapsed layer shows one
    bright cell in a dark row. Rows may have different numbers of experts
    (missing cells are grey). The colour bar on the right is labelled with
    its scale; the row number (the layer's position in the list) is written
    on the left.

    Args:
        loads: a sequence of 1-D arrays, one per layer, each summing to 1.
        vmax: optional float > 0, the load (relative to even) at the top of
            the colour scale. Defaults to at least 2, rounded up to cover the
            largest cell.

    Returns:
        A uint8 RGB image `[height, width, 3]`.

    Example:

    >>> import numpy as np
    >>> image = render_load_heatmap([np.full(8, 1 / 8), np.eye(8)[0]])
    >>> image.dtype, image.shape[-1]
    (dtype('uint8'), 3)
    """
    rows = [np.asarray(load, np.float64).reshape(-1) for load in loads]
    if not rows or any(row.size == 0 for row in rows):
        raise ValueError(
            "`loads` must be a non-empty sequence of non-empty 1-D arrays. "
            f"Received: loads={loads!r}"
        )
    relative = [row * row.size for row in rows]
    largest = max(float(np.max(row)) for row in relative)
    if vmax is None:
        vmax = max(2.0, math.ceil(largest * 2.0) / 2.0)
    elif not vmax > 0:
        raise ValueError(f"`vmax` must be a positive number. Received: vmax={vmax!r}")

    num_layers = len(rows)
    num_experts = max(row.size for row in rows)
    cell_width = int(np.clip(480 // num_experts, 2, 32))
    cell_height = int(np.clip(240 // num_layers, 6, 32))
    label_width = len(str(num_layers - 1)) * _CHAR_WIDTH + 6
    grid_top, grid_left = 8, label_width
    grid_height = num_layers * cell_height
    grid_width = num_experts * cell_width
    bar_left = grid_left + grid_width + 12
    bar_width = 14
    bar_height = max(grid_height, 80)
    tick_labels = sorted({0.0, 1.0, float(vmax)})
    text_width = max(len(_format_tick(tick)) for tick in tick_labels) * _CHAR_WIDTH
    height = grid_top + max(grid_height, bar_height) + _CHAR_HEIGHT + 12
    width = bar_left + bar_width + 6 + text_width + 6
    image = np.empty((height, width, 3), np.uint8)
    image[:] = _BACKGROUND

    for index, row in enumerate(relative):
        colours = np.tile(_MISSING, (num_experts, 1))
        colours[: row.size] = colormap(row / vmax)
        cells = np.repeat(np.repeat(colours[None], cell_height, 0), cell_width, 1)
        top = grid_top + index * cell_height
        image[top : top + cell_height, grid_left : grid_left + grid_width] = cells
        if cell_height >= _CHAR_HEIGHT:
            _draw_text(
                image,
                str(index),
                top + (cell_height - _CHAR_HEIGHT) // 2,
                2,
            )
    # First and last expert numbers under the grid.
    below = grid_top + grid_height + 4
    _draw_text(image, "0", below, grid_left)
    last = str(num_experts - 1)
    _draw_text(
        image, last, below, grid_left + grid_width - len(last) * _CHAR_WIDTH + 2
    )

    # The colour bar: vmax at the top, 0 at the bottom, with tick labels.
    levels = np.linspace(1.0, 0.0, bar_height)
    bar = np.repeat(colormap(levels)[:, None], bar_width, axis=1)
    image[grid_top : grid_top + bar_height, bar_left : bar_left + bar_width] = bar
    placed = []
    for tick in sorted(tick_labels, key=lambda t: t != 1.0, reverse=True):
        y = grid_top + int(round((1.0 - tick / vmax) * (bar_height - 1)))
        if any(abs(y - other) < _CHAR_HEIGHT + 6 for other in placed):
            continue  # The "1" (balanced) tick when it would overlap 0 or vmax.
        placed.append(y)
        image[y, bar_left + bar_width : bar_left + bar_width + 4] = _INK
        top = int(np.clip(y - _CHAR_HEIGHT // 2, 0, height - _CHAR_HEIGHT))
        _draw_text(image, _format_tick(tick), top, bar_left + bar_width + 6)
    return image

"""What the model saw, drawn on the frame: a pure numpy function over ``TokenProvenance``.

The frame is dimmed; every patch a kept visual token stands for is shown at full brightness with an
outline; every merged group (a token standing for several patches, VisionZip's contextual tokens) is
tinted in its own colour; the crops the vision tower encoded are outlined. Dropped patches stay dim.
No ROS and no torch here: the node, replay and demo call it with an ``HxWx3 uint8`` frame.
"""

from __future__ import annotations

import colorsys

import numpy as np

from zip_vlm_ros.models import TokenProvenance

__all__ = ["CROP_COLOUR", "DIM", "KEPT_OUTLINE", "TINT", "draw_overlay", "group_colour", "patch_edges"]

# In 256ths, so the frame is blended in uint16 integer arithmetic: a 1080p overlay per result stays cheap.
DIM = 90                          # brightness of patches no kept token stands for (90/256, about 0.35)
TINT = 128                        # share of the group's colour in a merged patch (128/256; the rest: the frame)
KEPT_OUTLINE = (255, 255, 0)      # 1 px outline of each kept patch
CROP_COLOUR = (0, 255, 255)       # 1 px outline of each crop the tower encoded
_DIMMED = ((np.arange(256, dtype=np.uint16) * DIM) >> 8).astype(np.uint8)  # a table: one lookup per pixel


def group_colour(token: int) -> tuple[int, int, int]:
    """A saturated colour of its own for merged token `token`: hues a golden-ratio step apart, so tokens
    next to each other in the LLM's order differ clearly."""
    red, green, blue = colorsys.hsv_to_rgb((token * 0.618033988749895) % 1.0, 0.9, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def patch_edges(start: float, length: float, side: int, limit: int) -> np.ndarray:
    """``[side + 1]`` pixel edges of a crop's patch rows (or columns) in the frame, clipped to ``0..limit``."""
    edges = np.round(start + np.arange(side + 1) * (length / side)).astype(np.int64)
    return edges.clip(0, limit)


def draw_overlay(frame: np.ndarray, provenance: TokenProvenance) -> np.ndarray:
    """``frame`` (``HxWx3 uint8``, the image the tokens were computed from) with `provenance` drawn on it;
    returns a new ``HxWx3 uint8`` array of the same size."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be an HxWx3 uint8 array, got shape {frame.shape} dtype {frame.dtype}")
    height, width = frame.shape[:2]
    canvas = _DIMMED[frame]
    kept_boxes = []
    for crop, tokens in zip(provenance.crops, provenance.token_of_patch):
        grid_rows, grid_columns = crop.grid
        rows = patch_edges(crop.top, crop.height, grid_rows, height)
        cols = patch_edges(crop.left, crop.width, grid_columns, width)
        for row, col in zip(*np.nonzero(tokens >= 0)):
            token = int(tokens[row, col])
            top, bottom, left, right = rows[row], rows[row + 1], cols[col], cols[col + 1]
            if bottom <= top or right <= left:
                continue  # a patch of padding outside the frame
            if provenance.group_sizes[token] > 1:
                colour = np.asarray(group_colour(token), np.uint16) * TINT
                patch = frame[top:bottom, left:right].astype(np.uint16)
                canvas[top:bottom, left:right] = (patch * (256 - TINT) + colour) >> 8
            else:
                canvas[top:bottom, left:right] = frame[top:bottom, left:right]
                kept_boxes.append((top, bottom, left, right))
    for box in kept_boxes:
        _outline(canvas, box, KEPT_OUTLINE)
    for crop in provenance.crops:
        rows = patch_edges(crop.top, crop.height, 1, height)
        cols = patch_edges(crop.left, crop.width, 1, width)
        if rows[1] > rows[0] and cols[1] > cols[0]:
            _outline(canvas, (rows[0], rows[1], cols[0], cols[1]), CROP_COLOUR)
    return canvas


def _outline(canvas: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    """A 1 px rectangle on the border pixels of rows ``top..bottom-1`` and columns ``left..right-1``."""
    top, bottom, left, right = box
    canvas[top, left:right] = canvas[bottom - 1, left:right] = colour
    canvas[top:bottom, left] = canvas[top:bottom, right - 1] = colour

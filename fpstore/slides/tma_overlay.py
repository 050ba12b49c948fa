"""A dearrayed slide drawn for checking: the fitted lattice, each core, empty position and
orientation core marked on the detection thumbnail."""

from __future__ import annotations

import numpy as np

from fpstore.slides.tma_detect import TmaArray


def draw_overlay(array: TmaArray) -> np.ndarray:
    """The thumbnail with the fitted lattice of each block (thin lines between neighbouring
    positions, the block number at its corner), each core circled and labelled (its core
    index, else row-column: green when sure, yellow below 0.5 confidence), each empty
    position circled thin and crossed in grey, each orientation core circled in magenta (O1,
    O2, ...)."""
    import cv2

    image = np.ascontiguousarray(array.thumbnail[..., :3]).copy()
    ds = array.downsample
    radius = max(2, int(round(array.core_diameter_px / ds / 2)))
    thin = max(1, radius // 16)

    def label(text, centre, colour, size=1.0):
        font = max(0.3, size * radius / (22.0 * max(2, len(text))))
        weight = max(1, int(round(font * 2)))
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, weight)
        origin = (int(centre[0] - w / 2), int(centre[1] + h / 2))
        cv2.putText(
            image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, colour, weight, cv2.LINE_AA
        )

    for number, nodes in enumerate(array.nodes, start=1):
        grid = np.round(nodes / ds).astype(np.int32)
        for line in list(grid) + list(grid.transpose(1, 0, 2)):
            if len(line) > 1:
                cv2.polylines(
                    image,
                    [np.ascontiguousarray(line).reshape(-1, 1, 2)],
                    False,
                    (90, 150, 255),
                    thin,
                )
        # the block's number just above its first position
        label(f"B{number}", grid[0, 0] - (0, 1.6 * radius), (0, 90, 255), size=2.0)
    for core in array.cores:
        centre = (int(round(core.centre[0] / ds)), int(round(core.centre[1] / ds)))
        r = max(2, int(round(core.diameter_px / ds / 2)))
        if core.status == "empty":
            cv2.circle(image, centre, r, (150, 150, 150), thin)
            cv2.drawMarker(image, centre, (150, 150, 150), cv2.MARKER_TILTED_CROSS, r, thin)
            continue
        if core.status == "orientation":
            cv2.circle(image, centre, r, (220, 0, 220), 2 * thin)
            label(f"O{core.column}", centre, (220, 0, 220))
            continue
        colour = (0, 160, 0) if core.confidence >= 0.5 else (230, 180, 0)
        cv2.circle(image, centre, r, colour, 2 * thin)
        text = str(core.core_index) if core.core_index is not None else f"{core.row}-{core.column}"
        label(text, centre, (0, 0, 200))
    return image

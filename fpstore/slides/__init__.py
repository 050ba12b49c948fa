"""Slides: readers and mpp, tissue masks, patch grids, TMA dearraying, previews, the patch cache."""

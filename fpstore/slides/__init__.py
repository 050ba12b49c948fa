"""Slides: readers, tissue masks, patch grids, TMA dearraying, stain operations, previews,
the patch cache."""

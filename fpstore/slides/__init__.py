"""Slides: readers and mpp, tissue masks (pen and ink removed), patch grids, TMA dearraying,
stain operations, previews, the patch cache."""

"""The report's colours, shared by the slide heatmaps and their GeoJSON overlays."""

# RGB per tissue type; the paper's maps show epithelium in green.
TISSUE_COLORS = {
    "background": (225, 225, 225),
    "epithelium": (40, 170, 60),
    "stroma": (230, 120, 170),
    "fat": (245, 215, 70),
}
UNKNOWN_TISSUE = (120, 120, 120)  # a patch with a score but no tissue row
NO_DATA = (35, 65, 130)  # dark blue: outside every patch (not a grey level)
TISSUE_NO_DATA = (255, 255, 255)

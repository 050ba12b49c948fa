"""Synthetic H&E cohorts: whole-slide images, tissue microarrays, clinical tables, truth.

``synthesize(preset, out)`` writes the layout described in docs/ARCHITECTURE.md;
``PRESETS`` lists the sizes (small, demo, paper).
"""

from fpstore.synth.api import SynthSummary, synthesize
from fpstore.synth.presets import PRESETS, SynthPreset, get_preset

__all__ = ["PRESETS", "SynthPreset", "SynthSummary", "get_preset", "synthesize"]

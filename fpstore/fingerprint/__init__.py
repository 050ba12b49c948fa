"""Training the fingerprint network: training sources, stain invariance, the matching game,
core maps. The network's architecture and checkpoints live in ``fpstore.encoders``."""

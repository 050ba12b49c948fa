"""fpstore: deep-learned tissue fingerprints for H&E whole-slide images.

Importing the package has no side effects and imports no heavy dependency; the
subpackages (extract, store, classify, ...) are imported where they are used.
"""

__version__ = "0.1.0"

"""The store: Arrow schemas, atomic writers, the DuckDB FeatureStore, similarity search."""

from fpstore.store.featurestore import FeatureStore, open

__all__ = ["FeatureStore", "open"]

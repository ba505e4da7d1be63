"""Feature bags on disk: TRIDENT and CLAM layouts."""

from wsimil.features.store import Bag, FeatureStore, write_bag

__all__ = ["Bag", "FeatureStore", "write_bag"]

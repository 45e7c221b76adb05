"""mt: multi-head k-fold training for product labels (see README.md)."""
import os

# albumentations otherwise asks the network for a newer version at import, which hangs offline
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

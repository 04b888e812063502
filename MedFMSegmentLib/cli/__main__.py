"""``python -m MedFMSegmentLib.cli``: the ``medfmsegment`` command."""

from .main import entry_point

if __name__ == "__main__":
    entry_point()

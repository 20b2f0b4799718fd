"""bake: build, publish and verify cloud images for Eucalyptus/UEC and EC2-compatible clouds."""

from pathlib import Path

BUILTIN_ELEMENTS = Path(__file__).resolve().parent / "elements"

"""bake: build, publish and verify cloud images for Eucalyptus/UEC and EC2-compatible clouds."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_ELEMENTS = PROJECT_ROOT / "elements"

"""A recipe: its JSON Schema and errors, distro profiles, elements and diskimage-builder's elements."""

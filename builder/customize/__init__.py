"""Customizing an image's root tree (see chroot for writing into one from the build host)."""

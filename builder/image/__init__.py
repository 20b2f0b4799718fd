"""The image: a bare filesystem made from a root tree, and the kernel and ramdisk that boot it."""

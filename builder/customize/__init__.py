"""Customizing an image's root: the operations a recipe asks for, written once.

`customizer.Customizer` holds them (element hooks, the guard that keeps services from
starting, static files, users, files, commands, notes) over a `backend.Backend`, a
handful of verbs on the root: run a command in it, read, write, make, copy in, look,
remove. Two backends:

- `chroot.ChrootBackend`: a tree on the build host (debootstrapped or unpacked), entered
  with chroot(8); every path is resolved inside the tree, never through the host's.
  `tree.TreeCustomizer` adds what only that route does: packages, diskimage-builder's
  elements, the initramfs.
- `guestfs.GuestfsBackend`: a filesystem image changed in place inside libguestfs's
  appliance, without root (`base.method: guestfs`); `inplace.apply` runs it.
"""

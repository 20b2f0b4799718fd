"""The core: running processes, mounts, lifetimes and cleanup, locks, events, errors,
build records and the stage cache. Imports nothing of bake above it."""

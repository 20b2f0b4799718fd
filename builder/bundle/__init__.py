"""The EC2/Eucalyptus bundle format (manifest version 2007-10-10).

- `writer.bundle_image(image, destination, ...)`: image → tar → gzip → AES-128-CBC →
  10 MiB parts and a signed manifest, streamed in constant memory → `BundleResult`.
- `reader.unbundle(manifest, private_key=..., source_dir=..., destination=...)`: checks
  signature, parts, digests and size, and writes the image back.
- `manifest`: the only module that knows the manifest's XML (`parse`, `render`).
- `keys.resolve_keys`: which certificates, key and account to bundle with.
- `cli`: `bake bundle` and `bake unbundle`.

The choices made (ec2-ami-tools' manifest form, euca2ools' `.part.NN` names and gzip
level 6, one regular tar member even for sparse images) are explained where they are made.
"""

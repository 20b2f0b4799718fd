"""The cloud: credentials (eucarc, environment, recipe), the boto3 clients set up for
Eucalyptus 3.x/4.x, and publishing a build's bundles (upload, register, unpublish).
The only package that imports boto3."""

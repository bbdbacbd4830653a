"""The S3 server fixtures (tests/s3server.py) for training from an object store."""

from s3server import s3_server, s3_uri  # noqa: F401  (fixtures, registered by import)

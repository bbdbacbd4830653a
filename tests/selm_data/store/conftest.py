"""The S3 server fixtures (tests/s3server.py) for the store's tests."""

from s3server import proxy, s3_server, s3_uri  # noqa: F401  (fixtures, registered by import)

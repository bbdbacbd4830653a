"""The one exception type users see.

Every error a user can cause (a bad manifest, a store in use, a malformed batch) raises a
`SelmError` whose message names the file, field or holder and says what to do next. Internal
invariants use `assert`; causes are chained with `raise ... from e`.
"""


class SelmError(Exception):
    """A problem the user can fix; the message says how."""


class ManifestError(SelmError):
    """The manifest file cannot be read or does not validate."""


class StoreError(SelmError):
    """The store cannot be opened, or a batch cannot be written as given."""


class LeaseHeldError(StoreError):
    """Another live process holds the work this process tried to claim."""

"""The store: ten Delta Lake tables with content-derived ids (schema), the Store that appends to
and scans them (store) and leases for concurrent builders (leases). The bottom room.
May import: errors only (`selm_data.verify`, above every room, checks the whole store).
"""

from selm_data.store.store import MARKER, RunInfo, Store, open_store, package_version

__all__ = ["MARKER", "RunInfo", "Store", "open_store", "package_version"]

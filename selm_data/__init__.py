"""selm_data: the preference data of online iterative alignment, in a versioned Delta Lake store.

    import selm_data
    store = selm_data.open_store("runs/demo/store")
    pairs = store.scan("pairs").filter(pl.col("iteration") == 2).collect()
"""

from selm_data.errors import LeaseHeldError, ManifestError, SelmError, StoreError
from selm_data.manifest import Manifest, load_manifest
from selm_data.store.schema import TABLES, content_id, row_id
from selm_data.store.store import RunInfo, Store, open_store, package_version
from selm_data.verify import verify

__version__ = package_version()

__all__ = [
    "TABLES",
    "LeaseHeldError",
    "Manifest",
    "ManifestError",
    "RunInfo",
    "SelmError",
    "Store",
    "StoreError",
    "__version__",
    "content_id",
    "load_manifest",
    "open_store",
    "row_id",
    "verify",
]

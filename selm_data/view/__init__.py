"""`selm-data view`: a local, read-only web viewer of the store. Queries (queries) are lazy
polars scans that filter and slice before they collect; the Starlette app (app) renders them
with autoescaping Jinja2 templates and markdown with raw HTML off (render).
May import every lower room: errors, store, manifest, sources, generation, rankers, builder,
publish, evaluate, verify.
"""

"""A synthetic alignment testbed with a known true reward (see README.md here).

Run it with `python bench/testbed/run.py [--quick]`; nothing in selm imports it.
"""

"""What the tests and the benchmarks share: the Hermes fixture and a throwaway PostgreSQL.

Not part of the distribution: imported from the repository root (pytest's
rootdir, or the working directory of ``python -m bench``).
"""

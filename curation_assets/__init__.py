"""curation_assets: image-data curation as Dagster software-defined assets."""

import os

# numpy asks the kernel for transparent huge pages on every large array (madvise). Where THP is
# in "madvise" mode with direct defragmentation (a common default, and this project's CI), each
# first touch then stalls on compaction: measured, a fresh 400 MB float32 array took 1.3 s to
# fill against 0.25 s without the advice, ~1 s of every 200k-vector near-duplicate run. Turned
# off here unless NUMPY_MADVISE_HUGEPAGE says otherwise (numpy's own switch, read at its import).
if "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
    from numpy._core import multiarray as _multiarray

    _multiarray._set_madvise_hugepage(False)

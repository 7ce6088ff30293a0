"""Reading files: formats, decoding, sanitizing, inventory, shards.

Every decode path (sanitize, embedding workers, quality, report thumbnails) imports a module
of this package first, so the optional readers (HEIC/HEIF, AVIF: the `formats` extra) are
registered with Pillow here, once per process: a worker reads what its parent reads.
"""

from curation_assets.core.ingest.formats import register_optional_readers

register_optional_readers()

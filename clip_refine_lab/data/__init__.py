"""Data sets as manifests: a small YAML file per data set, read into the same caption and
classification records whatever the files on disk look like. :mod:`.manifest` holds the manifest
and record types and the reader registry; :mod:`.formats` what each format needs, with the readers
in :mod:`.readers`, :mod:`.imagefolder` and :mod:`.webdataset`; :mod:`.images` opens record images
(files or tar-shard members) and :mod:`.datasets` wraps records as torch datasets; :mod:`.check`
validates a manifest and its images, :mod:`.leakage` finds evaluation images inside a training set,
and :mod:`.filtering` keeps the best CLIP-scored pairs of a caption set. Callers import those
modules directly.
"""

# Importing the reader modules registers their formats with manifest.register_reader, so any
# manifest, whichever module loads it, finds its reader.
from . import imagefolder, readers, webdataset  # noqa: F401

"""Open-vocabulary region search over a collection: index the regions of ``regionclip extract-regions`` and
query them with text, an image region or an embedding (docs/SEARCH.md).

    from regionclip.search import RegionIndex
    index = RegionIndex.build("feats/", "index/", backend="faiss")     # incremental on re-runs
    hits = RegionIndex.open("index/").search(query_vec, top_k=50)      # query_vec: [D]
"""
from .backends import BACKENDS, FaissOptions
from .index import Hit, RegionIndex

__all__ = ["BACKENDS", "FaissOptions", "Hit", "RegionIndex"]

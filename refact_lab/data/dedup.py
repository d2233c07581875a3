"""Near-duplicate detection with MinHash LSH (datasketch), the optional companion of the exact-hash check.

Files are compared as sets of 5-word shingles (sequences of five identifier/number tokens), the usual unit
for code dedup: it ignores whitespace and punctuation changes but sees reordered or edited blocks. LSH
finds candidates in constant time per file; each candidate is then confirmed with the estimated Jaccard
similarity so the threshold means what it says. The first file (in scan order) of a near-duplicate group
is kept.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(rb"\w+")
SHINGLE = 5
NUM_PERM = 128


def shingles(data: bytes) -> set[bytes]:
    tokens = _TOKEN.findall(data)
    if len(tokens) < SHINGLE:
        return {b" ".join(tokens)} if tokens else set()
    return {b" ".join(tokens[i:i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1)}


class NearDupIndex:
    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sketches: dict[str, object] = {}

    def sketch(self, data: bytes):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        sh = shingles(data)
        if not sh:
            return None
        m.update_batch(list(sh))
        return m

    def check_and_add(self, key: str, sketch) -> tuple[str, float] | None:
        """(key of an earlier similar file, similarity) — or None, and then this file joins the index."""
        if sketch is None:
            return None
        best = None
        for other in self.lsh.query(sketch):
            sim = self.sketches[other].jaccard(sketch)
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (other, sim)
        if best is None:
            self.lsh.insert(key, sketch)
            self.sketches[key] = sketch
        return best

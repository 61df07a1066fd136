"""Exact and near-duplicate text detection (train/test leakage, repeated records).

Text is normalised (lower case, whitespace runs -> one space; punctuation stays, it is most of
q) and compared as sets of character 5-grams by Jaccard similarity. Shingles found in more than
10% of the distinct texts compared (when there are 20 or more) are dropped first: they are a prompt
template's boilerplate ("Translate this q function into..."), which would otherwise make two
short, different snippets under the same template look alike. Candidate pairs come from prefix
filtering (Chaudhuri et al., "A primitive operator for similarity joins", ICDE 2006): with
shingles in a global rarest-first order, two sets with Jaccard >= t must share one of the first
|s| - ceil(t*|s|) + 1 shingles of each, so only those rare prefixes are indexed: the same pairs
as comparing every pair of (filtered) sets, and thousands of records take seconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping

SHINGLE = 5
THRESHOLD = 0.8  # Jaccard at or above this counts as a near duplicate
BOILERPLATE_SHARE = 0.1  # shingles in more texts than this share are template, not content


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def shingles(text: str, n: int = SHINGLE) -> frozenset[str]:
    t = normalise(text)
    return frozenset({t} if len(t) <= n else (t[i : i + n] for i in range(len(t) - n + 1)))


def near_duplicate_pairs(
    a: Mapping[Hashable, str], b: Mapping[Hashable, str], threshold: float = THRESHOLD
) -> list[tuple[Hashable, Hashable, float]]:
    """(key in a, key in b, Jaccard) for every pair at or above `threshold`, best first.

    Passing the same mapping twice finds duplicates within one set; a key is never paired with
    itself, and both orders of a pair are returned. Identical normalised texts always pair
    (score 1.0); otherwise the score is over the shingle sets after boilerplate removal, and
    the pairs are exactly those a comparison of every pair of those sets would find.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    same = a is b
    na = {k: normalise(v) for k, v in a.items()}
    nb = na if same else {k: normalise(v) for k, v in b.items()}
    # Identical texts first: always a pair (score 1), whatever the boilerplate filter leaves.
    by_text: dict[str, list[Hashable]] = defaultdict(list)
    for k, t in nb.items():
        by_text[t].append(k)
    pairs = [
        (ka, kb, 1.0)
        for ka, t in na.items()
        for kb in by_text.get(t, ())
        if not (same and kb == ka)
    ]
    exact = {(ka, kb) for ka, kb, _ in pairs}
    sa = {k: shingles(t) for k, t in na.items()}
    sb = sa if same else {k: shingles(t) for k, t in nb.items()}
    # Shingle frequency over distinct texts: copies of one text must not make it "boilerplate".
    distinct = {t: s for t, s in zip(na.values(), sa.values(), strict=True)}
    if not same:
        distinct.update(zip(nb.values(), sb.values(), strict=True))
    freq = Counter(g for s in distinct.values() for g in s)
    n_texts = len(distinct)
    # Below ~20 texts "common" is noise (three texts sharing a phrase would erase it).
    common = (
        {g for g, n in freq.items() if n > BOILERPLATE_SHARE * n_texts}
        if (n_texts >= 20)
        else set()
    )
    if common:
        sa = {k: s - common for k, s in sa.items()}
        sb = sa if same else {k: s - common for k, s in sb.items()}

    def prefix(s: frozenset[str]) -> list[str]:
        keep = len(s) - math.ceil(threshold * len(s)) + 1
        return sorted(s, key=lambda g: (freq[g], g))[:keep]

    index: dict[str, list[Hashable]] = defaultdict(list)
    for k, s in sb.items():
        for g in prefix(s) if s else ():
            index[g].append(k)
    for ka, s in sa.items():
        if not s:
            continue  # nothing but boilerplate: no content to compare
        for kb in {kb for g in prefix(s) for kb in index.get(g, ())}:
            if (same and kb == ka) or (ka, kb) in exact:
                continue
            inter = len(s & sb[kb])
            score = inter / (len(s) + len(sb[kb]) - inter)
            if score >= threshold:
                pairs.append((ka, kb, score))
    return sorted(pairs, key=lambda p: (-p[2], str(p[0]), str(p[1])))

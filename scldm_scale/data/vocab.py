"""A model's gene vocabulary, and the one way an input's genes are matched to it.

The vocabulary is the ordered list of gene ids a model was trained on (Ensembl `feature_id` where the data
has them) with their names (symbols, `feature_name`) when known; gene j of the model is `ids[j]`.

Matching (`align_genes`; `align_var` for an AnnData's var):
- by id first; only when none of the input's ids is in the vocabulary (an input keyed by symbol, say), by
  name: the input's names (else its ids taken as names) against the vocabulary's names. A name that several
  vocabulary genes share is ambiguous and matches none of them;
- a vocabulary gene takes at most one input column, the first that matches (later ones are extra);
- no match at all is an error that shows both sides' genes. Everything else is the caller's call: the
  alignment lists the input columns in vocabulary order with their vocabulary positions, the vocabulary
  genes the input lacks (`missing`) and the input genes outside the vocabulary (`extra`). Training refuses
  missing genes (`require_complete`), `embed` may encode without them, the SOMA loader decodes the genes
  present.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scldm_scale.data.counts import DataError

log = logging.getLogger(__name__)

# var columns that hold gene ids (tried beside var_names) and gene names (symbols), in order of preference.
GENE_ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id")
GENE_NAME_COLUMNS = ("feature_name", "gene_symbols", "gene_name")


@dataclass
class GeneVocabulary:
    """Gene ids in model order (unique) and, when known, their names (same length)."""

    ids: list[str]
    names: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = [str(g) for g in self.ids]
        if self.names is not None:
            self.names = [str(n) for n in self.names]
            if len(self.names) != len(self.ids):
                raise DataError(f"a gene vocabulary has {len(self.ids)} ids but {len(self.names)} names")
        if len(set(self.ids)) != len(self.ids):
            dup = pd.Index(self.ids)
            raise DataError(
                f"duplicate gene ids, e.g. {dup[dup.duplicated()].unique().tolist()[:5]}; make them unique first"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, genes: GeneVocabulary | Sequence[str]) -> GeneVocabulary:
        """A vocabulary as is, or one made of gene ids alone."""
        return genes if isinstance(genes, GeneVocabulary) else cls(list(genes))

    @classmethod
    def from_var(cls, var: pd.DataFrame) -> GeneVocabulary:
        """An AnnData's genes: var_names as ids, the first of GENE_NAME_COLUMNS as names."""
        name_column = _name_column(var)
        names = var[name_column].astype(str).tolist() if name_column else None
        return cls(var.index.astype(str).tolist(), names)

    def to_dict(self) -> dict:
        """JSON-serialisable: {"ids": [str, ...], "names": [str, ...] or None}."""
        return {"ids": list(self.ids), "names": None if self.names is None else list(self.names)}

    @classmethod
    def from_dict(cls, state: Mapping) -> GeneVocabulary:
        if "ids" not in state:
            raise DataError(f"a gene vocabulary needs 'ids' (and optionally 'names'); got keys {sorted(state)}")
        return cls(state["ids"], state.get("names"))


class MissingGenesError(DataError):
    """Vocabulary genes an input lacks; `missing` lists their ids."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True, eq=False)
class GeneAlignment:
    columns: np.ndarray  # (G_present,) int64, the input columns matched, in vocabulary order
    positions: np.ndarray  # (G_present,) int64, their vocabulary positions, ascending
    missing: list[str]  # vocabulary ids the input lacks, in vocabulary order
    extra: list[str]  # input ids outside the vocabulary, in input order
    n_vocabulary: int
    matched_by: str  # "id" or "name"

    def require_complete(self, where: str, fix: str) -> None:
        """Refuse an input that lacks vocabulary genes, naming them and `fix`."""
        if self.missing:
            raise MissingGenesError(
                f"{where}: {len(self.missing)} of the model's {self.n_vocabulary} genes are missing from the data, "
                f"e.g. {self.missing[:5]}; {fix}",
                self.missing,
            )


def align_genes(
    ids: Sequence[str] | np.ndarray,
    vocabulary: GeneVocabulary | Sequence[str],
    names: Sequence[str] | np.ndarray | None = None,
    where: str = "the data",
    against: str = "the model's vocabulary",
) -> GeneAlignment:
    """Match an input's genes (its ids, and names when known) to a vocabulary; see the module docstring.

    `where` names the input and `against` the vocabulary in the error when nothing matches.
    """
    vocabulary = GeneVocabulary.of(vocabulary)
    ids = np.asarray(ids).astype(str)
    position = _first_positions(ids, {g: i for i, g in enumerate(vocabulary.ids)})
    matched_by = "id"
    if (position < 0).all() and vocabulary.names is not None:
        shared = Counter(vocabulary.names)
        by_name = {n: i for i, n in enumerate(vocabulary.names) if shared[n] == 1}
        keys = ids if names is None else np.asarray(names).astype(str)
        position = _first_positions(keys, by_name)
        matched_by = "name"
    if (position < 0).all():
        tried = "id, then by name" if matched_by == "name" else "id"
        raise DataError(
            f"{where}: none of its genes are in {against} (matched by {tried}): it has e.g. {ids[:3].tolist()}, "
            f"{against} has e.g. {vocabulary.ids[:3]}; name the genes by the same ids on both sides (e.g. Ensembl "
            "feature_id), as var_names or in a feature_id column"
        )
    present = np.flatnonzero(position >= 0)
    columns = present[np.argsort(position[present], kind="stable")]
    found = np.zeros(len(vocabulary), dtype=bool)
    found[position[columns]] = True
    return GeneAlignment(
        columns=columns,
        positions=position[columns],
        missing=[vocabulary.ids[i] for i in np.flatnonzero(~found)],
        extra=ids[position < 0].tolist(),
        n_vocabulary=len(vocabulary),
        matched_by=matched_by,
    )


def align_var(
    var: pd.DataFrame,
    vocabulary: GeneVocabulary | Sequence[str],
    where: str = "the data",
    against: str = "the model's vocabulary",
) -> GeneAlignment:
    """align_genes for an AnnData's var: the ids are var_names or the GENE_ID_COLUMNS column with the most
    vocabulary ids (var_names on a tie), the names the first of GENE_NAME_COLUMNS."""
    vocabulary = GeneVocabulary.of(vocabulary)
    known = set(vocabulary.ids)
    candidates = [("var_names", var.index.astype(str).to_numpy())]
    candidates += [(c, var[c].astype(str).to_numpy()) for c in GENE_ID_COLUMNS if c in var]
    hits = [sum(g in known for g in ids) for _, ids in candidates]
    id_column, ids = candidates[int(np.argmax(hits))]
    if id_column != "var_names":
        log.info("%s: matching genes by var[%r]", where, id_column)
    name_column = _name_column(var)
    names = var[name_column].astype(str).to_numpy() if name_column else None
    return align_genes(ids, vocabulary, names, where, against)


def _name_column(var: pd.DataFrame) -> str | None:
    return next((c for c in GENE_NAME_COLUMNS if c in var), None)


def _first_positions(keys: np.ndarray, position_of: dict[str, int]) -> np.ndarray:
    """(len(keys),) int64: each key's vocabulary position, -1 when unknown or taken by an earlier key."""
    out = np.full(len(keys), -1, dtype=np.int64)
    taken: set[int] = set()
    for j, key in enumerate(keys.tolist()):
        i = position_of.get(key)
        if i is not None and i not in taken:
            taken.add(i)
            out[j] = i
    return out

"""The gene vocabulary and the one gene alignment: by id, by name when no id matches, missing and extra
genes, reordering, and the errors."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from scldm_scale.config import DataConfig
from scldm_scale.data.counts import DataError
from scldm_scale.data.source import open_train_cells
from scldm_scale.data.vocab import GeneVocabulary, MissingGenesError, align_genes, align_var

VOCAB = GeneVocabulary(
    ids=["ENSG01", "ENSG02", "ENSG03", "ENSG04", "ENSG05"], names=["CD3E", "CD4", "CD8A", "MS4A1", "NKG7"]
)


# --- GeneVocabulary ------------------------------------------------------------------------------------


def test_vocabulary_round_trips_through_json():
    state = json.loads(json.dumps(VOCAB.to_dict()))
    assert state == {"ids": VOCAB.ids, "names": VOCAB.names}
    assert GeneVocabulary.from_dict(state) == VOCAB
    ids_only = GeneVocabulary(["a", "b"])
    assert GeneVocabulary.from_dict(json.loads(json.dumps(ids_only.to_dict()))) == ids_only
    assert GeneVocabulary.of(["a", "b"]) == ids_only and GeneVocabulary.of(VOCAB) is VOCAB
    assert len(VOCAB) == 5


def test_vocabulary_from_var_takes_var_names_and_the_name_column():
    var = pd.DataFrame({"gene_symbols": ["X", "Y"]}, index=pd.Index(["g1", "g2"]))
    assert GeneVocabulary.from_var(var) == GeneVocabulary(["g1", "g2"], ["X", "Y"])
    assert GeneVocabulary.from_var(pd.DataFrame(index=["g1"])).names is None


def test_a_bad_vocabulary_is_refused():
    with pytest.raises(DataError, match=r"duplicate gene ids, e\.g\. \['a'\]"):
        GeneVocabulary(["a", "b", "a"])
    with pytest.raises(DataError, match="2 ids but 1 names"):
        GeneVocabulary(["a", "b"], ["A"])
    with pytest.raises(DataError, match="needs 'ids'"):
        GeneVocabulary.from_dict({"genes": ["a"]})


# --- align_genes -----------------------------------------------------------------------------------------


def test_ids_match_in_any_order_with_missing_and_extra_genes():
    ids = ["ENSG05", "OTHER1", "ENSG02", "ENSG01", "OTHER2"]  # ENSG03 and ENSG04 are missing
    alignment = align_genes(ids, VOCAB)
    assert alignment.matched_by == "id"
    assert alignment.positions.tolist() == [0, 1, 4]  # vocabulary order
    assert alignment.columns.tolist() == [3, 2, 0]  # the input column of each
    assert alignment.missing == ["ENSG03", "ENSG04"]
    assert alignment.extra == ["OTHER1", "OTHER2"]
    assert alignment.n_vocabulary == 5


def test_names_are_matched_when_no_id_is_in_the_vocabulary():
    # Symbols as the input's ids (no name column): they are taken as names.
    by_symbol = align_genes(["NKG7", "CD4", "CD3E", "FOO"], VOCAB)
    assert by_symbol.matched_by == "name"
    assert by_symbol.columns.tolist() == [2, 1, 0] and by_symbol.positions.tolist() == [0, 1, 4]
    assert by_symbol.missing == ["ENSG03", "ENSG04"] and by_symbol.extra == ["FOO"]
    # Other ids (another annotation release, say) with a name column.
    by_name_column = align_genes(["v2_1", "v2_2"], VOCAB, names=["MS4A1", "CD8A"])
    assert by_name_column.matched_by == "name"
    assert by_name_column.positions.tolist() == [2, 3] and by_name_column.columns.tolist() == [1, 0]


def test_ids_win_over_names_when_any_id_matches():
    alignment = align_genes(["ENSG01", "CD4"], VOCAB)  # CD4 is a name, but an id matched: no fallback
    assert alignment.matched_by == "id"
    assert alignment.positions.tolist() == [0] and alignment.extra == ["CD4"]


def test_an_ambiguous_name_or_a_repeated_input_gene_matches_once_at_most():
    shared_symbol = GeneVocabulary(["e1", "e2", "e3"], ["A", "A", "B"])
    alignment = align_genes(["A", "B"], shared_symbol)
    assert alignment.positions.tolist() == [2] and alignment.missing == ["e1", "e2"] and alignment.extra == ["A"]
    repeated = align_genes(["ENSG02", "ENSG02", "ENSG01"], VOCAB)
    assert repeated.columns.tolist() == [2, 0] and repeated.extra == ["ENSG02"]


def test_no_shared_gene_is_an_error_showing_both_sides():
    with pytest.raises(DataError) as err:
        align_genes(["x1", "x2"], VOCAB, where="cells.h5ad")
    message = str(err.value)
    assert message.startswith("cells.h5ad: none of its genes are in the model's vocabulary (matched by id, then by")
    assert "['x1', 'x2']" in message and "['ENSG01', 'ENSG02', 'ENSG03']" in message and "feature_id" in message
    with pytest.raises(DataError, match=r"none of its genes are in the real cells' genes \(matched by id\)"):
        align_genes(["x1"], ["a", "b"], against="the real cells' genes")


def test_require_complete_names_the_missing_genes_and_the_fix():
    complete = align_genes(list(reversed(VOCAB.ids)), VOCAB)
    complete.require_complete("x.h5ad", "add them")
    assert complete.columns.tolist() == [4, 3, 2, 1, 0]
    partial = align_genes(["ENSG01", "ENSG03", "ENSG05"], VOCAB)
    with pytest.raises(MissingGenesError) as err:
        partial.require_complete("x.h5ad", "add them as zero columns")
    assert str(err.value) == (
        "x.h5ad: 2 of the model's 5 genes are missing from the data, e.g. ['ENSG02', 'ENSG04']; "
        "add them as zero columns"
    )
    assert err.value.missing == ["ENSG02", "ENSG04"] and isinstance(err.value, DataError)


# --- align_var -------------------------------------------------------------------------------------------


def test_align_var_takes_the_id_column_with_the_most_vocabulary_genes():
    var = pd.DataFrame(
        {"gene_ids": ["ENSG03", "ENSG01", "ENSG02"], "feature_id": ["ENSG03", "nope", "nope2"]},
        index=["CD8A", "CD3E", "CD4"],
    )
    alignment = align_var(var, VOCAB)
    assert alignment.matched_by == "id" and alignment.columns.tolist() == [1, 2, 0]
    # No id column matches: the name column (else var_names) is matched against the names.
    named = pd.DataFrame({"feature_name": ["NKG7", "CD3E"]}, index=["r1", "r2"])
    assert align_var(named, VOCAB).positions.tolist() == [0, 4]
    symbols = pd.DataFrame(index=["CD4", "MS4A1"])
    assert align_var(symbols, VOCAB).positions.tolist() == [1, 3]


def test_align_var_prefers_var_names_on_a_tie():
    var = pd.DataFrame({"gene_id": ["ENSG02", "ENSG01"]}, index=["ENSG01", "ENSG02"])
    assert align_var(var, VOCAB).columns.tolist() == [0, 1]
    np.testing.assert_array_equal(align_var(var, VOCAB.ids).positions, [0, 1])


def test_soma_training_on_a_model_vocabulary_lacking_genes_is_refused_unless_allowed(soma_experiment, caplog):
    exp = soma_experiment
    vocabulary = ["absent_0", *exp.gene_ids[::-1], "absent_1"]  # missing genes, and another order
    cfg = DataConfig(source="soma", uri=exp.uri, condition_keys=["cell_type"])
    with pytest.raises(MissingGenesError, match=r"2 genes of the model's vocabulary.*data.allow_missing_genes=true"):
        open_train_cells(cfg, batch_size=16, seed=0, vocabulary=vocabulary)
    cfg.allow_missing_genes = True
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.source"):
        cells = open_train_cells(cfg, batch_size=16, seed=0, vocabulary=vocabulary)
    assert "2 of the model's 43 genes are missing from the data: absent tokens" in caplog.text
    batch = next(iter(cells.ordered()))
    # Columns are the present genes at their model positions (1..41, reversed data order).
    np.testing.assert_array_equal(batch.decode_gene_ids.numpy(), np.arange(1, 42))
    train = exp.counts[exp.split == "train"][: len(batch.target)]
    np.testing.assert_array_equal(batch.target.numpy(), train[:, ::-1])

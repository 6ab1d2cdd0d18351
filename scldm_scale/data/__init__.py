"""Cells in: reading, validating and batching raw counts behind one `CellBatch` interface.

Modules, one idea each, importing only from those above them in this list:
- synthetic.py: synthetic cells with a known answer: perturbations, and whole transcriptomes (30k+ genes,
  `scldm-scale synthetic`);
- counts.py: reading count files and the built-in datasets, validating counts (`DataError`);
- vocab.py: a model's gene vocabulary (ids and names) and the one alignment of an input's genes to it;
- genes.py: which genes to keep (`all`, `hvg:N` by scanpy's seurat_v3 on raw counts, or a file of ids);
- split.py: the train / val / test split, stratified by a label;
- holdout.py: condition combinations held out of training;
- batch.py: `CellBatch`, the encoder's `TokenPolicy`, `collate`, the condition `LabelEncoder`, and the
  decoded-gene subsets of `model.decode_genes`;
- prepare.py: `scldm-scale prepare`, any input -> a TileDB-SOMA experiment;
- dataset.py: an AnnData in memory (`CellDataset`) and the shuffled, rank-sharded batch stream over it;
- soma.py: the streaming loader of SOMA experiments and the CELLxGENE Census;
- census.py: the Census collection layout, and `scldm-scale synthetic-census` (a Census-shaped experiment);
- source.py: `open_train_cells`, from a DataConfig to the training cells of any source.
The process's rank and world size, by which the loaders shard, come from `scldm_scale.world`.
"""

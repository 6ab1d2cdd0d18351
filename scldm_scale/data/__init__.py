"""Cells in: reading, validating and batching raw counts behind one `CellBatch` interface.

Modules, one idea each, importing only from those above them in this list:
- synthetic.py: synthetic perturbation cells with a known answer (a built-in dataset);
- counts.py: reading count files and the built-in datasets, validating counts (`DataError`);
- vocab.py: a model's gene vocabulary (ids and names) and the one alignment of an input's genes to it;
- split.py: the train / val / test split, stratified by a label;
- holdout.py: condition combinations held out of training;
- batch.py: `CellBatch`, the encoder's `TokenPolicy`, `collate`, the condition `LabelEncoder`;
- prepare.py: `scldm-scale prepare`, any input -> a TileDB-SOMA experiment;
- dataset.py: an AnnData in memory (`CellDataset`) and the shuffled, rank-sharded batch stream over it;
- soma.py: the streaming loader of SOMA experiments and the CELLxGENE Census;
- source.py: `open_train_cells`, from a DataConfig to the training cells of any source.
The process's rank and world size, by which the loaders shard, come from `scldm_scale.world`.
"""

"""`train.init_from`: a VAE that starts from a trained model's weights, on data with another gene vocabulary.

The new model's vocabulary is the new data's. The trained model (a vae artifact, or the VAE of an ldm one) gives:
- every weight that does not depend on the genes, as it is;
- of the per-gene weights (those whose first dimension is the gene count: the gene embeddings, the head's
  per-gene logit offset and inverse dispersion, ...), the rows of the genes both vocabularies hold, matched as
  `data.vocab` matches genes (by id, else by name). The new data's other genes keep their fresh initialisation.
The per-gene weights are found by building the model on the meta device with two gene counts and seeing
which shapes change, so a parameter added to the model later is handled without a list kept here.
The architecture must be the trained model's: every model.* setting but those that compute the same function
another way or only weight the loss (`SAME_FUNCTION`).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import torch

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError
from scldm_scale.config import VAEConfig
from scldm_scale.data.vocab import GeneAlignment, GeneVocabulary, align_genes
from scldm_scale.models.vae import SetVAE

log = logging.getLogger(__name__)

# model.* settings a fine-tuned model may change: kernel backends, the chunking of the decoder and the genes
# a step decodes (the same function computed another way), and the weight of the KL term (the loss).
SAME_FUNCTION = (
    "attention_backend",
    "nb_loss_backend",
    "fold_pooling",
    "decode_genes",
    "decode_chunk_genes",
    "kl_weight",
)


def per_gene_parameters(cfg: VAEConfig) -> set[str]:
    """State-dict names of a SetVAE whose first dimension is the number of genes."""
    with torch.device("meta"):
        two, three = SetVAE(cfg, 2).state_dict(), SetVAE(cfg, 3).state_dict()
    return {name for name, tensor in two.items() if tensor.shape != three[name].shape}


def _architecture_differences(trained: VAEConfig, new: VAEConfig) -> list[str]:
    return [
        f"model.{f.name}={getattr(new, f.name)!r} (the model has {getattr(trained, f.name)!r})"
        for f in fields(VAEConfig)
        if f.name not in SAME_FUNCTION and getattr(trained, f.name) != getattr(new, f.name)
    ]


@torch.no_grad()
def init_from(vae: SetVAE, genes: GeneVocabulary, source: str | Path) -> GeneAlignment:
    """Copy a trained model's weights into `vae` (built for the vocabulary `genes`); return how the new genes
    matched the trained model's (columns: new genes, positions: their rows in the trained model)."""
    trained = artifact.load(source).vae
    differences = _architecture_differences(trained.config, vae.cfg)
    if differences:
        raise CheckpointError(
            f"train.init_from={source}: the architecture differs: {'; '.join(differences)}. Fine-tuning copies "
            "the weights, so set model.* as the model has them (its config.json), or drop train.init_from"
        )
    alignment = align_genes(genes.ids, trained.genes, genes.names, "the new data", f"the genes of {source}")
    new_rows = torch.from_numpy(alignment.columns)
    old_rows = torch.from_numpy(alignment.positions)
    per_gene = per_gene_parameters(vae.cfg)
    old_state = trained.build_vae("cpu").state_dict()
    for name, tensor in vae.state_dict().items():  # tensors share the parameters' storage: copies land in vae
        old = old_state[name].to(tensor.dtype)
        if name in per_gene:
            tensor[new_rows.to(tensor.device)] = old[old_rows].to(tensor.device)
        else:
            tensor.copy_(old)
    log.info(
        "train.init_from %s: %d of the %d genes copied from the model (matched by %s), %d new genes initialised "
        "afresh; %d of the model's %d genes are not in the new data",
        source,
        len(alignment.columns),
        len(genes),
        alignment.matched_by,
        len(genes) - len(alignment.columns),
        len(alignment.missing),
        len(trained.genes),
    )
    return alignment

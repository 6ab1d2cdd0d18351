"""Set VAE over gene tokens: MCAB pooling encoder, MCAB unpooling decoder, NB (or Gaussian) head.

Unusual here:
- A cell is the *set* of its expressed genes; tokens carry no position, so the encoder is invariant
  and the decoder equivariant under gene permutations, and any subset of the vocabulary can be decoded.
- The encoder takes a key padding mask (True = real token) so padding never changes the latent.
- Two latent modes: "layernorm" (deterministic, LayerNorm without affine, KL weight 0 — what the
  reference trains) and "gaussian" (reparameterised diagonal Gaussian per token, KL to N(0, I)).
- The decoder's gene queries are gene-id embeddings (optionally the encoder's table); they depend only
  on the gene, so they enter the cross-attention with batch size 1 and are projected once.
- The model reports its own cost: `transformer_blocks()` (the units of FSDP sharding, activation
  checkpointing and compile), `forward_flops` and `activation_profile` per cell (conventions in cost.py).
"""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.config import VAEConfig
from scldm_scale.models.cost import ActivationProfile, linear_flops
from scldm_scale.models.likelihoods import GaussianHead, NegativeBinomialHead
from scldm_scale.models.mcab import MCAB, SelfAttentionBlock


class GeneTokenEmbedding(nn.Module):
    """(gene id, count) -> token. "scale": E[g] * log1p(x); "concat": Linear([E[g], log1p(x)])."""

    def __init__(self, gene_embedding: nn.Embedding, mode: str):
        super().__init__()
        self.gene_embedding = gene_embedding
        self.mode = mode
        if mode == "concat":
            d = gene_embedding.embedding_dim
            self.proj = nn.Linear(d + 1, d, bias=False)

    def forward(self, gene_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        e = self.gene_embedding(gene_ids)  # (B, S, E)
        log_counts = torch.log1p(counts.float()).unsqueeze(-1).to(e.dtype)  # (B, S, 1)
        if self.mode == "scale":
            return e * log_counts
        return self.proj(torch.cat([e, log_counts], dim=-1))  # (B, S, E)

    def flops(self, n_tokens: int) -> float:
        return linear_flops(self.proj, n_tokens) if self.mode == "concat" else 0.0  # the lookup is free


class SetVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, n_genes: int):
        super().__init__()
        self.cfg = cfg
        self.n_genes = n_genes
        d, m = cfg.d_model, cfg.n_latent_tokens
        self.gene_embedding = nn.Embedding(n_genes, d)
        self.decoder_gene_embedding = self.gene_embedding if cfg.share_gene_embedding else nn.Embedding(n_genes, d)
        self.tokens = GeneTokenEmbedding(self.gene_embedding, cfg.input_embedding)
        # Encoder: M inducing points pool the gene set, then self-attention over the M tokens.
        self.inducing_points = nn.Parameter(torch.randn(1, m, d) * 0.02)
        # attention_backend "triton": pooling and unpooling run the fused kernels (self-attention stays SDPA).
        fused = cfg.attention_backend == "triton"
        pooling = "pooling_folded" if cfg.fold_pooling else "pooling"
        self.pool = MCAB(d, cfg.n_cross_heads, cfg.mlp_ratio, kernel=pooling if fused else None)
        self.encoder_blocks = nn.ModuleList(
            SelfAttentionBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers)
        )
        self.encoder_norm = nn.LayerNorm(d, bias=False)
        n_out = 2 * cfg.latent_dim if cfg.latent_mode == "gaussian" else cfg.latent_dim
        self.to_latent = nn.Linear(d, n_out, bias=False)
        self.latent_norm = nn.LayerNorm(cfg.latent_dim, elementwise_affine=False)
        # Decoder: latent tokens -> width d, self-attention, then gene queries unpool them.
        self.from_latent = nn.Sequential(
            nn.LayerNorm(cfg.latent_dim, bias=False), nn.Linear(cfg.latent_dim, d, bias=False)
        )
        self.decoder_blocks = nn.ModuleList(
            SelfAttentionBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers)
        )
        self.unpool = MCAB(d, cfg.n_cross_heads, cfg.mlp_ratio, kernel="unpooling" if fused else None)
        self.decoder_norm = nn.LayerNorm(d, bias=False)
        self.apply(_init_weights)
        # Built after the generic init so the head keeps its own (theta = 1 at init).
        if cfg.likelihood == "nb":
            self.head: nn.Module = NegativeBinomialHead(d, n_genes, cfg.theta_mode, cfg.nb_loss_backend)
        else:
            self.head = GaussianHead(d, n_genes)
        nn.init.normal_(self.head.to_logit.weight if cfg.likelihood == "nb" else self.head.to_mean.weight, std=0.02)

    def init_weights(self) -> None:
        """Initialise every parameter by the constructor's rules (not its exact random draws): used after
        FSDP built the model on the meta device and allocated each rank's shards (train.init_on_meta)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_init_weights)
        nn.init.normal_(self.inducing_points, std=0.02)
        self.head.init_weights()

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.cfg.n_latent_tokens, self.cfg.latent_dim

    def encode(
        self, gene_ids: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent tokens (B, M, L) and, for the Gaussian mode, the KL per cell (B,).

        sample=False returns the posterior mean (Gaussian mode); the LayerNorm mode is deterministic.
        """
        x = self.tokens(gene_ids, counts)  # (B, S, E)
        z = self.pool(self.inducing_points, x, key_mask=mask)  # (B, M, E)
        for block in self.encoder_blocks:
            z = block(z)
        z = self.to_latent(self.encoder_norm(z))  # (B, M, L) or (B, M, 2L)
        if self.cfg.latent_mode == "layernorm":
            return self.latent_norm(z), None
        mean, log_var = z.float().chunk(2, dim=-1)  # (B, M, L) each
        log_var = log_var.clamp(-20.0, 10.0)
        kl = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=(1, 2))  # (B,)
        if sample:
            mean = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        return mean, kl

    def decode(self, z: torch.Tensor, decode_gene_ids: torch.Tensor) -> torch.Tensor:
        """Hidden vector per requested gene: (B, M, L), (G,) -> (B, G, E)."""
        h = self.from_latent(z)  # (B, M, E)
        for block in self.decoder_blocks:
            h = block(h)
        gene_queries = self.decoder_gene_embedding(decode_gene_ids)[None]  # (1, G, E), shared by all cells
        y = self.unpool(gene_queries, h)  # (B, G, E)
        return self.decoder_norm(y)

    def log_prob(self, hidden, decode_gene_ids, library_size, target) -> torch.Tensor:
        return self.head.log_prob(hidden, decode_gene_ids, library_size, target)  # (B, G)

    def sample_counts(self, z: torch.Tensor, decode_gene_ids: torch.Tensor, library_size: torch.Tensor):
        return self.head.sample(self.decode(z, decode_gene_ids), decode_gene_ids, library_size)

    def transformer_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in forward order: the units of FSDP sharding and activation checkpointing."""
        return [self.pool, *self.encoder_blocks, *self.decoder_blocks, self.unpool]

    def forward_flops(self, n_tokens: int, n_genes: int, batch_size: int) -> float:
        """Per cell: encode n_tokens gene tokens (the batch's padded length, S), decode n_genes genes (G).

        The inducing points and gene queries are shared by the batch_size cells: projected once per batch.
        """
        m = self.cfg.n_latent_tokens
        flops = self.tokens.flops(n_tokens) + self.pool.flops(m, n_tokens, batch_size)
        flops += sum(block.flops(m) for block in [*self.encoder_blocks, *self.decoder_blocks])
        flops += linear_flops(self.to_latent, m) + linear_flops(self.from_latent[1], m)
        flops += self.unpool.flops(n_genes, m, batch_size)
        return flops + self.head.flops(n_genes)

    def activation_profile(self, n_tokens: int, n_genes: int) -> ActivationProfile:
        """Saved elements per cell encoding n_tokens gene tokens (S) and decoding n_genes genes (G)."""
        m, e, latent = self.cfg.n_latent_tokens, self.cfg.d_model, self.cfg.latent_dim
        blocks = [
            self.pool.activations(m, n_tokens),
            *(block.activations(m) for block in [*self.encoder_blocks, *self.decoder_blocks]),
            self.unpool.activations(n_genes, m),
        ]
        # token embedding (S, E) and counts (S); encoder norm and latent projections (M, 2E + 4L); decoder norm
        # and head input (G, 2E)
        outside = n_tokens * (e + 1) + m * (2 * e + 4 * latent) + 2 * n_genes * e
        return ActivationProfile.from_blocks(blocks, outside, self.head.SAVED_FP32_PER_GENE * n_genes)

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on a CellBatch: NLL summed over genes, mean over cells, plus weighted KL."""
        z, kl = self.encode(batch.gene_ids, batch.counts, batch.mask)
        hidden = self.decode(z, batch.decode_gene_ids)
        nll = self.head.nll(hidden, batch.decode_gene_ids, batch.library_size, batch.target).mean()
        loss = nll
        metrics = {"nll": nll.detach()}
        if kl is not None:
            kl_mean = kl.mean()
            loss = loss + self.cfg.kl_weight * kl_mean
            metrics["kl"] = kl_mean.detach()
        return loss, metrics


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)

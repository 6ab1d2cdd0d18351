"""Set VAE over gene tokens: MCAB pooling encoder, MCAB unpooling decoder, NB (or Gaussian) head.

Unusual here:
- A cell is the *set* of its expressed genes; tokens carry no position, so the encoder is invariant
  and the decoder equivariant under gene permutations, and any subset of the vocabulary can be decoded.
- The encoder takes a key padding mask (True = real token) so padding never changes the latent.
- Two latent modes: "layernorm" (deterministic, LayerNorm without affine, KL weight 0 — what the
  reference trains) and "gaussian" (reparameterised diagonal Gaussian per token, KL to N(0, I)).
- The decoder's gene queries are gene-id embeddings (optionally the encoder's table); they depend only
  on the gene, so they enter the cross-attention with batch size 1 and are projected once.
- The decoder runs over the decoded genes in chunks (model.decode_chunk_genes; `decode_chunk` says how many
  genes): each chunk's unpooling, decoder norm and head run under torch.utils.checkpoint (recomputed in the
  backward pass) and leave only the head's per-gene outputs, so the whole decode keeps (B, G) scalars and one
  chunk's (B, chunk, E) working set, never a (B, G, E) tensor. The softmax over genes and the loss then see
  all the genes at once: chunked and unchunked give the same loss and gradients. Under
  train.activation_checkpointing the unpooling block's own checkpoint nests inside the chunk's (same result
  and memory; the chunk's unpooling then runs three times per step instead of two).
- The model reports its own cost: `transformer_blocks()` (the units of FSDP sharding, activation
  checkpointing and compile), `forward_flops` and `activation_profile` per cell (conventions in cost.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.config import VAEConfig
from scldm_scale.host_memory import decoder_memory_policy
from scldm_scale.models.cost import ActivationProfile, linear_flops
from scldm_scale.models.likelihoods import GaussianHead, NegativeBinomialHead
from scldm_scale.models.mcab import MCAB, SelfAttentionBlock

# model.decode_chunk_genes=0 sizes a decoder chunk so that its activations (cells x chunk genes x the elements
# one gene's unpooling, decoder norm and head save per cell) stay under this many elements: 256 MiB in fp32.
# 32 cells of width 64 decode ~1,900 genes per chunk, 256 cells of width 512 the floor of 256 genes (~1 GiB in
# bf16; fewer, larger chunks keep a GPU busy).
DECODE_CHUNK_ELEMENTS = 2**26
MIN_DECODE_CHUNK = 256


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
        # model.latent_gene_path: a gene-specific linear readout of the latent, U[g] . W vec(z), U from zero.
        self.latent_to_gene = nn.Linear(m * cfg.latent_dim, d, bias=False) if cfg.latent_gene_path else None
        self.latent_gene_loadings = nn.Embedding(n_genes, d) if cfg.latent_gene_path else None
        self.apply(_init_weights)
        self._zero_latent_gene_path()
        if cfg.encoder_warmup_steps > 0:  # model.encoder_warmup_steps: training forward passes so far (checkpointed)
            self.register_buffer("training_passes", torch.zeros((), dtype=torch.long))
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
        self._zero_latent_gene_path()
        if self.cfg.encoder_warmup_steps > 0:
            self.training_passes.zero_()
        self.head.init_weights()

    def _zero_latent_gene_path(self) -> None:
        """W ~ N(0, 1 / (M L)) (unit-variance outputs of a LayerNorm latent), loadings U from zero: the path starts
        silent, and its first gradient (on U) is first order in the latent."""
        if self.latent_to_gene is not None:
            nn.init.normal_(self.latent_to_gene.weight, std=self.latent_to_gene.in_features**-0.5)
            nn.init.zeros_(self.latent_gene_loadings.weight)

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
        bias = None
        if self.cfg.pooling_weights != "uniform":  # attention weight x count (or log1p(count)); a zero count: none
            weight = counts.float().clamp_min(0.0)
            bias = torch.log(torch.log1p(weight) if self.cfg.pooling_weights == "log1p" else weight)  # (B, S)
        z = self.pool(self.inducing_points, x, key_mask=mask, key_bias=bias)  # (B, M, E)
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

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The keys and values the gene queries unpool: (B, M, L) -> (B, M, E)."""
        h = self.from_latent(z)  # (B, M, E)
        for block in self.decoder_blocks:
            h = block(h)
        return h

    def _unpool(self, h: torch.Tensor, gene_queries: torch.Tensor) -> torch.Tensor:
        """Hidden vector per gene: (B, M, E), (G, E) -> (B, G, E); the queries are shared by all cells."""
        return self.decoder_norm(self.unpool(gene_queries[None], h))  # (B, G, E)

    def decode(self, z: torch.Tensor, decode_gene_ids: torch.Tensor) -> torch.Tensor:
        """Hidden vector per requested gene, in one pass: (B, M, L), (G,) -> (B, G, E)."""
        return self._unpool(self.decode_latents(z), self.decoder_gene_embedding(decode_gene_ids))

    def decode_chunk(self, n_cells: int, n_genes: int) -> int:
        """Genes per decoder chunk (model.decode_chunk_genes): N as set, all genes for -1, and for 0 (auto) the
        most genes whose activations fit DECODE_CHUNK_ELEMENTS, at least MIN_DECODE_CHUNK, a multiple of 64."""
        setting = self.cfg.decode_chunk_genes
        if setting == 0:
            per_gene = self.unpool.activations(1, 0)[0] + 2 * self.cfg.d_model  # + decoder norm and head input
            setting = max(MIN_DECODE_CHUNK, DECODE_CHUNK_ELEMENTS // (max(n_cells, 1) * per_gene) // 64 * 64)
        return n_genes if setting == -1 else min(setting, n_genes)

    def _head_outputs(
        self, h: torch.Tensor, gene_queries: torch.Tensor, gene_ids: torch.Tensor, cell_vec: torch.Tensor | None = None
    ):
        location, scale = self.head.per_gene(self._unpool(h, gene_queries), gene_ids)  # NB logits or Gaussian mean
        if cell_vec is not None:  # model.latent_gene_path: + U[g] . W vec(z_c)
            location = location + (cell_vec @ self.latent_gene_loadings(gene_ids).T).float()  # (B, E) x (E, G)
        return location, scale

    def decode_per_gene(self, z: torch.Tensor, decode_gene_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's per-gene outputs for every requested gene, decoded decode_chunk genes at a time.

        Each chunk runs under checkpoint when gradients are on: the forward keeps its (B, chunk) outputs only,
        the backward recomputes the chunk. A single chunk runs plainly (nothing to save by recomputing).
        """
        h = self.decode_latents(z)  # (B, M, E)
        gene_queries = self.decoder_gene_embedding(decode_gene_ids)  # (G, E), shared by all cells
        cell_vec = None if self.latent_to_gene is None else self.latent_to_gene(z.flatten(1))  # (B, E)
        chunk = self.decode_chunk(h.shape[0], len(decode_gene_ids))
        if h.device.type == "cpu":  # how malloc treats the blocks the decoder frees (host_memory.py)
            decoder_memory_policy(chunked=chunk < len(decode_gene_ids))
        if chunk >= len(decode_gene_ids):
            return self._head_outputs(h, gene_queries, decode_gene_ids, cell_vec)
        parts = []
        for queries, ids in zip(gene_queries.split(chunk), decode_gene_ids.split(chunk), strict=True):
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._head_outputs, h, queries, ids, cell_vec, use_reentrant=False))
            else:
                parts.append(self._head_outputs(h, queries, ids, cell_vec))
        return tuple(torch.cat(outputs, dim=-1) for outputs in zip(*parts, strict=True))  # (B, G) or (G,) each

    def distribution(self, z: torch.Tensor, decode_gene_ids: torch.Tensor, library_size: torch.Tensor):
        """The head's distribution of every requested gene's counts, (B, G) parameters, decoded in chunks."""
        return self.head.distribution(self.decode_per_gene(z, decode_gene_ids), library_size)

    def log_prob(self, z, decode_gene_ids, library_size, target) -> torch.Tensor:
        return self.head.log_prob(self.distribution(z, decode_gene_ids, library_size), library_size, target)  # (B, G)

    def sample_counts(self, z: torch.Tensor, decode_gene_ids: torch.Tensor, library_size: torch.Tensor):
        return self.head.sample(self.distribution(z, decode_gene_ids, library_size), library_size)

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
        if self.latent_to_gene is not None:  # W vec(z), then one dot product of width E per gene
            flops += linear_flops(self.latent_to_gene, 1) + 2 * self.cfg.d_model * n_genes
        return flops + self.head.flops(n_genes)

    def activation_profile(self, n_tokens: int, n_genes: int, batch_size: int) -> ActivationProfile:
        """Saved elements per cell encoding n_tokens gene tokens (S) and decoding n_genes genes (G) in batches of
        batch_size cells. A chunked decoder keeps the keys (M, E) and the head's per-gene outputs for the backward
        pass, and holds one chunk's activations while it is recomputed: the unpooling "block" is then one chunk
        (with its decoder norm and head input), of which only the keys stay."""
        m, e, latent = self.cfg.n_latent_tokens, self.cfg.d_model, self.cfg.latent_dim
        chunk = self.decode_chunk(batch_size, n_genes)
        unpool_full, unpool_input = self.unpool.activations(chunk, m)
        norm_and_head = 2 * chunk * e  # decoder norm and head input (chunk, 2E)
        if chunk < n_genes:
            unpool_full, norm_and_head = unpool_full + norm_and_head, 0
        blocks = [
            self.pool.activations(m, n_tokens),
            *(block.activations(m) for block in [*self.encoder_blocks, *self.decoder_blocks]),
            (unpool_full, unpool_input),
        ]
        # token embedding (S, E) and counts (S); encoder norm and latent projections (M, 2E + 4L); a one-pass
        # decoder's norm and head input (G, 2E)
        outside = n_tokens * (e + 1) + m * (2 * e + 4 * latent) + norm_and_head
        return ActivationProfile.from_blocks(blocks, outside, self.head.SAVED_FP32_PER_GENE * n_genes)

    def encoder_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The tokens the encoder sees in this forward pass: all of them, or in training with
        model.encoder_token_dropout = p each real token kept with probability 1 - p (torch's RNG, which training
        checkpoints restore); a cell that would keep none keeps all of its tokens."""
        p = self.cfg.encoder_token_dropout
        if not self.training or p == 0.0:
            return mask
        kept = mask & (torch.rand(mask.shape, device=mask.device) >= p)
        return torch.where(kept.any(dim=1, keepdim=True), kept, mask)

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on a CellBatch: NLL summed over genes, mean over cells, plus weighted KL."""
        z, kl = self.encode(batch.gene_ids, batch.counts, self.encoder_mask(batch.mask))
        if self.cfg.encoder_warmup_steps > 0 and self.training:
            if self.training_passes < self.cfg.encoder_warmup_steps:  # the encoder is frozen: no gradient reaches it
                z, kl = z.detach(), None if kl is None else kl.detach()
            self.training_passes += 1
        per_gene = self.decode_per_gene(z, batch.decode_gene_ids)
        nll = self.head.nll(per_gene, batch.library_size, batch.target).mean()
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

"""Observation models over the decoded genes: negative binomial on raw counts, Gaussian on log-counts.

Unusual here:
- The NB mean is library_size * softmax_g(logit_g); everything is done in log space
  (log mu = log L + log_softmax), with log(theta + mu) = logaddexp(log theta, log mu), so counts in
  the tens of thousands neither overflow nor lose precision. Always fp32 or wider: bf16 holds
  integers exactly only up to 256.
- Sampling is gamma-Poisson, which is exact for the NB(mu, theta) parameterisation.
- A head works in two steps, so that the decoder can run over the genes in chunks: `per_gene(hidden,
  gene_ids)` reads the hidden vectors of some genes into per-gene outputs (NB: logits and log theta;
  Gaussian: mean and log std), and everything else (`distribution`, `log_prob`, `nll`, `sample`, `mean`)
  takes those outputs for all decoded genes, never a hidden vector. `distribution` is elementwise per gene
  (the NB softmax over genes is done there), so its columns can be sampled a chunk of genes at a time.
- The training loss (`nll`, per cell) has two backends: "torch" (log_prob summed over genes) and "triton"
  (scldm_kernels.nb_loss: softmax, mean and likelihood fused, no [cells x genes] temporaries). Generation
  and evaluation (log_prob, sample, mean) always take the PyTorch path.
- Each head reports its forward FLOPs per cell (`flops`) and the fp32 (B, G) tensors its eager loss keeps
  for the backward pass (`SAVED_FP32_PER_GENE`, within 15% of autograd's count in tests/train/test_plan.py).
"""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale.models.cost import linear_flops

# Log-counts for the Gaussian head: log1p(counts / library_size * 1e4), as in scanpy's normalize_total.
TARGET_SUM = 1e4
# Bounds on log theta: theta in [e^-10, e^10] spans Poisson-like to extremely overdispersed genes.
LOG_THETA_MIN, LOG_THETA_MAX = -10.0, 10.0
# Counts added to every gene's total when the per-gene logit offset starts from the data (a tenth of a count:
# a gene never seen in the cells starts ten times below one seen once).
GENE_BIAS_PSEUDOCOUNT = 0.1


def nb_log_prob(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise, in the dtype of the inputs (pass fp32 or fp64).

    log NB = theta (log theta - log(theta+mu)) + x (log mu - log(theta+mu))
             + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    """
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    return (
        theta * (log_theta - log_theta_mu)
        + x * (log_mu - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def sample_nb(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Counts ~ NB(mu, theta) as Poisson(Gamma(shape=theta, scale=mu/theta)); uses the global torch RNG."""
    rate = torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-30)).sample()
    return torch.poisson(rate)


class NegativeBinomialHead(nn.Module):
    """Per-gene hidden vectors -> NB log-likelihood of counts with the cell's library size."""

    SAVED_FP32_PER_GENE = 12

    def __init__(self, d_model: int, n_genes: int, theta_mode: str, loss_backend: str = "torch"):
        super().__init__()
        self.theta_mode = theta_mode
        self.loss_backend = loss_backend
        self.to_logit = nn.Linear(d_model, 1, bias=False)
        # Per-gene logit offset: the gene's baseline expression, so the hidden vector models deviations.
        self.gene_bias = nn.Parameter(torch.zeros(n_genes))
        if theta_mode == "gene":
            self.log_theta = nn.Parameter(torch.zeros(n_genes))  # theta initialised to 1
        else:
            self.to_log_theta = nn.Linear(d_model, 1)
            nn.init.zeros_(self.to_log_theta.weight)
            nn.init.zeros_(self.to_log_theta.bias)

    def init_weights(self) -> None:
        """The constructor's initialisation (theta = 1, no gene offset), with the logit layer as SetVAE's."""
        nn.init.normal_(self.to_logit.weight, std=0.02)
        nn.init.zeros_(self.gene_bias)
        if self.theta_mode == "gene":
            nn.init.zeros_(self.log_theta)
        else:
            nn.init.zeros_(self.to_log_theta.weight)
            nn.init.zeros_(self.to_log_theta.bias)

    @torch.no_grad()
    def init_gene_bias(self, gene_totals: torch.Tensor) -> None:
        """Start the per-gene logit offset at the log of each gene's share of the counts (`gene_totals`, (G,),
        summed over training cells, plus GENE_BIAS_PSEUDOCOUNT), centred: at initialisation the decoder
        predicts the average cell's profile and training learns deviations from it. A gene-subset step updates
        only the offsets of the genes it decodes, so without this a whole-transcriptome model spends its steps
        pushing tens of thousands of never-expressed genes down from the average logit."""
        log_share = (gene_totals.double() + GENE_BIAS_PSEUDOCOUNT).log()
        self.gene_bias.copy_((log_share - log_share.mean()).to(self.gene_bias))

    def flops(self, n_genes: int) -> float:
        theta = linear_flops(self.to_log_theta, n_genes) if self.theta_mode == "cell" else 0.0
        return linear_flops(self.to_logit, n_genes) + theta

    def per_gene(self, hidden: torch.Tensor, gene_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-gene logits (B, G) and clamped log theta, (G,) per gene or (B, G) per cell, in fp32."""
        logits = self.to_logit(hidden).squeeze(-1).float() + self.gene_bias[gene_ids].float()  # (B, G)
        if self.theta_mode == "gene":
            log_theta = self.log_theta[gene_ids].float()  # (G,)
        else:
            log_theta = self.to_log_theta(hidden).squeeze(-1).float()  # (B, G)
        return logits, log_theta.clamp(LOG_THETA_MIN, LOG_THETA_MAX)

    def distribution(self, per_gene, library_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log mu, log theta), each (B, G), in fp32: the softmax over all the decoded genes is taken here."""
        logits, log_theta = per_gene
        log_mu = library_size.float().clamp_min(1.0).log()[:, None] + logits.log_softmax(-1)  # (B, G)
        return log_mu, log_theta.expand_as(log_mu)

    def log_prob(self, distribution, library_size, counts) -> torch.Tensor:
        log_mu, log_theta = distribution
        return nb_log_prob(counts.float(), log_mu, log_theta)  # (B, G)

    def nll(self, per_gene, library_size, counts) -> torch.Tensor:
        """Negative log-likelihood per cell, (B,), summed over the genes: the training loss."""
        if self.loss_backend != "triton":
            return -self.log_prob(self.distribution(per_gene, library_size), library_size, counts).sum(-1)
        # Imported here, not at the top: Triton builds a module's kernels (compiled or interpreted, by
        # TRITON_INTERPRET) when it is imported, so only a model that uses them imports them.
        from scldm_kernels.nb_loss import nb_nll

        logits, log_theta = per_gene
        return nb_nll(logits, library_size.float().clamp_min(1.0), log_theta, counts)  # (B,)

    def sample(self, distribution, library_size) -> torch.Tensor:
        log_mu, log_theta = distribution
        return sample_nb(log_mu.exp(), log_theta.exp())

    def mean(self, distribution, library_size) -> torch.Tensor:
        return distribution[0].exp()


class GaussianHead(nn.Module):
    """Gaussian on y = log1p(counts / L * 1e4) with a learned per-gene log standard deviation."""

    SAVED_FP32_PER_GENE = 6

    def __init__(self, d_model: int, n_genes: int):
        super().__init__()
        self.to_mean = nn.Linear(d_model, 1)
        self.log_std = nn.Parameter(torch.zeros(n_genes))

    def init_weights(self) -> None:
        nn.init.normal_(self.to_mean.weight, std=0.02)
        nn.init.zeros_(self.to_mean.bias)
        nn.init.zeros_(self.log_std)

    def flops(self, n_genes: int) -> float:
        return linear_flops(self.to_mean, n_genes)

    def per_gene(self, hidden: torch.Tensor, gene_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, G) of the log-counts and log std (G,), in fp32."""
        return self.to_mean(hidden).squeeze(-1).float(), self.log_std[gene_ids].float()

    def distribution(self, per_gene, library_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = per_gene
        return mean, log_std.expand_as(mean)

    @staticmethod
    def transform(counts: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
        return torch.log1p(counts.float() / library_size.float().clamp_min(1.0)[:, None] * TARGET_SUM)

    def log_prob(self, distribution, library_size, counts) -> torch.Tensor:
        mean, log_std = distribution
        y = self.transform(counts, library_size)
        return torch.distributions.Normal(mean, log_std.exp()).log_prob(y)

    def nll(self, per_gene, library_size, counts) -> torch.Tensor:
        """Negative log-likelihood per cell, (B,), summed over the genes: the training loss."""
        return -self.log_prob(self.distribution(per_gene, library_size), library_size, counts).sum(-1)

    def sample(self, distribution, library_size) -> torch.Tensor:
        mean, log_std = distribution
        y = mean + log_std.exp() * torch.randn_like(mean)
        return (y.expm1().clamp_min(0.0) * library_size.float()[:, None] / TARGET_SUM).round()

    def mean(self, distribution, library_size) -> torch.Tensor:
        return distribution[0].expm1().clamp_min(0.0) * library_size.float()[:, None] / TARGET_SUM

"""Generation draws counts a chunk of genes at a time into a sparse matrix (Generator._sample_counts)."""

from types import SimpleNamespace

import scipy.sparse as sp
import torch

from scldm_scale.config import VAEConfig
from scldm_scale.generate import Generator
from scldm_scale.models.vae import SetVAE


def test_counts_are_drawn_in_gene_chunks_into_csr_with_the_model_mean():
    n_genes, n_cells = 13, 4000
    tiny = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    vae = SetVAE(VAEConfig(**tiny, decode_chunk_genes=5), n_genes).eval()
    z = torch.randn(1, 4, 8).expand(n_cells, -1, -1)  # one cell's latent, drawn n_cells times
    genes, library = torch.arange(n_genes), torch.full((n_cells,), 300.0)
    with torch.no_grad():
        counts = Generator._sample_counts(SimpleNamespace(vae=vae), z, genes, library)
        log_mu, log_theta = vae.distribution(z[:1], genes, library[:1])
    assert sp.isspmatrix_csr(counts) and counts.shape == (n_cells, n_genes) and counts.dtype.kind == "i"
    mu, theta = log_mu[0].exp().double(), log_theta[0].exp().double()
    standard_error = ((mu + mu**2 / theta) / n_cells).sqrt()
    drawn_mean = torch.from_numpy(counts.mean(axis=0).A1)
    assert ((drawn_mean - mu).abs() < 5 * standard_error).all()  # every chunk, the last (3 genes) included


def _random_dit(n_classes: dict[str, int]):
    from scldm_scale.config import PriorConfig
    from scldm_scale.models.dit import DiT

    torch.manual_seed(1)
    dit = DiT(PriorConfig(d_model=16, n_heads=2, n_layers=1), 3, 4, n_classes).eval()
    with torch.no_grad():  # adaLN-Zero starts at v = 0 for every condition: give it a field that depends on them
        for p in dit.parameters():
            p.normal_(0.0, 0.3)
    return dit


def test_guidance_modes_are_the_explicit_formulas_on_one_prior():
    n_classes = {"cell_line": 3, "perturbation": 4}
    dit = _random_dit(n_classes)
    gen = SimpleNamespace(dit=dit)
    x, t = torch.randn(5, 3, 4), torch.rand(5)
    ids = {"cell_line": torch.tensor([0, 1, 2, 1, 0]), "perturbation": torch.tensor([3, 2, 1, 0, 2])}
    null = {k: torch.full((5,), n) for k, n in n_classes.items()}
    with torch.no_grad():
        v_null = dit(x, t, null)
        v_line = dit(x, t, {**null, "cell_line": ids["cell_line"]})
        v_pert = dit(x, t, {**null, "perturbation": ids["perturbation"]})
        v_all = dit(x, t, ids)
        weights = {"cell_line": 0.5, "perturbation": 2.0}
        compositional = Generator.velocity(gen, ids, weights, "compositional")(x, t)
        joint = Generator.velocity(gen, ids, weights, "joint")(x, t)
    torch.testing.assert_close(compositional, v_null + 0.5 * (v_line - v_null) + 2.0 * (v_pert - v_null))
    torch.testing.assert_close(joint, v_null + 2.0 * (v_all - v_null))  # one weight: the largest
    assert (joint - compositional).abs().max() > 1e-2  # the two modes differ on this field


def test_guidance_mode_resolves_against_the_dropout_the_prior_was_trained_with():
    import pytest

    from scldm_scale.config import ConfigError

    def gen(cond_dropout):
        own = "joint" if cond_dropout == "joint" else "compositional"
        return SimpleNamespace(guidance_mode=own, cond_dropout=cond_dropout)

    resolve = Generator.resolve_guidance_mode
    assert resolve(gen("independent"), "auto") == "compositional"
    assert resolve(gen("joint"), "auto") == "joint"
    assert resolve(gen("independent"), "joint") == "joint"
    assert resolve(gen("one_at_a_time"), "compositional") == "compositional"
    with pytest.raises(ConfigError, match="prior.cond_dropout=one_at_a_time.*--guidance-mode auto"):
        resolve(gen("one_at_a_time"), "joint")
    with pytest.raises(ConfigError, match="prior.cond_dropout=joint"):
        resolve(gen("joint"), "compositional")


def test_guidance_interval_guides_inside_and_conditions_plainly_outside():
    import pytest

    from scldm_scale.config import ConfigError, check_guidance_interval

    n_classes = {"cell_type": 3}
    dit = _random_dit(n_classes)
    gen = SimpleNamespace(dit=dit)
    x = torch.randn(4, 3, 4)
    ids = {"cell_type": torch.tensor([0, 1, 2, 1])}
    null = {"cell_type": torch.full((4,), 3)}
    weights = {"cell_type": 2.0}
    field = Generator.velocity(gen, ids, weights, "compositional", (0.0, 0.5))
    with torch.no_grad():
        for t in (torch.full((4,), 0.2), torch.full((4,), 0.5), torch.full((4,), 0.8)):
            v_null, v_type = dit(x, t, null), dit(x, t, ids)
            expected = v_null + 2.0 * (v_type - v_null) if t[0] <= 0.5 else v_type
            torch.testing.assert_close(field(x, t), expected)
        mixed = torch.tensor([0.1, 0.9, 0.4, 0.6])  # per-cell times: each row follows its own t
        v_null, v_type = dit(x, mixed, null), dit(x, mixed, ids)
        inside = (mixed <= 0.5).reshape(-1, 1, 1)
        torch.testing.assert_close(field(x, mixed), torch.where(inside, v_null + 2.0 * (v_type - v_null), v_type))
    assert check_guidance_interval([0, 0.5], "x") == (0.0, 0.5)
    for bad in ([0.5, 0.5], [0.6, 0.2], [-0.1, 1.0], [0.0, 1.5], [0.5], [0.0, 0.2, 0.4]):
        with pytest.raises(ConfigError, match="x "):
            check_guidance_interval(bad, "x")

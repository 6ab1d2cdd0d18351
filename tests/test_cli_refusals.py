"""Bad input through the real CLI: every command refuses it the same way.

Each row of ROWS is one bad input run as a user runs it (`python -m scldm_scale ...` in a subprocess) and
checked for: the exit status (2), the one-line message (`scldm-scale CMD: error: ...` naming what is wrong
and the flag or fix), no traceback, and the disk afterwards: the row's folder holds exactly what it held
before (nothing at `--out`, no partial, no empty folder) and its existing files are unchanged. A few rows
are inputs that must be accepted (exit 0).

Placeholders in a row's command: {fx} the shared inputs (built once), {tmp} the row's own folder (its
working directory too, so a stray relative output shows), {out} = {tmp}/out, which must never appear.
A subprocess costs ~3 s of imports, so the selected rows (`-k` works) run together once per module, as many
at a time as there are cores.

The last test holds `--help` to the same checklist: every option of every command has help text that says
its default (or what happens without it), and `--help` exits 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scldm_scale import cli
from scldm_scale.artifact import LDMArtifact, Provenance, VAEArtifact
from scldm_scale.config import PriorConfig, VAEConfig
from scldm_scale.data.batch import LabelEncoder, TokenPolicy
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LibrarySizeModel
from scldm_scale.models.vae import SetVAE

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
KEEP = "an earlier file\n"  # the content of every pre-existing file a row names
TYPES = ("type_0", "type_1", "type_2")


@dataclass(frozen=True)
class Row:
    id: str
    argv: str
    message: tuple[str, ...]  # fragments of the error line (of stdout for an accepted input)
    rc: int = 2
    files: tuple[str, ...] = ()  # files in {tmp} before the run, which must be left as they were
    folders: tuple[str, ...] = ()  # empty folders in {tmp} before the run, which must stay empty

    def param(self):
        return pytest.param(self, id=self.id)


def _row(id: str, argv: str, *message: str, **kw) -> Row:
    return Row(id, argv, message, **kw)


GEN = "generate {fx}/ldm-model --n-cells 5"
EVAL = "evaluate --real {fx}/counts.h5ad --generated {fx}/counts.h5ad --out {out}"
ROWS = [
    # --- the cases issue 14 found ---
    _row(
        "generate-repeated-condition-key",
        GEN + " --condition cell_type=type_0 --condition cell_type=type_1 --out {out}.h5ad",
        "--condition gives 'cell_type' twice",
    ),
    _row("generate-cuda-on-cpu-build", GEN + " --device cuda --out {out}.h5ad", "CUDA is not available", "use cpu"),
    _row(
        "prepare-nan-labels",
        "prepare {fx}/nan_labels.h5ad --out {out} --labels cell_type",
        "label column 'cell_type' has 1 missing values",
        "fill them",
    ),
    _row(
        "prepare-counts-only-in-raw-X",
        "prepare {fx}/raw_x.h5ad --out {tmp}/cells.soma --labels cell_type",
        "SOMA experiment:",
        rc=0,
    ),
    _row(
        "prepare-non-integer-X-lists-candidates",
        "prepare {fx}/lognorm.h5ad --out {out}",
        "found no raw integer counts",
        "layers are ['lognorm']",
        ".raw.X",
        "--layer NAME",
        "--allow-non-integer",
    ),
    _row(
        "evaluate-non-integer-X-names-its-flags",
        "evaluate --real {fx}/lognorm.h5ad --generated {fx}/counts.h5ad --out {out}",
        "non-integer",
        "--layer",
    ),
    _row(
        "evaluate-counts-in-raw-X",
        "evaluate --real {fx}/raw_x.h5ad --layer raw.X --generated {fx}/counts.h5ad --n-pcs 0 --out {out}",
        "--n-pcs",
    ),
    _row(
        "embed-non-integer-X-names-its-flags",
        "embed {fx}/vae-model {fx}/lognorm.h5ad --out {out}.h5ad",
        "non-integer",
        "--layer",
    ),
    _row(
        "generate-existing-out", GEN + " --out {tmp}/cells.h5ad", "already exists", "--overwrite", files=("cells.h5ad",)
    ),
    _row("generate-out-is-a-folder", GEN + " --out {tmp}/folder", "it is a folder", folders=("folder",)),
    _row(
        "generate-overwrite", GEN + " --out {tmp}/cells.h5ad --overwrite", "wrote 5 cells", rc=0, files=("cells.h5ad",)
    ),
    _row(
        "prepare-existing-out",
        "prepare {fx}/counts.h5ad --out {tmp}/cells.soma",
        "already exists",
        "--overwrite",
        "--append",
        files=("cells.soma/notes.txt",),
    ),
    _row(
        "evaluate-existing-out", EVAL.replace("{out}", "{tmp}/report"), "already exists", files=("report/metrics.json",)
    ),
    _row("prepare-truncated-h5ad", "prepare {fx}/cut.h5ad --out {out}", "cut.h5ad: cannot read as an .h5ad"),
    _row(
        "train-checkpoint-folder-below-a-file",
        f"train {CONFIG} train.ckpt_dir={{tmp}}/notes.txt/run",
        "cannot write the checkpoint folder",
        "train.ckpt_dir",
        files=("notes.txt",),
    ),
    # --- prepare ---
    _row("prepare-missing-input", "prepare {fx}/absent.h5ad --out {out}", "absent.h5ad does not exist"),
    _row(
        "prepare-folder-without-matrix", "prepare {tmp}/folder --out {out}", "without matrix.mtx", folders=("folder",)
    ),
    _row("prepare-model-file-as-input", "prepare {fx}/model.pt --out {out}", "unsupported input", "use .h5ad"),
    _row(
        "prepare-test-fraction-above-1",
        "prepare {fx}/counts.h5ad --out {out} --test-fraction 1.5",
        "fractions must be in [0, 1)",
    ),
    _row(
        "prepare-unknown-label-column",
        "prepare {fx}/counts.h5ad --out {out} --labels tissue",
        "['tissue'] are not in obs",
        "obs has ['cell_type']",
    ),
    _row("prepare-negative-counts", "prepare {fx}/negative.h5ad --out {out}", "1 negative values"),
    _row("prepare-no-cells", "prepare {fx}/empty.h5ad --out {out}", "empty (0 cells"),
    _row("prepare-unknown-layer", "prepare {fx}/counts.h5ad --out {out} --layer spliced", "no layer 'spliced'"),
    _row("prepare-bad-choice", "prepare {fx}/counts.h5ad --out {out} --zero-cells keep", "invalid choice: 'keep'"),
    # --- train, plan, profile-step: configs ---
    _row("train-missing-config", "train {fx}/absent.yaml", "absent.yaml does not exist"),
    _row(
        "train-unknown-key",
        f"train {CONFIG} model.n_layer=2 train.ckpt_dir={{out}}",
        "unknown config key 'model.n_layer'",
    ),
    _row(
        "train-zero-batch",
        f"train {CONFIG} train.batch_size=0 train.ckpt_dir={{out}}",
        "train.batch_size must be positive",
    ),
    _row(
        "train-missing-data",
        f"train {CONFIG} data.source=h5ad data.path={{fx}}/absent.h5ad train.ckpt_dir={{out}}",
        "absent.h5ad does not exist",
    ),
    _row("plan-wrong-type", f"plan {CONFIG} model.d_model=wide", "wrong type for config key 'model.d_model'"),
    _row(
        "profile-step-zero-steps", f"profile-step {CONFIG} --steps 0 --out {{out}}", "--steps and --warmup must be >= 1"
    ),
    # --- export ---
    _row("export-h5ad-as-step-folder", "export {fx}/counts.h5ad --out {out}", "checkpoint folder"),
    _row("export-model-as-step-folder", "export {fx}/ldm-model --out {out}", "not a complete checkpoint"),
    # --- generate ---
    _row(
        "generate-pt-as-model",
        "generate {fx}/model.pt --n-cells 5 --out {out}.h5ad",
        "is a single file",
        "export --from-legacy",
    ),
    _row("generate-vae-model", "generate {fx}/vae-model --n-cells 5 --out {out}.h5ad", "a 'vae' model, expected 'ldm'"),
    _row("generate-zero-cells", "generate {fx}/ldm-model --n-cells 0 --out {out}.h5ad", "--n-cells must be positive"),
    _row(
        "generate-unknown-condition-value",
        GEN + " --condition cell_type=type_9 --out {out}.h5ad",
        "'type_9' is not known to this model",
        "type_0, type_1, type_2",
    ),
    _row(
        "generate-guidance-not-a-number",
        GEN + " --condition cell_type=type_0 --cfg cell_type=high --out {out}.h5ad",
        "'high' is not a number",
    ),
    _row(
        "generate-zero-steps",
        GEN + " --steps 0 --out {out}.h5ad",
        "--steps must be >= 1",
    ),
    _row(
        "generate-guidance-interval-reversed",
        GEN + " --guidance-interval 0.5,0.2 --out {out}.h5ad",
        "--guidance-interval must satisfy 0 <= LO < HI <= 1",
    ),
    _row(
        "generate-guidance-interval-not-numbers",
        GEN + " --guidance-interval early --out {out}.h5ad",
        "--guidance-interval expects comma-separated numbers",
    ),
    _row(
        "generate-negative-sde-noise",
        GEN + " --sampler sde --sde-noise -1 --out {out}.h5ad",
        "--sde-noise must be a finite number >= 0",
    ),
    # --- evaluate ---
    _row(
        "evaluate-missing-real",
        "evaluate --real {fx}/absent.h5ad --generated {fx}/counts.h5ad --out {out}",
        "absent.h5ad does not exist",
    ),
    _row(
        "evaluate-empty-folder-as-generated",
        "evaluate --real {fx}/counts.h5ad --generated {tmp}/folder --out {out}",
        "cannot open SOMA experiment",
        folders=("folder",),
    ),
    _row("evaluate-unknown-condition-key", EVAL + " --condition-key tissue", "['tissue'] are not obs columns"),
    _row("evaluate-unknown-baseline", EVAL + " --baselines best", "unknown baselines ['best']"),
    _row("evaluate-zero-pcs", EVAL + " --n-pcs 0", "--n-pcs, --n-hvg and --scvi-epochs must be >= 1"),
    _row(
        "evaluate-gene-sets-differ",
        "evaluate --real {fx}/counts.h5ad --generated {fx}/fewer_genes.h5ad --out {out}",
        "the gene sets differ",
        "--intersect-genes",
    ),
    _row(
        "evaluate-no-cells",
        "evaluate --real {fx}/empty.h5ad --generated {fx}/counts.h5ad --out {out}",
        "the real cells number 0",
    ),
    # --- embed, classify ---
    _row(
        "embed-missing-genes",
        "embed {fx}/vae-model {fx}/fewer_genes.h5ad --out {out}.h5ad",
        "10 of the model's 20 genes are missing",
        "--allow-missing-genes",
    ),
    _row(
        "embed-zero-batch",
        "embed {fx}/vae-model {fx}/counts.h5ad --batch-size 0 --out {out}.h5ad",
        "--batch-size must be positive",
    ),
    _row(
        "classify-unknown-label-key",
        "classify {fx}/vae-model {fx}/counts.h5ad --label-key tissue --out {out}",
        "no obs column 'tissue' for --label-key",
    ),
    _row(
        "classify-negative-rare-max",
        "classify {fx}/vae-model {fx}/counts.h5ad --label-key cell_type --rare-max-train -1 --out {out}",
        "--rare-max-train must be at least 1",
    ),
    # --- quickstart, synthetic data ---
    _row("quickstart-missing-data", "quickstart --data {fx}/absent.h5ad --out {out}", "absent.h5ad does not exist"),
    _row(
        "quickstart-zero-minutes",
        "quickstart --data {fx}/counts.h5ad --minutes 0 --out {out}",
        "--minutes must be positive",
    ),
    _row("quickstart-unknown-key", "quickstart --out {out} model.n_layer=2", "unknown config key 'model.n_layer'"),
    _row("synthetic-zero-cells", "synthetic --cells 0 --out {out}.h5ad", "--cells, --cell-types and --donors"),
    _row(
        "synthetic-census-negative-library",
        "synthetic-census --cells 10 --genes 20 --datasets 1 --median-library -5 --out {out}",
        "positive --median-library",
    ),
    # --- bench, profile ---
    _row(
        "bench-loader-zero-cells", "bench loader --cells 0 --genes 10 --dir {out}", "--cells, --genes and --batch-size"
    ),
    _row("bench-loader-missing-uri", "bench loader --uri {fx}/absent --dir {out}", "is not a folder"),
    _row("bench-step-unknown-model", "bench step --models vae-XL --dir {out}", "unknown sizes/strategies ['vae-XL']"),
    _row("bench-step-zero-processes", "bench step --nproc 0 --dir {out}", "--nproc, --global-batch and --steps"),
    _row("bench-kernels-unknown-op", "bench kernels --ops softmax --json {out}.json", "ops must be among"),
    _row("profile-kernels-zero-reps", "profile-kernels --reps 0 --out {out}", "reps >= 1"),
]


def _counts(n_cells: int = 60, n_genes: int = 20, seed: int = 0) -> ad.AnnData:
    """Poisson counts with one mean profile per cell type (obs cell_type), every cell non-empty."""
    rng = np.random.default_rng(seed)
    types = np.arange(n_cells) % len(TYPES)
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=(len(TYPES), n_genes))[types]) + np.eye(n_cells, n_genes)
    obs = pd.DataFrame({"cell_type": [TYPES[t] for t in types]}, index=[f"cell_{i}" for i in range(n_cells)])
    return ad.AnnData(
        sp.csr_matrix(counts, dtype=np.float32), obs, pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    )


def _models(adata: ad.AnnData, folder: Path) -> None:
    """An untrained tiny vae-model and ldm-model on adata's genes and cell types (refusals need no training)."""
    torch.manual_seed(0)
    genes = adata.var_names.tolist()
    labels = adata.obs["cell_type"].to_numpy()
    cfg = VAEConfig(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8)
    vae = VAEArtifact(
        config=cfg,
        genes=GeneVocabulary(genes, genes),
        encoders={"cell_type": LabelEncoder.fit("cell_type", labels)},
        library_size=LibrarySizeModel.fit(np.asarray(adata.X.sum(axis=1)).ravel(), {"cell_type": labels}),
        token_policy=TokenPolicy("expressed_plus_zeros", 3),
        weights=SetVAE(cfg, len(genes)).state_dict(),
        provenance=Provenance.collect("cells.h5ad", adata.n_obs, 1, "single"),
        training={},
    )
    vae.save(folder / "vae-model")
    prior = PriorConfig(d_model=16, n_heads=2, n_layers=1)
    n_classes = {"cell_type": len(TYPES)}
    LDMArtifact(
        vae=vae,
        prior_config=prior,
        n_classes=n_classes,
        latent_mean=torch.zeros(cfg.n_latent_tokens, cfg.latent_dim),
        latent_std=torch.ones(cfg.n_latent_tokens, cfg.latent_dim),
        prior_weights=DiT(prior, cfg.n_latent_tokens, cfg.latent_dim, n_classes).state_dict(),
        prior_ema_weights={},
    ).save(folder / "ldm-model")


def _inputs(folder: Path) -> Path:
    """Every input the rows read: good counts and one .h5ad per defect, two models and a .pt."""
    adata = _counts()
    adata.write_h5ad(folder / "counts.h5ad")
    adata[:0].copy().write_h5ad(folder / "empty.h5ad")
    adata[:, :10].copy().write_h5ad(folder / "fewer_genes.h5ad")
    nan = adata.copy()
    nan.obs["cell_type"] = nan.obs["cell_type"].where(np.arange(nan.n_obs) != 3)  # cell_3's label is NaN
    nan.write_h5ad(folder / "nan_labels.h5ad")
    negative = adata.copy()
    negative.X[0, 0] = -1
    negative.write_h5ad(folder / "negative.h5ad")
    lognorm = adata.copy()
    lognorm.X = lognorm.X.log1p()
    lognorm.layers["lognorm"] = lognorm.X.copy()
    lognorm.write_h5ad(folder / "lognorm.h5ad")
    published = adata.copy()  # the usual published layout: counts in .raw.X, log-normalised X
    published.raw = adata
    published.X = published.X.log1p()
    published.write_h5ad(folder / "raw_x.h5ad")
    _models(adata, folder)
    torch.save({"weights": torch.zeros(2)}, folder / "model.pt")
    whole = (folder / "counts.h5ad").read_bytes()
    (folder / "cut.h5ad").write_bytes(whole[: len(whole) // 2])  # as an interrupted download leaves it
    return folder


def _run(row: Row, fx: Path, base: Path) -> subprocess.CompletedProcess:
    tmp = base / row.id
    tmp.mkdir()
    for name in row.files:
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text(KEEP)
    for name in row.folders:
        (tmp / name).mkdir()
    argv = shlex.split(row.argv.format(fx=fx, tmp=tmp, out=tmp / "out"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "scldm_scale", *argv], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every selected row run once; (the folder holding each row's folder, {row id: its finished process})."""
    params = [getattr(item, "callspec", None) for item in request.session.items]
    # Only this module's rows: other modules parametrize a "row" of their own.
    rows = [p.params["row"] for p in params if p is not None and isinstance(p.params.get("row"), Row)]
    fx = _inputs(tmp_path_factory.mktemp("inputs"))
    base = tmp_path_factory.mktemp("rows")
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return base, dict(zip([r.id for r in rows], pool.map(lambda r: _run(r, fx, base), rows), strict=True))


def test_rows_are_named_once():
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(row: Row, runs):
    base, done = runs
    proc, tmp = done[row.id], base / row.id
    words = row.argv.split()
    command = " ".join(words[:2]) if words[0] == "bench" else words[0]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == row.rc, proc.stderr
    if row.rc == 2:
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"scldm-scale {command}: error: "), proc.stderr
        for fragment in row.message:
            assert fragment in line, line
        assert sorted(os.listdir(tmp)) == sorted({name.split("/")[0] for name in row.files + row.folders})
        for name in row.files:
            assert (tmp / name).read_text() == KEEP
    else:
        for fragment in row.message:
            assert fragment in proc.stdout, proc.stdout + proc.stderr
        assert "out" not in os.listdir(tmp)
    for name in row.folders:
        assert not os.listdir(tmp / name)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for word in name.split():
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        parser = choices[word]
    return parser


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_documents_every_option_and_what_it_does_when_left_out(name, capsys):
    parser = _subparser(cli.build_parser(name), name)
    formatter = cli.HelpFormatter(parser.prog)
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"
        help_text = formatter._get_help_string(action)
        shown = "%(default)s" in help_text or "default" in help_text
        # An option the formatter shows no default for (None, "", []) says itself what happens without it.
        if action.option_strings and action.nargs != 0 and not action.required:
            assert shown, f"{name}: {action.option_strings[0]} does not say its default: {action.help!r}"
    with pytest.raises(SystemExit) as exit_:
        cli.main([*name.split(), "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: scldm-scale {name}")


def test_ctrl_c_while_modules_load_is_one_line(monkeypatch, capsys):
    """torch and the command's module load inside main(): an interrupt there (seconds on a busy machine) is
    reported like one during the command, not as an import traceback."""

    def interrupted_import(argv, process_entry):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted_import)
    assert cli.main(["train", str(CONFIG)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["scldm-scale: interrupted (Ctrl-C)"]


def test_importing_the_cli_loads_no_torch():
    code = "import sys, scldm_scale.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _cli_process(patch: str, folder: Path) -> subprocess.CompletedProcess:
    """`scldm-scale train CONFIG` run as `python -m` (as `python -m scldm_scale` runs), with `patch` (Python,
    `cli` in scope) applied before main(); SIGINT's default disposition for the child even when pytest runs
    in the background with it ignored."""
    import signal

    (folder / "patched_cli.py").write_text(f"import sys\nfrom scldm_scale import cli\n{patch}\nsys.exit(cli.main())\n")
    return subprocess.run(
        [sys.executable, "-m", "patched_cli", "train", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_while_modules_load_is_acted_on_once_they_have(tmp_path):
    """Raised inside torch's or numpy's import, a KeyboardInterrupt could abort, hang or half-import them."""
    patch = """
import os, signal
load = cli._load
def interrupted_load(argv):
    os.kill(os.getpid(), signal.SIGINT)  # arrives while loading
    import torch  # noqa: F401
    print("loaded", flush=True)
    return load(argv)
cli._load = interrupted_load
"""
    done = _cli_process(patch, tmp_path)
    assert done.returncode == 130, done.stderr
    assert done.stdout == "loaded\n"  # the loading went on to its end
    assert done.stderr.strip().splitlines() == ["scldm-scale: interrupted (Ctrl-C)"]


def test_ctrl_c_inside_code_run_by_exec_still_exits_130(tmp_path):
    """CPython remembers an interrupt that passed through `exec` of a string (dataclasses build methods so) and
    kills a `python -m` process with SIGINT at the end of finalization, after main() returned 130; the CLI
    ends first."""
    patch = """
def interrupted_run(argv, process_entry):
    exec("import os, signal; os.kill(os.getpid(), signal.SIGINT); import time; time.sleep(5)")
cli._run = interrupted_run
"""
    done = _cli_process(patch, tmp_path)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["scldm-scale: interrupted (Ctrl-C)"]
    # without the CLI's ending, the same interrupt ends as a death by SIGINT
    plain = _cli_process(
        patch.replace("cli._run = interrupted_run", "cli._run = interrupted_run\ncli.end_process = sys.exit"), tmp_path
    )
    assert plain.returncode == -2, plain.returncode


def test_ctrl_c_soon_after_start_exits_130_without_traceback(tmp_path):
    import signal
    import time

    # SIGINT's default disposition for the child even when pytest runs in the background with it ignored
    proc = subprocess.Popen(
        [sys.executable, "-m", "scldm_scale", "train", str(CONFIG), "data.source=h5ad", f"train.ckpt_dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.5)  # the command's modules are still loading (their import takes seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted (Ctrl-C)"), err

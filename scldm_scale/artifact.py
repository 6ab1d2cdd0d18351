"""The exported model: the one thing `generate`, `embed`, `evaluate`, `classify` and other people read.

An artifact is a folder that loads without running any pickle:

    config.json         format + format_version, kind ("vae" or "ldm"), the model configs, the gene
                        vocabulary (ids and, where the data has them, names), the condition encoders, the
                        library-size model, how the encoder tokenises a cell, provenance, training history,
                        evaluation numbers; human-readable
    model.safetensors   the weights under plain module names: `vae.*`; an ldm adds `prior.*` (the weights as
                        trained), `prior_ema.*` (the EMA weights, used for sampling), the latent
                        standardisation `latent.mean` / `latent.std` and `library.weight`, the library
                        size's fit on the latent (models from before it lack it; generation says so)
    README.md           the model card

An ldm artifact holds its VAE, so generation needs nothing else. Weights that are one tensor under two
names (the decoder's gene embedding tied to the encoder's) are stored once and listed in config.json.
Training writes artifacts (and `scldm-scale export` from a training step folder); training checkpoints
(optimizer, RNG, loader state) stay torch/DCP files under the run's folder, read only by their own run.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scldm_scale.config import ConfigError, PriorConfig, VAEConfig, section_from_dict
from scldm_scale.data.batch import LabelEncoder, TokenPolicy
from scldm_scale.data.counts import DataError
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LatentLibrarySize, LibrarySizeModel
from scldm_scale.models.vae import SetVAE

FORMAT = "scldm-scale-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
KINDS = ("vae", "ldm")


class CheckpointError(ValueError):
    """A checkpoint or model artifact that cannot be used; the message says why and what to do."""


@dataclass
class Provenance:
    """Where a model comes from: enough to reproduce it or to judge whether it fits one's data."""

    data_uri: str | None = None
    cells_seen: int = 0
    steps: int = 0
    strategy: str = "single"
    package_version: str = "unknown"
    git_revision: str | None = None
    torch_version: str = ""
    created: str = ""

    @classmethod
    def collect(cls, data_uri: str | None, cells_seen: int, steps: int, strategy: str) -> Provenance:
        return cls(
            data_uri=data_uri,
            cells_seen=int(cells_seen),
            steps=int(steps),
            strategy=strategy,
            package_version=_package_version(),
            git_revision=_git_revision(),
            torch_version=torch.__version__,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    @classmethod
    def of_run(cls, config: dict, steps: int, world_size: int) -> Provenance:
        """The provenance of a training run from its resolved config (as a dict) and its step count."""
        data, train = config["data"], config["train"]
        source = data["uri"] or data["path"] or f"builtin:{data['builtin']}"
        if data["source"] == "census" and not data["uri"]:
            source = f"census:{data['census_version']}/{data['organism']}"
        global_batch = train["batch_size"] * train["grad_accum_steps"] * world_size
        return cls.collect(source, steps * global_batch, steps, train["strategy"])


@dataclass
class VAEArtifact:
    """A trained set VAE and everything needed to encode cells with it or decode latents into counts."""

    config: VAEConfig
    genes: GeneVocabulary
    encoders: dict[str, LabelEncoder]
    library_size: LibrarySizeModel
    token_policy: TokenPolicy
    weights: dict[str, torch.Tensor]  # SetVAE state dict, plain module names
    allow_non_integer: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    training: dict = field(default_factory=dict)  # {"config": resolved config, "history": [metrics records]}
    evaluation: dict = field(default_factory=dict)  # headline numbers of the run that produced it
    source: str | None = None  # the folder it was loaded from (not stored)

    kind = "vae"

    @property
    def vae(self) -> VAEArtifact:
        return self

    def build_vae(self, device: str | torch.device = "cpu") -> SetVAE:
        model = SetVAE(self.config, len(self.genes))
        _load_weights(model, self.weights, "VAE")
        return model.to(device).eval()

    def structure(self) -> SetVAE:
        """The VAE on the meta device: its parameter names, sizes and ties, without any memory."""
        with torch.device("meta"):
            return SetVAE(self.config, len(self.genes))

    def save(self, folder: str | Path) -> Path:
        return _write(self, folder)

    def trained(self, model_state: dict, ema_state: dict | None, **record) -> VAEArtifact:
        """This artifact with the weights of a trained SetVAE (and its provenance/training record). A state
        that names a tied tensor once (DeepSpeed's consolidation does) gets its other names back."""
        weights = _fp32(model_state)
        for alias, name in tied_names(self.structure()).items():
            if alias not in weights and name in weights:
                weights[alias] = weights[name]
        return replace(self, weights=weights, **record)

    def _sections(self) -> dict:
        return {
            "vae": {
                "config": json_ready(self.config.__dict__),
                "genes": self.genes.to_dict(),
                "conditions": {k: e.values for k, e in self.encoders.items()},
                "library_size": self.library_size.state_dict(),
                "token_policy": {
                    "gene_tokens": self.token_policy.mode,
                    "n_zero_tokens": self.token_policy.n_zero_tokens,
                },
                "allow_non_integer": self.allow_non_integer,
            }
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tied = tied_names(self.structure())
        return _prefixed("vae.", {k: v for k, v in self.weights.items() if k not in tied})

    def _ties(self) -> dict[str, str]:
        return {f"vae.{alias}": f"vae.{name}" for alias, name in tied_names(self.structure()).items()}

    @classmethod
    def _from(cls, sections: dict, tensors: dict[str, torch.Tensor], common: dict, where: str) -> VAEArtifact:
        vae = sections["vae"]
        policy = vae["token_policy"]
        return cls(
            config=section_from_dict(VAEConfig, vae["config"], f"{where} VAE config"),
            genes=GeneVocabulary.from_dict(vae["genes"]),
            encoders={k: LabelEncoder(k, values) for k, values in vae["conditions"].items()},
            library_size=LibrarySizeModel.from_state(vae["library_size"]),
            token_policy=TokenPolicy(policy["gene_tokens"], int(policy["n_zero_tokens"])),
            weights=_unprefixed("vae.", tensors),
            allow_non_integer=bool(vae.get("allow_non_integer", False)),
            **common,
        )


@dataclass
class LDMArtifact:
    """A latent diffusion model: its VAE, the DiT prior (and its EMA) and the latent standardisation."""

    vae: VAEArtifact
    prior_config: PriorConfig
    n_classes: dict[str, int]
    latent_mean: torch.Tensor  # (M, L)
    latent_std: torch.Tensor  # (M, L)
    prior_weights: dict[str, torch.Tensor]  # DiT state dict as trained
    prior_ema_weights: dict[str, torch.Tensor]  # DiT state dict of the EMA (empty when trained without one)
    library_from_latent: LatentLibrarySize | None = None  # None in models written before it existed
    provenance: Provenance = field(default_factory=Provenance)
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    source: str | None = None  # the folder it was loaded from (not stored)

    kind = "ldm"

    @property
    def guidance_mode(self) -> str:
        return "joint" if self.prior_config.cond_dropout == "joint" else "compositional"

    def build_vae(self, device: str | torch.device = "cpu") -> SetVAE:
        return self.vae.build_vae(device)

    def build_prior(self, device: str | torch.device = "cpu", use_ema: bool = True) -> DiT:
        """The DiT with its EMA weights (the ones to sample with), or the trained weights with use_ema=False."""
        cfg = self.vae.config
        dit = DiT(self.prior_config, cfg.n_latent_tokens, cfg.latent_dim, self.n_classes)
        weights = self.prior_ema_weights if use_ema and self.prior_ema_weights else self.prior_weights
        _load_weights(dit, weights, "prior")
        return dit.to(device).eval()

    def structure(self) -> DiT:
        """The DiT on the meta device (names and sizes, no memory)."""
        cfg = self.vae.config
        with torch.device("meta"):
            return DiT(self.prior_config, cfg.n_latent_tokens, cfg.latent_dim, self.n_classes)

    def save(self, folder: str | Path) -> Path:
        return _write(self, folder)

    def trained(self, model_state: dict, ema_state: dict | None, **record) -> LDMArtifact:
        """This artifact with the weights of a trained FlowMatchingPrior (its DiT is `dit.*`) and its EMA."""
        return replace(
            self,
            prior_weights=_fp32(_unprefixed("dit.", model_state)),
            prior_ema_weights=_fp32(_unprefixed("dit.", ema_state or {})),
            **record,
        )

    def _sections(self) -> dict:
        prior = {"config": json_ready(self.prior_config.__dict__), "n_classes": dict(self.n_classes)}
        if self.library_from_latent is not None:
            prior["library_from_latent"] = self.library_from_latent.state_dict()
        return {**self.vae._sections(), "prior": prior}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            **self.vae._tensors(),
            **_prefixed("prior.", self.prior_weights),
            **_prefixed("prior_ema.", self.prior_ema_weights),
            "latent.mean": self.latent_mean,
            "latent.std": self.latent_std,
            **({"library.weight": self.library_from_latent.weight} if self.library_from_latent is not None else {}),
        }

    def _ties(self) -> dict[str, str]:
        return self.vae._ties()  # the DiT shares no tensor between two names

    @classmethod
    def _from(cls, sections: dict, tensors: dict[str, torch.Tensor], common: dict, where: str) -> LDMArtifact:
        prior = sections["prior"]
        for name in ("latent.mean", "latent.std"):
            if name not in tensors:
                raise CheckpointError(f"{where}: {WEIGHTS_FILE} lacks {name!r}; export the model again")
        library_from_latent = None
        if "library_from_latent" in prior:
            if "library.weight" not in tensors:
                raise CheckpointError(
                    f"{where}: {CONFIG_FILE} has a library_from_latent fit but {WEIGHTS_FILE} lacks 'library.weight'; "
                    "export the model again"
                )
            if tensors["library.weight"].shape != tensors["latent.mean"].shape:
                raise CheckpointError(
                    f"{where}: 'library.weight' has shape {tuple(tensors['library.weight'].shape)}, the latent "
                    f"{tuple(tensors['latent.mean'].shape)}; export the model again"
                )
            library_from_latent = LatentLibrarySize.from_state(prior["library_from_latent"], tensors["library.weight"])
        return cls(
            vae=VAEArtifact._from(sections, tensors, {}, where),
            prior_config=section_from_dict(PriorConfig, prior["config"], f"{where} prior config"),
            n_classes={k: int(v) for k, v in prior["n_classes"].items()},
            latent_mean=tensors["latent.mean"],
            latent_std=tensors["latent.std"],
            library_from_latent=library_from_latent,
            prior_weights=_unprefixed("prior.", tensors),
            prior_ema_weights=_unprefixed("prior_ema.", tensors),
            **common,
        )


Artifact = VAEArtifact | LDMArtifact
_CLASSES = {"vae": VAEArtifact, "ldm": LDMArtifact}


def load(path: str | Path, kind: str | None = None) -> Artifact:
    """Read an artifact folder (json + safetensors only; nothing is unpickled), checked; `kind` ("vae" or
    "ldm") refuses the other kind. An ldm artifact's VAE is its `.vae`."""
    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(
            f"{folder} is a single file; models are artifact folders ({CONFIG_FILE} + {WEIGHTS_FILE}). If it is a "
            f".pt written by scldm-scale 0.1, convert it once: scldm-scale export --from-legacy {folder} --out DIR"
        )
    if not folder.is_dir():
        if _trash(folder).is_dir():
            raise CheckpointError(
                f"model {folder} does not exist, but an interrupted save left the previous model at "
                f"{_trash(folder)}; rename it to {folder.name} to use it"
            )
        raise CheckpointError(f"model {folder} does not exist; pass the folder `scldm-scale train` or `export` wrote")
    config = _read_config(folder)
    stored = config["kind"]
    if kind is not None and stored != kind:
        hint = {
            "vae": "pass the model written by `scldm-scale train ... stage=vae` (<ckpt_dir>/vae-model)",
            "ldm": "pass the model written by `scldm-scale train ... stage=ldm` (<ckpt_dir>/ldm-model, with its VAE)",
        }[kind]
        raise CheckpointError(f"{folder} is a {stored!r} model, expected {kind!r}: {hint}")
    try:
        tensors = load_file(folder / WEIGHTS_FILE)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is missing or corrupt ({err}); export it again") from None
    return replace(from_parts(config, tensors, str(folder)), source=str(folder))


def to_parts(artifact: Artifact) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's content, the tensors of model.safetensors) of an artifact: what `save` writes and
    what a training step folder keeps, with the weights trained so far, for `scldm-scale export`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in artifact._tensors().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": artifact.kind,
        **artifact._sections(),
        "tied_weights": artifact._ties(),
        "provenance": json_ready(artifact.provenance.__dict__),
        "training": json_ready(artifact.training),
        "evaluation": json_ready(artifact.evaluation),
    }
    return config, tensors


def from_parts(config: dict, tensors: dict[str, torch.Tensor], where: str) -> Artifact:
    """The artifact of `to_parts`' output (`where` names it in errors)."""
    tensors = dict(tensors)
    for alias, source in config.get("tied_weights", {}).items():
        if source in tensors:  # absent in a step folder's parts (no weights yet); building the model checks
            tensors[alias] = tensors[source]
    try:
        common = {
            "provenance": Provenance(**config.get("provenance", {})),
            "training": config.get("training", {}),
            "evaluation": config.get("evaluation", {}),
        }
        return _CLASSES[config["kind"]]._from(config, tensors, common, where)
    except (ConfigError, DataError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{where}: {CONFIG_FILE} lacks or misstates {err}; export the model again") from None


def record_evaluation(path: str | Path, evaluation: dict) -> None:
    """Add evaluation numbers to an artifact's config.json and model card (atomically, file by file)."""
    folder = Path(path)
    config = _read_config(folder)
    config["evaluation"] = json_ready(evaluation)
    _replace_file(folder / CONFIG_FILE, json.dumps(config, indent=1, allow_nan=False).encode())
    artifact = load(folder)
    _replace_file(folder / CARD_FILE, model_card(artifact, folder.name).encode())


def model_card(artifact: Artifact, name: str) -> str:
    """The README.md beside the weights: what the model is, what it was trained on, how to use it."""
    vae = artifact.vae
    p = artifact.provenance
    n_vae = sum(p.numel() for p in vae.structure().parameters())  # each tied parameter once
    lines = [
        f"# {name}: scLDM {'latent diffusion model' if artifact.kind == 'ldm' else 'VAE'} (scldm-scale)",
        "",
        "| | |",
        "|---|---|",
        f"| kind | `{artifact.kind}` (format {FORMAT} v{FORMAT_VERSION}) |",
        f"| VAE | {n_vae / 1e6:.2f}M parameters; d_model {vae.config.d_model}, {vae.config.n_layers} layers, "
        f"{vae.config.n_latent_tokens} latent tokens x {vae.config.latent_dim}, {vae.config.likelihood} likelihood |",
    ]
    if isinstance(artifact, LDMArtifact):
        n_prior = sum(p.numel() for p in artifact.structure().parameters())
        cfg = artifact.prior_config
        lines.append(
            f"| prior | DiT, {n_prior / 1e6:.2f}M parameters; d_model {cfg.d_model}, {cfg.n_layers} layers; "
            f"{artifact.guidance_mode} guidance |"
        )
        fit = artifact.library_from_latent
        lines.append(
            f"| library size | drawn given the latent: leave-one-out R^2 {fit.loo_r2:.2f} of log library size, "
            f"residual sd {fit.std:.3f} ({fit.n_cells} training cells) |"
            if fit is not None
            else "| library size | per-condition log-normal (no fit on the latent: a model from before it existed) |"
        )
    genes = ", ".join(vae.genes.ids[:5]) + (", ..." if len(vae.genes) > 5 else "")
    named = " (ids and names)" if vae.genes.names is not None else " (ids)"
    lines += [
        f"| genes | {len(vae.genes)}{named}: {genes} |",
        f"| conditions | {', '.join(f'{k} ({len(e.values)} values)' for k, e in vae.encoders.items()) or 'none'} |",
        f"| encoder tokens | {vae.token_policy.mode} |",
        f"| trained on | `{p.data_uri}`: {p.steps} steps, {p.cells_seen} cells seen, train.strategy={p.strategy} |",
        f"| software | scldm-scale {p.package_version} (git {p.git_revision or 'unknown'}), "
        f"torch {p.torch_version or 'unknown'} |",
        f"| created | {p.created or 'unknown'} |",
        "",
    ]
    if artifact.evaluation:
        lines += ["## Evaluation of the run that produced it", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in artifact.evaluation.items()]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "import scldm_scale",
        f'model = scldm_scale.load_model("{name}")',
        'adata = scldm_scale.embed_cells(model, adata)  # raw counts in X; adds obsm["X_scldm"]',
    ]
    if isinstance(artifact, LDMArtifact) and vae.encoders:
        key = next(iter(vae.encoders))
        value = vae.encoders[key].values[0]
        lines.append(f'cells = scldm_scale.generate_cells(model, {{"{key}": "{value}"}}, n_cells=100)')
    lines += [
        "```",
        "",
        f"Files: `{CONFIG_FILE}` (configs, vocabulary, encoders, provenance), `{WEIGHTS_FILE}` (weights). Loading "
        "runs no pickle.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {CONFIG_FILE}: not a model artifact folder (pass the folder `scldm-scale train` or "
            "`export` wrote; a training step folder is exported with `scldm-scale export STEP_FOLDER --out DIR`)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is unreadable ({err}); export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a scldm-scale model config (format != {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} is in model format version {config.get('format_version')}, but this scldm-scale "
            f"({_package_version()}) reads version {FORMAT_VERSION}; use a matching scldm-scale release"
        )
    if config.get("kind") not in KINDS:
        raise CheckpointError(f"{folder / CONFIG_FILE}: kind {config.get('kind')!r} is not one of {KINDS}")
    return config


def _write(artifact: Artifact, folder: str | Path) -> Path:
    """Write the artifact to a temporary sibling folder, fsync it, then put it in place of `folder`."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or _is_ours(folder))):
        raise CheckpointError(f"{folder} exists and is not a scldm-scale model; pick another output path")
    config, tensors = to_parts(artifact)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT, "kind": artifact.kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, allow_nan=False))
        (tmp / CARD_FILE).write_text(model_card(artifact, folder.name))
        umask = _umask()
        for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
            os.chmod(tmp / name, 0o666 & ~umask)
            _fsync(tmp / name)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        # An old model is renamed aside, then the new one renamed in: the path never holds a partial model.
        trash = _trash(folder)
        if folder.exists():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(folder, trash)
        os.replace(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def _trash(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.trash")


def _is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{alias: name} for each state-dict entry that is the same tensor as an earlier one (a tied weight, as
    the model defines it), so it is stored once and its other names restored on loading."""
    first: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"the {what} weights do not match the stored {what} config: {err}") from None


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exported weights are fp32 whatever the training precision (bf16 holds integers only up to 256)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def json_ready(value):
    """JSON-ready containers: numpy scalars to Python values, tuples to lists, NaN and inf (a diverged loss)
    to None, which standard JSON can hold; tensors are left alone."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (after renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _package_version() -> str:
    try:
        return importlib.metadata.version("scldm-scale")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_revision() -> str | None:
    """The checkout's commit (with `+dirty` when it has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+dirty" if dirty else rev

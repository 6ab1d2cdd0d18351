"""outputs.py: writability checks, the existing-output rule, staged writes and stale partials; cli.main's
report of errors (one line, exit codes, --debug)."""

import errno
import os
import socket
from pathlib import Path

import h5py
import pytest
from scldm_test_helpers import dead_pid

from scldm_scale import cli, outputs
from scldm_scale.config import CONFIG_DIR, ConfigError
from scldm_scale.data.counts import DataError
from scldm_scale.outputs import check_writable, claim_output, remove_stale_partials, staged

CONFIG = CONFIG_DIR / "quickstart.yaml"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- check_writable -------------------------------------------------------------------------------------


def test_a_path_below_a_file_is_refused_and_nothing_is_created(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write the model at .*notes.txt/a/b: .*notes.txt is a file, not a"):
        check_writable(tmp_path / "notes.txt" / "a" / "b", "the model", "--out")
    assert _entries(tmp_path) == ["notes.txt"]


def test_a_new_deep_path_is_writable_and_the_check_creates_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b" / "out.h5ad", "the .h5ad", "--out")
    check_writable(tmp_path, "the folder", "--out")
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EROFS, "is on a read-only file system"),
        (errno.EACCES, "no permission to create files in"),
        (errno.ENOSPC, "no space left on the device of"),
    ],
)
def test_the_system_refusal_is_named_with_the_flag_to_change(tmp_path, monkeypatch, code, reason):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(
        ConfigError, match=f"^cannot write the checkpoint folder at .*run: .*{reason}.*; choose another train"
    ):
        check_writable(tmp_path / "run", "the checkpoint folder", "train.ckpt_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="no permission to create files in"):
        check_writable(locked / "out", "the folder", "--out")


# --- claim_output ---------------------------------------------------------------------------------------


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text("{}")
    (tmp_path / "cells.h5ad").write_text("x")
    with pytest.raises(ConfigError, match="report already exists .*; choose another --out, pass --overwrite"):
        claim_output(tmp_path / "report", "the report folder", "--out", overwrite=False, folder=True)
    with pytest.raises(ConfigError, match="cells.h5ad already exists .*non-empty file"):
        claim_output(tmp_path / "cells.h5ad", "the .h5ad", "--out", overwrite=False, folder=False)
    claim_output(tmp_path / "report", "the report folder", "--out", overwrite=True, folder=True)
    claim_output(tmp_path / "cells.h5ad", "the .h5ad", "--out", overwrite=True, folder=False)
    assert (tmp_path / "report" / "metrics.json").read_text() == "{}"  # claiming removes nothing


def test_an_empty_folder_counts_as_absent(tmp_path):
    (tmp_path / "out").mkdir()
    claim_output(tmp_path / "out", "the report folder", "--out", overwrite=False, folder=True)


def test_a_file_never_replaces_a_folder_nor_a_folder_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "cells.soma").write_text("x")
    with pytest.raises(ConfigError, match="out: it is a folder; give --out a file path"):
        claim_output(tmp_path / "out", "the .h5ad", "--out", overwrite=True, folder=False)
    with pytest.raises(ConfigError, match="cells.soma: a file of that name exists"):
        claim_output(tmp_path / "cells.soma", "the experiment", "--out", overwrite=True, folder=True)


# --- staged ---------------------------------------------------------------------------------------------


def test_a_staged_output_appears_only_when_complete_and_replaces_the_old_one(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with staged(tmp_path / "out") as target:
        assert target.parent.name.startswith(".out.") and target.parent.name.endswith(".partial")
        target.mkdir()
        (target / "new.txt").write_text("new")
        assert (tmp_path / "out" / "old.txt").exists()
    assert _entries(tmp_path) == ["out"]
    assert _entries(tmp_path / "out") == ["new.txt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_the_old_output_and_nothing_else(tmp_path, error):
    (tmp_path / "cells.h5ad").write_text("old")
    with pytest.raises(type(error)):
        with staged(tmp_path / "cells.h5ad") as target:
            target.write_text("half")
            raise error
    assert _entries(tmp_path) == ["cells.h5ad"]
    assert (tmp_path / "cells.h5ad").read_text() == "old"


def test_folders_made_for_a_failed_output_are_removed_and_kept_for_a_finished_one(tmp_path):
    with pytest.raises(RuntimeError):
        with staged(tmp_path / "a" / "b" / "cells.h5ad") as target:
            target.write_text("half")
            raise RuntimeError
    assert _entries(tmp_path) == []
    with staged(tmp_path / "a" / "b" / "cells.h5ad") as target:
        target.write_text("whole")
    assert (tmp_path / "a" / "b" / "cells.h5ad").read_text() == "whole"
    assert _entries(tmp_path / "a" / "b") == ["cells.h5ad"]


def test_an_output_never_written_is_an_error_not_a_silent_success(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with staged(tmp_path / "out.json"):
            pass
    assert _entries(tmp_path) == []


def test_only_the_partials_of_gone_writers_are_removed(tmp_path, caplog):
    host = socket.gethostname()
    partials = {
        "dead": (f"{host} {dead_pid()}", True),
        "alive": (f"{host} {os.getpid()}", False),
        "other-host": (f"{host}-elsewhere 1", False),
        "unowned-new": (None, False),
        "unowned-old": (None, True),
    }
    for name, (owner, _) in partials.items():
        folder = tmp_path / f".cells.soma.{name}.partial"
        folder.mkdir()
        if owner is not None:
            (folder / outputs.OWNER_FILE).write_text(owner + "\n")
    old = tmp_path / ".cells.soma.unowned-old.partial"
    os.utime(old, (0, 0))
    (tmp_path / ".other.soma.x.partial").mkdir()  # another output's partial is not looked at
    with caplog.at_level("WARNING"):
        removed = remove_stale_partials(tmp_path / "cells.soma")
    expected = {f".cells.soma.{name}.partial" for name, (_, stale) in partials.items() if stale}
    assert {p.name for p in removed} == expected
    assert not any((tmp_path / name).exists() for name in expected)
    assert (tmp_path / ".other.soma.x.partial").exists()
    assert caplog.text.count("left unfinished by an interrupted run") == 2


# --- cli.main: one line per error, a report for a bug, --debug --------------------------------------------


def _command_raising(monkeypatch, error: BaseException) -> None:
    """`scldm-scale synthetic` with its handler replaced by one that raises `error`."""

    def handle(args):
        raise error

    monkeypatch.setattr("scldm_scale.data.synthetic.handle", handle)


def test_a_refusal_is_one_line_and_exit_2(monkeypatch, capsys):
    _command_raising(monkeypatch, ConfigError("--cells must be positive"))
    assert cli.main(["synthetic", "--out", "x.h5ad"]) == 2
    err = capsys.readouterr().err
    assert err == "scldm-scale synthetic: error: --cells must be positive\n"


def test_debug_shows_the_traceback_of_a_refusal_before_or_after_the_command(monkeypatch, capsys):
    _command_raising(monkeypatch, ConfigError("--cells must be positive"))
    for argv in (["--debug", "synthetic", "--out", "x.h5ad"], ["synthetic", "--out", "x.h5ad", "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.endswith("scldm-scale synthetic: error: --cells must be positive\n")


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    _command_raising(monkeypatch, TypeError("unsupported operand"))
    assert cli.main(["synthetic", "--out", "x.h5ad"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("scldm-scale synthetic: internal error: TypeError: unsupported operand")
    assert "please report it" in last


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    _command_raising(monkeypatch, KeyboardInterrupt())
    assert cli.main(["synthetic", "--out", "x.h5ad"]) == 130
    assert capsys.readouterr().err == "scldm-scale synthetic: interrupted (Ctrl-C)\n"


def test_a_full_disk_is_one_line_not_a_bug(monkeypatch, capsys):
    _command_raising(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert cli.main(["synthetic", "--out", "x.h5ad"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device; free space" in err


# --- every command: outputs refused at the start, nothing created, existing files untouched ---------------


def _refused(argv: list[str], message: str, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    return err


@pytest.fixture
def desk(tmp_path) -> Path:
    """A folder with a regular file (a path below it cannot be created) and an earlier output of each kind."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "old.h5ad").write_text("earlier cells")
    (tmp_path / "old_report").mkdir()
    (tmp_path / "old_report" / "metrics.json").write_text("[]")
    (tmp_path / "old_report" / "classify.json").write_text("{}")
    return tmp_path


def _untouched(desk: Path) -> None:
    assert _entries(desk) == ["notes.txt", "old.h5ad", "old_report"]
    assert (desk / "old.h5ad").read_text() == "earlier cells"
    assert _entries(desk / "old_report") == ["classify.json", "metrics.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # An existing output, refused before the model or the data is read (neither exists here).
        (["generate", "MODEL", "--n-cells", "5", "--out", "{d}/old.h5ad"], "already exists (a non-empty file)"),
        (["embed", "MODEL", "cells.h5ad", "--out", "{d}/old.h5ad"], "--out, pass --overwrite"),
        (["synthetic", "--out", "{d}/old.h5ad", "--genes", "10"], "already exists"),
        (["evaluate", "--real", "r.h5ad", "--generated", "g.h5ad", "--out", "{d}/old_report"], "already exists"),
        (["classify", "MODEL", "cells.h5ad", "--label-key", "t", "--out", "{d}/old_report"], "already exists"),
        (["export", "x.pt", "--from-legacy", "--out", "{d}/old_report"], "already exists"),
        (["prepare", "cells.h5ad", "--out", "{d}/old_report"], "or --append to add these cells"),
        (["quickstart", "--out", "{d}/old_report"], "already exists"),
        (["synthetic-census", "--out", "{d}/old_report"], "already exists"),
        (["plan", str(CONFIG), "--json", "{d}/old.h5ad"], "the plan"),
        (["profile-kernels", "--out", "{d}/old_report"], "already exists"),
        (["bench", "kernels", "--json", "{d}/old.h5ad"], "the records file"),
        (["bench", "step", "--json", "{d}/old.h5ad"], "the records file"),
        (["bench", "loader", "--json", "{d}/old.h5ad"], "the records file"),
        # A path that cannot be created: a regular file on the way.
        (["generate", "MODEL", "--n-cells", "5", "--out", "{d}/notes.txt/x.h5ad"], "notes.txt is a file, not a folder"),
        (["evaluate", "--real", "r.h5ad", "--generated", "g.h5ad", "--out", "{d}/notes.txt/r"], "is a file, not a"),
        (["prepare", "cells.h5ad", "--out", "{d}/notes.txt/cells.soma"], "is a file, not a folder"),
        (["bench", "loader", "--json", "{d}/notes.txt/b.json"], "is a file, not a folder"),
        (["train", str(CONFIG), "train.ckpt_dir={d}/notes.txt/run"], "cannot write the checkpoint folder"),
        (["train", str(CONFIG), "train.metrics_file={d}/notes.txt/m.jsonl", "train.ckpt_dir={d}/run"], "metrics file"),
        # A model given to evaluate is read before the metrics are computed (and before the cells are read).
        (["evaluate", "--real", "r", "--generated", "g", "--out", "{d}/r", "--vae-checkpoint", "{d}"], "config.json"),
        # The other kind of thing at the output.
        (["generate", "MODEL", "--n-cells", "5", "--out", "{d}/old_report", "--overwrite"], "it is a folder"),
        (
            ["evaluate", "--real", "r", "--generated", "g", "--out", "{d}/old.h5ad", "--overwrite"],
            "a file of that name",
        ),
        # --overwrite replaces only an earlier output of the same command, never a folder of other files.
        (
            ["prepare", "cells.h5ad", "--out", "{d}/old_report", "--overwrite"],
            "is not a SOMA experiment (it has no ms)",
        ),
        (["export", "x.pt", "--from-legacy", "--out", "{d}/old_report", "--overwrite"], "has no config.json"),
        (["quickstart", "--out", "{d}/old_report", "--overwrite"], "is not a quickstart folder"),
    ],
)
def test_an_output_is_refused_before_any_work_and_nothing_changes(argv, message, desk, capsys):
    _refused([arg.replace("{d}", str(desk)) for arg in argv], message, capsys)
    _untouched(desk)


def test_train_refuses_to_start_afresh_over_an_earlier_run(desk, capsys):
    (desk / "run" / "vae-model").mkdir(parents=True)
    (desk / "run" / "vae-model" / "config.json").write_text("{}")
    argv = ["train", str(CONFIG), f"train.ckpt_dir={desk / 'run'}", "data.path=missing.h5ad", "data.source=h5ad"]
    _refused(argv, "holds an earlier run's model", capsys)
    assert "continue that run with train.resume=auto" in _refused(argv, "--overwrite to replace them", capsys)
    # Resuming into it is the point of a run folder: it passes the check and reaches the (missing) data.
    _refused([*argv, "train.resume=auto"], "missing.h5ad does not exist", capsys)


def test_a_failure_after_the_check_leaves_no_output_and_no_folder(desk, capsys):
    out = desk / "new" / "deeper" / "cells.h5ad"
    _refused(["generate", str(desk / "no-model"), "--n-cells", "5", "--out", str(out)], "no-model", capsys)
    _refused(
        ["evaluate", "--real", str(desk / "old.h5ad"), "--generated", "g.h5ad", "--out", str(out)], "old.h5ad", capsys
    )
    _untouched(desk)


def test_a_damaged_h5ad_is_one_line_in_evaluate_and_embed(desk, capsys):
    from scldm_scale.evaluate.embed import open_counts

    damaged = desk / "old.h5ad"  # text, not HDF5: as a truncated download reads
    message = "cannot read as an .h5ad"
    _refused(
        ["evaluate", "--real", str(damaged), "--generated", str(damaged), "--out", str(desk / "r")], message, capsys
    )
    with pytest.raises(DataError, match="old.h5ad: cannot read as an .h5ad .*copy it again"):
        open_counts(damaged, ["gene_0"])
    foreign = desk / "new" / "foreign.h5ad"  # HDF5, but not an AnnData
    foreign.parent.mkdir()
    with h5py.File(foreign, "w") as f:
        f["a"] = [1, 2]
    with pytest.raises(DataError, match=r"cannot read as an .h5ad \(no obs and var groups; .* \['a'\]\)"):
        open_counts(foreign, ["gene_0"])
    _refused(
        ["evaluate", "--real", str(foreign), "--generated", str(foreign), "--out", str(desk / "r")], message, capsys
    )
    foreign.unlink()
    foreign.parent.rmdir()
    _untouched(desk)


def test_train_overwrite_deletes_the_earlier_checkpoints_of_the_stage_only(tmp_path):
    from scldm_scale.config import load_config
    from scldm_scale.train.checkpoint import COMPLETE
    from scldm_scale.train.stages import preflight

    for stage in ("vae", "ldm"):
        (tmp_path / stage / "step-3").mkdir(parents=True)
        (tmp_path / stage / "step-3" / COMPLETE).write_text("3\n")
    cfg = load_config(CONFIG, [f"train.ckpt_dir={tmp_path}", "logging.wandb.mode=disabled"])
    with pytest.raises(ConfigError, match=r"holds an earlier run's checkpoints of stage=vae \(.*step-3\)"):
        preflight(cfg, overwrite=False)
    preflight(load_config(CONFIG, [f"train.ckpt_dir={tmp_path}", "train.resume=auto"]), overwrite=False)
    assert _entries(tmp_path) == ["ldm", "vae"]
    preflight(cfg, overwrite=True)
    assert _entries(tmp_path) == ["ldm"]


def test_train_overwrite_leaves_the_earlier_run_to_rank_0(tmp_path, monkeypatch):
    """Under torchrun, rank 0 deletes the earlier checkpoints while the other ranks pass their pre-flight:
    they must not read the folder being deleted."""
    from scldm_scale.config import load_config
    from scldm_scale.train import stages
    from scldm_scale.train.checkpoint import COMPLETE, RunCheckpoints

    (tmp_path / "vae" / "step-3").mkdir(parents=True)
    (tmp_path / "vae" / "step-3" / COMPLETE).write_text("3\n")
    cfg = load_config(CONFIG, [f"train.ckpt_dir={tmp_path}", "logging.wandb.mode=disabled"])

    def deleted_meanwhile(self):
        raise FileNotFoundError(self.root / "LATEST")

    monkeypatch.setattr(RunCheckpoints, "latest", deleted_meanwhile)
    monkeypatch.setattr(stages, "get_rank", lambda: 1)
    stages.preflight(cfg, overwrite=True)  # rank 1 leaves the folder to rank 0
    assert _entries(tmp_path) == ["vae"]
    with pytest.raises(FileNotFoundError):  # without --overwrite every rank checks (nothing is deleted then)
        stages.preflight(cfg, overwrite=False)

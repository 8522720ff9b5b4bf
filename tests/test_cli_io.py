"""The command line's edges (issue 8 §2, §4, §5): output folders checked before any work,
non-finite numbers refused, closed or full stdout, temporary files, worker processes,
a run's file set, 80-column tables, --version/-h and what results.json records."""

import errno
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import medfed.experiments.harness as harness
import medfed.experiments.report as report
from medfed.cli.app import app, render_methods, render_table
from medfed.cli.audit import render_audit

runner = CliRunner()
TINY = ["--repeats", "1"]
RUN_TINY = ["--methods", "fedavg", "--rounds", "2", "--local-steps", "1", "--repeats", "1"]
NUMBER = re.compile(r"-?\d+\.\d+")


def invoke(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def one_line_error(code, text, *needles):
    assert code == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture
def no_work(monkeypatch):
    """Any data loading means the check came too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("data loaded before the output folder was checked")

    monkeypatch.setattr(harness, "load_federation", refuse)


def _bad_outs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    return {"file": (str(afile), "is a file"), "under-a-file": (str(afile / "sub"), "is a file"),
            "dangling-symlink": (str(dangling), "does not exist"), "empty": ("", "empty")}


OUT_CASES = ["file", "under-a-file", "dangling-symlink", "empty"]
COMMANDS = {
    "reproduce": ["reproduce", *TINY],
    "run": ["run", "--dataset", "adni-like", *RUN_TINY],
    "audit": ["audit", "robustness", "--dataset", "breast-cancer", "--attack", "sign_flip", "--repeats", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", OUT_CASES)
def test_unusable_out_is_one_line_before_any_work(tmp_path, no_work, command, case):
    out, needle = _bad_outs(tmp_path)[case]
    code, text = invoke([*COMMANDS[command], "--out", out])
    one_line_error(code, text, "--out", needle)


def test_features_roi_out_is_checked_before_reading_anything(tmp_path):
    missing = tmp_path / "no-manifest.csv"  # read only after the output check
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "link.parquet").symlink_to(tmp_path / "nowhere.parquet")
    for out, needle in ((tmp_path / "afile" / "t.parquet", "is a file"), (tmp_path / "link.parquet", "does not")):
        code, text = invoke(["features", "roi", "--manifest", str(missing), "--atlas", str(missing), "--out", str(out)])
        one_line_error(code, text, "--out", needle)


def test_not_writable_out_is_refused(tmp_path, no_work, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: deny as a read-only mount would
        real = os.access
        def access(path, mode, **kw):
            return False if locked in (Path(path), *Path(path).parents) else real(path, mode, **kw)
        monkeypatch.setattr(os, "access", access)
    try:
        code, text = invoke(["reproduce", *TINY, "--out", str(locked)])
        one_line_error(code, text, "--out", "not writable")
        code, text = invoke(["reproduce", *TINY, "--out", str(locked / "new")])
        one_line_error(code, text, "--out", "permission denied")
        assert not (locked / "new").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "fault,needle",
    [("erofs", "read-only"), ("enospc-fsync", "full"), ("statvfs-full", "full")],
)
def test_read_only_or_full_file_system_is_refused(tmp_path, no_work, monkeypatch, fault, needle):
    target = tmp_path / "out"
    real_open, real_statvfs = os.open, os.statvfs
    if fault == "erofs":
        def fake_open(path, flags, *args, **kwargs):
            if Path(path).parent == target:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", fake_open)
    elif fault == "enospc-fsync":
        def fake_fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", fake_fsync)
    else:
        class Full:
            f_bavail, f_frsize = 0, 4096
        monkeypatch.setattr(os, "statvfs", lambda p: Full() if Path(p) == target else real_statvfs(p))
    code, text = invoke(["reproduce", *TINY, "--out", str(target)])
    one_line_error(code, text, "--out", needle)
    assert not target.exists()  # the folder this run made is removed again


def test_results_that_cannot_be_written_at_the_end_give_status_4_and_no_files(tmp_path, monkeypatch):
    real = report._write_synced

    def disk_fills(path, data):
        if "results.csv" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(report, "_write_synced", disk_fills)
    out = tmp_path / "o"
    code, text = invoke(["run", "--dataset", "adni-like", *RUN_TINY, "--out", str(out)])
    assert code == 4 and "Traceback" not in text and "full" in text and "no result file" in text, text
    assert not out.exists()


NON_FINITE = [
    (["--lr", "inf"], "training.lr", "--lr"),
    (["--l2", "inf"], "training.l2", "--l2"),
    (["--max-update-norm", "nan"], "training.max_update_norm", "--max-update-norm"),
    (["--methods", "fedprox", "--mu", "nan"], "method_options.fedprox.mu", "--mu"),
    (["--method-option", "fedprox.mu=inf"], "method_options.fedprox.mu", "--method-option fedprox.mu"),
    (["--model-option", "eval_batch=-inf"], "model_options.eval_batch", "--model-option eval_batch"),
    (["--dataset-option", "seed=nan"], "data.options.seed", "--dataset-option seed"),
]


@pytest.mark.parametrize("flags,key,flag", NON_FINITE, ids=[k for _, k, _ in NON_FINITE])
def test_non_finite_flags_are_refused_naming_key_and_flag(tmp_path, no_work, flags, key, flag):
    args = ["run", "--dataset", "adni-like", "--rounds", "2", *flags, "--out", str(tmp_path / "o")]
    if "--methods" not in flags:
        args += ["--methods", "fedavg,fedprox"]
    code, text = invoke(args)
    one_line_error(code, text, key, flag, "finite")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("toml,key", [
    ("[training]\nlr = inf\n", "training.lr (--lr)"),
    ("[method_options.fedprox]\nmu = nan\n", "method_options.fedprox.mu"),
    ("[pipelines.p]\nsteps = [{ step = \"trimmed_mean\", beta = inf }]\n", "pipelines.p.steps.0.beta"),
])
def test_non_finite_config_values_are_refused(tmp_path, no_work, toml, key):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('methods = ["fedavg", "fedprox"]\n[data]\ndataset = "adni-like"\n' + toml)
    code, text = invoke(["run", str(cfg), "--out", str(tmp_path / "o")])
    one_line_error(code, text, "exp.toml", key, "finite")


def test_config_file_that_is_not_utf8_or_is_a_directory(tmp_path):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes('[data]\ndataset = "adni-like"\n# Zürich\n'.encode("latin-1"))
    code, text = invoke(["run", str(cfg), "--out", str(tmp_path / "o")])
    one_line_error(code, text, "latin1.toml", "UTF-8", "line 3")
    folder = tmp_path / "conf.toml"
    folder.mkdir()
    code, text = invoke(["run", str(folder), "--out", str(tmp_path / "o")])
    one_line_error(code, text, "conf.toml", "is a directory")


def _medfed(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "medfed.cli.app", *args], text=True, timeout=120, **kwargs)


def test_closed_stdout_after_a_completed_run_is_status_3_with_results_written(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the table is printed: `| head -1` at its worst
    try:
        proc = _medfed(["reproduce", *TINY, "--out", str(tmp_path / "p")], stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "result files are complete" in proc.stderr
    assert json.loads((tmp_path / "p" / "results.json").read_text())["dataset"] == "adni-like"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux's")
def test_full_stdout_is_status_3_with_results_written(tmp_path):
    with open("/dev/full", "w") as full:
        proc = _medfed(["reproduce", *TINY, "--out", str(tmp_path / "f")], stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "No space left" in proc.stderr
    assert (tmp_path / "f" / "results.csv").exists()


def test_stray_temp_files_of_dead_runs_are_removed_and_none_are_left(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        strays = [out / f".results.json.tmp-{dead.pid}", out / f".roc_A.png.tmp-{dead.pid}"]
        kept = [out / f".results.json.tmp-{alive.pid}", out / f".notes.tmp-{dead.pid}", out / "mine.tmp-1"]
        for p in strays + kept:
            p.write_text("x")
        code, text = invoke(["run", "--dataset", "adni-like", *RUN_TINY, "--out", str(out)])
        assert code == 0, text
        assert not any(p.exists() for p in strays)
        assert all(p.exists() for p in kept)
        assert {p.name for p in out.glob(".*tmp-*")} == {kept[0].name, kept[1].name}
    finally:
        alive.kill()
        alive.wait()


def test_sigterm_during_training_leaves_no_folder_and_no_temp_files(tmp_path):
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "medfed.cli.app", "run", "--dataset", "adni-like", "--rounds",
                             "100000", "--repeats", "1", "--methods", "fedavg", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # checked, now training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not out.exists()


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its entry waits for a reaper


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli.app", "run", "--dataset", "adni-like", "--workers", "2", "--repeats", "2",
         "--rounds", "100000", "--methods", "fedavg", "--out", str(tmp_path / "w")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = _children(parent.pid)
            time.sleep(0.1)
        assert len(workers) >= 2, "the pool's workers never started"
        time.sleep(0.5)  # past the pool initializer
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(w) for w in workers), "workers outlived their parent"
    finally:
        for pid in [parent.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        parent.wait()


def test_a_run_replaces_the_previous_runs_files_and_nothing_else(tmp_path):
    out = tmp_path / "o"
    first = {"results.json": lambda: b"{}", "roc_A.png": lambda: b"png", "roc_B.png": lambda: b"png"}
    report.write_atomically(out, first)
    (out / "notes.txt").write_text("the user's own file")
    (out / "roc_B.png").write_bytes(b"edited by the user since")
    report.write_atomically(out, {"results.json": lambda: b"{\"second\": 1}"})
    assert sorted(p.name for p in out.iterdir()) == [report.MANIFEST, "notes.txt", "results.json", "roc_B.png"]
    assert (out / "roc_B.png").read_bytes() == b"edited by the user since"
    # a file set that is not a run's (features roi writes one table next to the user's files)
    report.write_atomically(out, {"rois.csv": lambda: b"a\n"}, as_set=False)
    assert (out / "results.json").exists() and (out / "rois.csv").exists()


def test_reproduce_twice_into_its_default_folder_drops_the_stale_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = invoke(["reproduce", *TINY, "--methods", "single,fedavg", "--plots"])
    assert code == 0, text
    folder = tmp_path / "results" / "adni-like"
    assert list(folder.glob("*.png"))
    code, text = invoke(["reproduce", *TINY, "--methods", "single,fedavg"])
    assert code == 0, text
    assert not list(folder.glob("*.png"))
    assert {p.name for p in folder.iterdir()} == {"results.json", "results.csv", "table.md", report.MANIFEST}


def _screen(render, *args):
    buf = io.StringIO()
    render(*args, Console(width=80, file=buf))
    return buf.getvalue()


def _assert_readable(text, cells):
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    expected = Counter(n for c in cells for n in NUMBER.findall(c))
    assert expected and not expected - Counter(NUMBER.findall(text)), "a number was cut"


def test_tables_stay_whole_at_80_columns(tmp_path):
    from medfed.experiments.audit import audit_rows
    from medfed.experiments.results import table_rows

    # four sites, long Cross labels, personal rows and unseen-site blocks
    code, text = invoke(["run", "--dataset", "heart-disease", "--methods", "cross,single,fedavg,finetune", "--loso",
                         "--rounds", "3", "--local-steps", "2", "--repeats", "2", "--out", str(tmp_path / "r")])
    assert code == 0, text
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    screen = _screen(render_table, doc)
    _assert_readable(screen, [c for r in table_rows(doc) for c in r["cells"]])
    assert "Cross (Switzerland tr)" in screen and "± " not in screen.split("\n", 1)[1]

    code, text = invoke(["audit", "robustness", "--dataset", "breast-cancer", "--dataset-option", "n_sites=8",
                         "--attack", "sign_flip", "--corrupt", "2", "--defenses", "fedavg,median,bulyan",
                         "--repeats", "2", "--rounds", "3", "--out", str(tmp_path / "a")])
    assert code == 0, text
    audit = json.loads((tmp_path / "a" / "robustness.json").read_text())
    screen = _screen(render_audit, audit)
    rows, _ = audit_rows(audit, ("acc", "auc"))
    _assert_readable(screen, [c for r in rows for cells in r["cells"].values() for c in cells])


def test_methods_list_at_80_columns_keeps_every_name_and_the_config_hint():
    from medfed.methods.registry import METHODS

    screen = _screen(render_methods)
    assert "…" not in screen and max(len(line) for line in screen.splitlines()) <= 80
    for name in METHODS:
        assert re.search(rf"^ ?{re.escape(name)}\b", screen, re.M), name
    assert "[method_options.NAME]" in " ".join(screen.split())


def test_version_and_short_help_everywhere():
    from medfed import __version__

    code, text = invoke(["--version"])
    assert code == 0 and text.strip() == f"medfed {__version__}"
    for args in ([], ["run"], ["reproduce"], ["methods"], ["datasets"], ["audit"], ["audit", "robustness"],
                 ["features"], ["features", "roi"]):
        code, text = invoke([*args, "-h"])
        assert code == 0 and "Usage:" in text, (args, text)
    code, text = invoke(["-h"])
    assert "Exit status" in text and "3 result files written" in " ".join(text.split())


def test_results_record_the_command_line_versions_and_no_torch_for_numpy(tmp_path):
    out = tmp_path / "c d"
    args = ["reproduce", *TINY, "--threads", "2", "--out", str(out)]
    proc = _medfed(args, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"] == shlex.join(["medfed", *args]) and shlex.split(doc["command"])[-1] == str(out)
    assert doc["environment"]["torch"] is None and "torch" not in doc["versions"]  # never imported
    assert doc["versions"]["numpy"] and doc["config"]["threads"] == 2
    assert "--threads" in proc.stderr  # the numpy model has no torch threads to set
    code, text = invoke(["run", "--dataset", "adni-like", *RUN_TINY, "--out", str(tmp_path / "py")])
    assert code == 0, text
    assert json.loads((tmp_path / "py" / "results.json").read_text())["command"] is None  # not a command line


def test_threads_flag_sets_and_records_the_torch_models_threads(tmp_path):
    """--threads is the thread count torch models compute with (their `threads` option); torch's
    global setting is left alone, and the count the numbers came from is recorded."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for n in (None, 1, 2):
        out = tmp_path / str(n)
        flag = [] if n is None else ["--threads", str(n)]
        code, text = invoke(["run", "--dataset", "breast-cancer", "--model", "torch_logistic", *flag,
                             *RUN_TINY, "--out", str(out)])
        assert code == 0, text
        doc = json.loads((out / "results.json").read_text())
        assert torch.get_num_threads() == before
        assert doc["environment"]["torch"] == {"threads": n or 1, "device": device}
        assert doc["model"]["options"]["threads"] == (n or 1) and doc["config"]["threads"] == n
        assert "torch" in doc["versions"]
    code, text = invoke(["run", "--dataset", "breast-cancer", "--model", "torch_logistic", "--threads", "2",
                         "--model-option", "threads=1", *RUN_TINY, "--out", str(tmp_path / "x")])
    assert code == 2 and "give one" in text


def test_a_file_the_run_would_replace_but_medfed_did_not_write_needs_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("a user's own numbers\n")
    (out / "notes.txt").write_text("kept whatever happens\n")
    run = ["run", "--dataset", "adni-like", *RUN_TINY, "--out", str(out)]
    code, text = invoke(run)
    assert code == 2 and "results.csv" in text and "--overwrite" in text
    assert (out / "results.csv").read_text() == "a user's own numbers\n" and not (out / "results.json").exists()
    code, text = invoke([*run, "--overwrite"])
    assert code == 0, text
    assert (out / "results.csv").read_text().startswith("setting,")
    code, text = invoke(run)  # medfed's own files from the last run are replaced without asking
    assert code == 0, text
    with (out / "table.md").open("a") as fh:  # ... unless a user changed one since
        fh.write("my edit\n")
    code, text = invoke(run)
    assert code == 2 and "table.md" in text and (out / "table.md").read_text().endswith("my edit\n")
    assert (out / "notes.txt").read_text() == "kept whatever happens\n"
    audit = ["audit", "robustness", "--dataset", "breast-cancer", "--attack", "sign_flip", "--defenses", "fedavg",
             "--repeats", "1", "--rounds", "2", "--out", str(tmp_path / "aud")]
    (tmp_path / "aud").mkdir()
    (tmp_path / "aud" / "robustness.md").write_text("draft\n")
    code, text = invoke(audit)
    assert code == 2 and "robustness.md" in text
    code, text = invoke([*audit, "--overwrite"])
    assert code == 0, text

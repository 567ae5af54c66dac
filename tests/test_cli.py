"""The command line: --help everywhere, and bad input → one clear message, exit code 2."""

import os
import subprocess
import sys

import pytest

from fmri2text.cli import app


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fmri2text.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def test_every_command_has_help():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"simulate", "demo", "config"} <= set(names)
    for name in names:
        r = run_cli(name, "--help")
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout and "--help" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and "fmri2text" in r.stdout


def _one_clear_message(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip(), "the message goes to stderr"


def test_missing_output_option():
    r = run_cli("simulate")
    _one_clear_message(r)
    assert "--out" in r.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run_cli("simulate", "--out", str(blocker / "ds"))
    _one_clear_message(r)
    assert str(blocker) in r.stderr
    # a read-only filesystem: /proc refuses new folders even for root
    r = run_cli("simulate", "--out", "/proc/fmri2text-test")
    _one_clear_message(r)
    assert "/proc/fmri2text-test" in r.stderr


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    r = run_cli("demo", "--out", str(f))
    _one_clear_message(r)
    assert str(f) in r.stderr and "folder" in r.stderr
    assert f.read_text() == "x"


def test_negative_subject_count(tmp_path):
    r = run_cli("simulate", "--out", str(tmp_path / "ds"), "--subjects", "-1")
    _one_clear_message(r)
    assert "--subjects" in r.stderr
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("cmd", ["simulate", "demo", "config"])
def test_unknown_config_key(tmp_path, cmd):
    args = [cmd, "data.windw=3"] if cmd == "config" else [cmd, "--out", str(tmp_path / "o"),
                                                          "data.windw=3"]
    r = run_cli(*args)
    _one_clear_message(r)
    assert "data.windw" in r.stderr and "data.window" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: [unclosed\n")
    r = run_cli("config", "--config", str(f))
    _one_clear_message(r)
    assert str(f) in r.stderr

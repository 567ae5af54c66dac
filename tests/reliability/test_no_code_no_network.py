"""No code from data, nothing on the network: a socket-blocked demo, and a source scan."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY_DEMO, cli_env

SRC = Path(__file__).resolve().parents[2] / "src"

OFFLINE_RUNNER = """
import json, socket, sys
log = sys.argv[1]

def refuse(what):
    def blocked(*args, **kwargs):
        with open(log, "a") as f:
            f.write(json.dumps([what, repr(args)[:200]]) + "\\n")
        raise OSError("network blocked by the reliability test: " + what)
    return blocked

real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return refuse("connect")(address)
    return real_connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return refuse("connect_ex")(address)
    return real_connect_ex(self, address)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = refuse("getaddrinfo")
socket.gethostbyname = refuse("gethostbyname")
socket.create_connection = refuse("create_connection")

from fmri2text.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_demo_runs_with_the_network_blocked(tmp_path: Path):
    attempts = tmp_path / "attempts.jsonl"
    run = tmp_path / "run"
    env = cli_env()
    env.pop("HF_HUB_OFFLINE")  # the CLI itself must set it; a test env must not hide a hub call
    env.pop("TRANSFORMERS_OFFLINE")
    r = subprocess.run([sys.executable, "-c", OFFLINE_RUNNER, str(attempts), "demo", "--out",
                        str(run), *TINY_DEMO], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()  # not even a caught, retried attempt
    metrics = json.loads((run / "metrics.json").read_text())
    assert "total" in metrics and (run / "report.html").is_file()


# ----------------------------------------------------------------------------- source scan

FORBIDDEN = {
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "pickle.load": re.compile(r"\bpickle\.loads?\s*\("),
    "yaml.load": re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)\s*\("),
    "yaml unsafe Loader": re.compile(r"\b(Unsafe|Full)?Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "shell=True": re.compile(r"shell\s*=\s*True"),
}


def _calls(text: str, name: str) -> list[str]:
    """The full argument text of every ``name(...)`` call (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10, f"no sources found under {SRC}"
    return files


def test_no_forbidden_calls_in_src():
    hits = []
    for path in _sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            hits += [f"{path.relative_to(SRC)}:{number}: {what}: {line.strip()}"
                     for what, pattern in FORBIDDEN.items() if pattern.search(code)]
    assert not hits, "\n".join(hits)


def test_torch_load_always_weights_only():
    bad = []
    for path in _sources():
        for args in _calls(path.read_text(encoding="utf-8"), "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                bad.append(f"{path.relative_to(SRC)}: torch.load({args})")
    assert not bad, "\n".join(bad)


def test_scanner_catches_what_it_looks_for():
    """The patterns above are live: each catches a sample line."""
    samples = ["AutoModel.from_pretrained(p, trust_remote_code=True)", "pickle.load(f)",
               "yaml.load(text)", "np.load(p, allow_pickle=True)", "eval(s)",
               "subprocess.run(c, shell=True)"]
    for sample in samples:
        assert any(p.search(sample) for p in FORBIDDEN.values()), sample
    assert not any(p.search("model.eval()") for p in FORBIDDEN.values())
    assert _calls("torch.load(path, map_location='cpu')", "torch.load") == ["path, map_location='cpu'"]

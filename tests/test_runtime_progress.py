"""Progress on stderr: plain lines where there is no terminal (mpiexec pipes, batch logs)."""
import io
import json
import subprocess
import sys
from pathlib import Path

from meshmpi.progress import Progress, stage

REPO = Path(__file__).resolve().parents[1]


def test_plain_lines_name_the_stage_and_how_far_it_got():
    out = io.StringIO()
    with Progress(3, "prefill of 7 tokens", "layers", bar=False, every=0.0, stream=out) as bar:
        for _ in range(3):
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("prefill of 7 tokens: 0/3 layers")
    assert [line.split(":")[1].split()[0] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]   # not twice


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress(3, "decode", "tokens", enabled=False, stream=out) as bar:
        bar.update(3)
    stage("loading", enabled=False, stream=out)
    assert out.getvalue() == ""


def test_generate_json_keeps_stdout_to_one_object_and_progress_on_stderr():
    command = [sys.executable, "-m", "llm", "generate", "--model", "tiny", "--prompt-ids", "1,2,3",
               "--max-new-tokens", "3", "--mesh", "4x4", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["new_tokens"] == 3
    assert "loading tiny" in done.stderr and "prefill of 3 tokens: 4/4 layers" in done.stderr
    quiet = subprocess.run(command + ["--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr

"""The `lmlab` command as a user meets it: generate, chat, report, bad checkpoints."""

import shutil

from .conftest import lmlab_cmd


def test_generate_greedy_is_deterministic_and_continues_the_prompt(smoke_run, tmp_path):
    args = ["generate", str(smoke_run), "--prompt", "def ", "--max-new-tokens", "12"]
    a = lmlab_cmd(*args, cwd=tmp_path, check=True)
    b = lmlab_cmd(*args, cwd=tmp_path, check=True)
    assert a.stdout.startswith("def ") and a.stdout == b.stdout and len(a.stdout) > 5


def test_generate_sampling_is_seeded(smoke_run, tmp_path):
    args = [
        "generate",
        str(smoke_run / "pretrain/model"),
        "--prompt",
        "import",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "20",
    ]
    a = lmlab_cmd(*args, "--seed", "1", cwd=tmp_path, check=True).stdout
    b = lmlab_cmd(*args, "--seed", "1", cwd=tmp_path, check=True).stdout
    c = lmlab_cmd(*args, "--seed", "2", cwd=tmp_path, check=True).stdout
    assert a == b and a != c


def test_chat_takes_several_turns(smoke_run, tmp_path):
    p = lmlab_cmd(
        "chat",
        str(smoke_run),
        "--max-new-tokens",
        "8",
        cwd=tmp_path,
        stdin="What does `json.dumps` do?\n/reset\nAnd `os.path.join`?\n/exit\n",
        check=True,
    )
    assert p.stdout.count("model> ") == 2


def test_bad_inputs_exit_2_with_a_clear_line(smoke_run, tmp_path):
    p = lmlab_cmd("generate", str(tmp_path / "missing"), "--prompt", "x", cwd=tmp_path)
    assert p.returncode == 2 and "no such checkpoint" in p.stderr
    broken = tmp_path / "broken"
    shutil.copytree(smoke_run / "pretrain/model", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 50)
    p = lmlab_cmd("generate", str(broken), "--prompt", "x", cwd=tmp_path)
    assert p.returncode == 2 and "model.safetensors" in p.stderr and "Traceback" not in p.stderr
    p = lmlab_cmd("generate", str(smoke_run), "--prompt", "x", "--top-p", "0", cwd=tmp_path)
    assert p.returncode == 2 and "top-p" in p.stderr
    p = lmlab_cmd("report", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "not a run directory" in p.stderr
    p = lmlab_cmd("generate", cwd=tmp_path)
    assert p.returncode == 2


def test_report_command_rerenders(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "report.md").unlink()
    p = lmlab_cmd("report", str(run), cwd=tmp_path, check=True)
    assert "report.md" in p.stdout and (run / "report.md").is_file()


def test_recipes_lists_and_shows(tmp_path):
    p = lmlab_cmd("recipes", cwd=tmp_path, check=True)
    assert "tiny" in p.stdout.split() and "smoke" in p.stdout.split()
    p = lmlab_cmd("recipes", "smoke", cwd=tmp_path, check=True)
    assert "max_steps: 30" in p.stdout and "weight_decay: 0.1" in p.stdout


def test_stage_verbs_run_up_to_their_stage_and_share_the_cache(tmp_path):
    import json

    p = lmlab_cmd("tokenizer", "smoke", "--quiet", cwd=tmp_path, check=True)
    run = tmp_path / "runs/smoke"
    assert p.stdout.strip() == str(run.relative_to(tmp_path) / "tokenizer")
    m = json.loads((run / "manifest.json").read_text())
    assert list(m["stages"]) == ["data", "tokenizer"] and not (run / "pretrain").exists()
    lmlab_cmd("pretrain", "smoke", "--quiet", cwd=tmp_path, check=True)
    m = json.loads((run / "manifest.json").read_text())
    assert [m["stages"][s]["status"] for s in m["stages"]] == ["cached", "cached", "done"]

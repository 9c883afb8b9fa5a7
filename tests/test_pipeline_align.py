"""The align stage of `lmlab run`: after SFT on the recipe's own instruction set, GRPO or
DPO on its task; every model evaluated, compared pairwise and reported side by side."""

from __future__ import annotations

import json
import shutil

from tests.conftest import lmlab_cmd

TINY_GRPO = [
    "align.prompts=4",
    "align.heldout=3",
    "align.max_new_tokens=6",
    "align.grpo.group_size=2",
    "align.train.max_steps=2",
    "align.train.batch_size=2",
]


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_sft_on_the_recipes_data_then_grpo_then_every_model_reported(smoke_run, tmp_path):
    run = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_run, run)
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}."} for i in range(8)]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows += [{"messages": turns}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _sets(
        f"sft.data=[{data}]",
        "sft.peft={method: lora, r: 4}",
        "align.method=grpo",
        "align.peft={method: ia3}",
        *TINY_GRPO,
    )
    lmlab_cmd("run", "smoke", "--quiet", *args, cwd=tmp_path, check=True)
    m = _manifest(run)
    status = {s: r["status"] for s, r in m["stages"].items()}
    assert status == dict.fromkeys(["data", "tokenizer", "pretrain"], "cached") | dict.fromkeys(
        ["sft", "align", "eval", "report"], "done"
    )
    assert m["stages"]["sft"]["summary"]["examples"] == 8  # 12, less smoke's 30% held out
    # SFT trained a LoRA adapter; GRPO an IA³ one, on SFT's merged into its base
    assert (run / "sft" / "instruct" / "model" / "adapter_config.json").is_file()
    assert (run / "align" / "sft-merged" / "model.safetensors").is_file()
    conf = json.loads((run / "align" / "grpo" / "model" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "IA3"
    assert conf["base_model_name_or_path"] == str((run / "align" / "sft-merged").resolve())
    align = m["stages"]["align"]["summary"]
    assert align["method"] == "grpo" and align["steps"] == 2 and align["heldout_items"] == 3
    res = json.loads((run / "eval" / "results.json").read_text())
    assert set(res["lm"]) == {"base", "sft", "aligned"}
    assert res["qa"] == {}  # tuned on the recipe's data: no mined questions to ask
    assert "synthetic_addition" in json.dumps(res["tasks_aligned_minus_sft"])
    assert (run / "eval" / "tasks" / "aligned" / "results.json").is_file()
    report = (run / "report.md").read_text()
    assert "## Alignment" in report and "aligned − SFT (paired)" in report
    # an edited instruction set redoes SFT and what follows; a missing one stops the run
    # before any stage, naming the key and the file
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    lmlab_cmd("sft", "smoke", "--quiet", *args, cwd=tmp_path, check=True)
    assert _manifest(run)["stages"]["sft"]["status"] == "done"
    before = (run / "manifest.json").read_text()
    p = lmlab_cmd("run", "smoke", *_sets("sft.data=[nope.jsonl]"), cwd=tmp_path)
    assert p.returncode == 2 and "sft.data: nope.jsonl: no such file" in p.stderr
    assert (run / "manifest.json").read_text() == before


def test_dpo_stage_on_the_recipes_preference_file(smoke_run, tmp_path):
    run = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_run, run)
    pairs = tmp_path / "pairs.jsonl"
    recs = [
        {"prompt": f"What is {i} + 2?", "chosen": f"The answer is {i + 2}.", "rejected": "no"}
        for i in range(10)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = _sets(
        "align.method=dpo",
        f"align.data=[{pairs}]",
        "align.heldout=2",
        "align.max_new_tokens=6",
        "align.train.max_steps=3",
        "align.train.lr=1e-3",
    )
    lmlab_cmd("align", "run", "smoke", "--quiet", *args, cwd=tmp_path, check=True)
    align = _manifest(run)["stages"]["align"]["summary"]
    assert align["method"] == "dpo" and align["steps"] == 3 and align["pairs"] == 9
    assert align["heldout_items"] == 2 and 0 <= align["heldout_after"] <= 1
    assert not (run / "align" / "pairs.jsonl").exists()  # the user's pairs, none built
    assert (run / "align" / "dpo" / "model" / "model.safetensors").is_file()

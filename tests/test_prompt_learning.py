"""Prompt tuning and prefix tuning (virtual tokens) against PEFT itself, both directions of
loading; the virtual tokens through the generation cache equal recomputation; only the
virtual tokens train, are saved and resume exactly; reward-model adapters (PEFT's
SEQ_CLS layout) against PEFT on a sequence-classification model."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import UsageError
from lmlab.model.adapters import add_adapters, parse_peft, trainable_counts
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.loading import load_model
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [
    "prompt:num_virtual_tokens=5",
    "prefix:num_virtual_tokens=4",
    "prefix:num_virtual_tokens=3,prefix_projection=true,encoder_hidden_size=24",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lmlab.model.hf import export_to_hf

    root = tmp_path_factory.mktemp("virtual")
    ckpt = tiny_checkpoint(root / "m")
    return ckpt, export_to_hf(ckpt, root / "hf")


def _ids(seed: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model.eval()(ids, **kw)


@pytest.mark.parametrize("spec", SPECS, ids=["prompt", "prefix", "prefix-mlp"])
def test_virtual_tokens_equal_peft_both_ways(base, tmp_path, spec):
    ckpt, hf = base
    ids = _ids(1)
    model = load_model(ckpt)
    plain = _logits(model, ids)
    add_adapters(model, parse_peft(spec), base=str(ckpt), seed=3)
    ours = _logits(model, ids)
    assert ours.shape == plain.shape  # the outputs cover the real tokens only
    assert not torch.allclose(ours, plain, atol=1e-3)
    out = save_checkpoint(model, tmp_path / "adapter", tokenizer_dir=ckpt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    theirs = peft.PeftModel.from_pretrained(ref, out).eval()(input_ids=ids).logits
    theirs = theirs[:, -ids.shape[1] :]  # PEFT's prompt tuning returns the virtual positions
    assert torch.allclose(ours[..., : theirs.shape[-1]], theirs, atol=1e-5)
    assert torch.equal(_logits(load_model(out), ids), ours)  # lmlab loads its own
    # and what PEFT wrote (its prefix MLP's output, as PEFT saves it) loads in lmlab
    method, n = spec.split(":")[0], 4
    if method == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                      prefix_projection="mlp" in spec)  # fmt: skip
    torch.manual_seed(5)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf), cfg).eval()
    pm.save_pretrained(tmp_path / "theirs")
    conf = tmp_path / "theirs" / "adapter_config.json"
    raw = json.loads(conf.read_text())
    conf.write_text(json.dumps({**raw, "base_model_name_or_path": str(hf)}))
    again = peft.PeftModel.from_pretrained(  # as saved: the MLP's output, in inference form
        transformers.AutoModelForCausalLM.from_pretrained(hf), tmp_path / "theirs"
    ).eval()
    theirs = again(input_ids=ids).logits[:, -ids.shape[1] :]
    ours = _logits(load_model(tmp_path / "theirs"), ids)
    assert torch.allclose(ours[..., : theirs.shape[-1]], theirs, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS[:2], ids=["prompt", "prefix"])
def test_virtual_tokens_through_the_cache_equal_recomputation(base, spec):
    from lmlab.infer.engine import Runner

    ckpt, _ = base
    model = add_adapters(load_model(ckpt), parse_peft(spec), base=str(ckpt)).eval()
    prompts = [_ids(2, (1, 7))[0].tolist(), _ids(3, (1, 4))[0].tolist()]  # left-padded batch
    runner = Runner(model, slots_after_prompt=3)
    steps = [runner.prefill(prompts)]
    nxt = torch.tensor([11, 12])
    steps.append(runner.step(nxt))
    steps.append(runner.step(nxt + 1))
    for r, p in enumerate(prompts):  # each row as if alone, recomputed without a cache
        for k, got in enumerate(steps):
            seq = p + [int(nxt[r]) + j for j in range(k)]
            want = _logits(model, torch.tensor([seq]))[0, -1]
            assert torch.allclose(got[r], want, atol=1e-4), (r, k)


def test_only_the_virtual_tokens_train_and_the_file_holds_only_them(base, tmp_path):
    from safetensors.torch import load_file

    ckpt, _ = base
    model = add_adapters(load_model(ckpt), parse_peft(SPECS[2]), base=str(ckpt)).train()
    model(_ids(4)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all(n.startswith("virtual_prompt.") for n in with_grad)
    trainable, total = trainable_counts(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in with_grad)
    out = save_checkpoint(model, tmp_path / "a", tokenizer_dir=ckpt)
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "prompt_embeddings" in keys  # PEFT's tensor, and the MLP to resume training
    assert keys - {"prompt_embeddings"} == {f"lmlab_prefix_encoder.{n[15:]}" for n in with_grad}


def test_prompt_tuning_from_text_starts_at_the_texts_embeddings(base, tmp_path):
    from lmlab.model.adapter_ops import with_adapter
    from lmlab.tokenizer import load_tokenizer

    ckpt, _ = base
    tok = load_tokenizer(ckpt)
    cfg = parse_peft({"method": "prompt", "num_virtual_tokens": 7, "init_text": "the cat sat"})
    model = with_adapter(load_model(ckpt), cfg, ckpt, tok)
    ids = tok.encode("the cat sat", add_special_tokens=False).ids
    want = model.embed_tokens.weight[torch.tensor((ids * 7)[:7])]
    assert torch.equal(model.virtual_prompt.embedding.weight, want)
    # the saved adapter loads without the text's tokens: its trained table is what loads
    out = save_checkpoint(model, tmp_path / "pt", tokenizer_dir=ckpt)
    again = load_model(out)
    assert torch.equal(again.virtual_prompt.embedding.weight, want)
    with pytest.raises(UsageError, match="init_text"):
        with_adapter(load_model(ckpt), cfg, ckpt)  # no tokenizer to read the text with


def _sft(ckpt, data, out, steps, spec):
    from lmlab.adapt.instruct import instruct, parse_source
    from lmlab.train.loop import TrainConfig

    cfg = TrainConfig(batch_size=4, seq_len=64, lr=3e-2, warmup_steps=0, min_lr_ratio=1.0,
                      max_steps=steps, checkpoint_every=2, log_every=1, eval_every=100,
                      weight_decay=0.0)  # fmt: skip
    instruct(ckpt, [parse_source(str(data))], out, cfg, peft=parse_peft(spec))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x and "val_loss" not in x]


def test_prefix_tuning_trains_resumes_exactly_generates_and_is_not_merged_or_paged(
    base, tmp_path, monkeypatch, capsys
):
    from lmlab.infer.scheduler import Scheduler

    ckpt, _ = base
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SPECS[2]
    straight = _sft(ckpt, data, tmp_path / "a", 4, spec)
    _sft(ckpt, data, tmp_path / "b", 2, spec)
    resumed = {x["step"]: x for x in _sft(ckpt, data, tmp_path / "b", 4, spec)}
    assert straight[-1]["loss"] < straight[0]["loss"]
    for x in straight:
        assert resumed[x["step"]]["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
    adapter = tmp_path / "a" / "model"
    code, out, err = lmlab_here(monkeypatch, capsys, "generate", str(adapter), "--prompt",
                                "What is", "--max-new-tokens", "4")  # fmt: skip
    assert code == 0, err
    code, _, err = lmlab_here(monkeypatch, capsys, "adapt", "merge", str(ckpt), str(adapter),
                              "--out", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and "virtual tokens" in err and not (tmp_path / "m").exists()
    with pytest.raises(UsageError, match="virtual tokens"):
        Scheduler(load_model(adapter))


def test_a_reward_model_adapter_equals_peft_sequence_classification(base, tmp_path):
    from lmlab.model.transformer import with_score_head

    ckpt, hf = base
    model = with_score_head(load_model(ckpt))
    add_adapters(model, parse_peft("lora:r=4,target_modules=q_proj|v_proj"), base=str(ckpt))
    assert model.score.weight.requires_grad
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids = _ids(6)
    last = torch.full((2,), ids.shape[1] - 1)
    ours = _logits(model, ids, score_at=last)
    out = save_checkpoint(model, tmp_path / "rm", tokenizer_dir=ckpt)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["modules_to_save"] == ["score"]
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1)
    theirs = peft.PeftModel.from_pretrained(ref, out).eval()(input_ids=ids).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    again = load_model(out)  # the loader gives the base its head, then the adapter
    assert torch.equal(_logits(again, ids, score_at=last), ours)

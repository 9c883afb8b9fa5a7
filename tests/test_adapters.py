"""Parameter-efficient adapters (LoRA, rsLoRA, DoRA, IA³) against PEFT itself: the same
forward and the same merged weights in both directions of loading; zero-initialised LoRA
changes nothing; only adapter tensors train, are saved and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.model.adapters import (
    adapter_names,
    add_adapters,
    merge_adapters,
    parse_peft,
    trainable_counts,
)
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.loading import load_model
from tests.conftest import lmlab_here
from tests.serving import tiny_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [
    "lora:r=4,target_modules=q_proj|v_proj|down_proj",
    "lora:r=4,alpha=8,rslora=true,target_modules=q_proj|k_proj|o_proj|up_proj",
    "dora:r=4,alpha=8,target_modules=q_proj|o_proj|gate_proj",
    r"lora:r=2,target_modules=re:.*layers\.0\.mlp\..*",
    "lora:r=2,target_modules=all-linear",
    "ia3",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lmlab.model.hf import export_to_hf

    root = tmp_path_factory.mktemp("peft")
    ckpt = tiny_checkpoint(root / "m")
    return ckpt, export_to_hf(ckpt, root / "hf")


def _perturb(model, seed=0):
    """Adapter tensors away from their identity start, so the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name or "magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _logits(model, ids):
    """An lmlab model's logits."""
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.split(":")[0] + str(SPECS.index(s)))
def test_lmlab_adapter_equals_peft_on_the_export_and_when_merged(base, tmp_path, spec):
    ckpt, hf = base
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    model = load_model(ckpt)
    plain = _logits(model, ids)
    add_adapters(model, parse_peft(spec), base=str(ckpt))
    _perturb(model)
    ours = _logits(model.eval(), ids)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does something
    out = save_checkpoint(model, tmp_path / "adapter", tokenizer_dir=ckpt)
    assert not (out / "model.safetensors").exists()  # the adapter alone
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    theirs_model = peft.PeftModel.from_pretrained(ref, out).eval()
    theirs = theirs_model(input_ids=ids).logits
    vocab = theirs.shape[-1]
    assert torch.allclose(ours[..., :vocab], theirs, atol=1e-5)
    # loading back through the loader (the adapter names its base)
    assert torch.equal(_logits(load_model(out), ids), ours)
    # merged: the same weights as PEFT's merge_and_unload, and the same outputs
    merged = merge_adapters(load_model(out))
    hf_merged = theirs_model.merge_and_unload().state_dict()
    for name, t in merged.state_dict().items():
        key = name if name.startswith("lm_head") else f"model.{name}"
        if key in hf_merged and "layers" in name:
            assert torch.allclose(t, hf_merged[key], atol=1e-6), name
    # merged is (W + BA)x, not Wx + BAx: equal up to float reassociation
    assert torch.allclose(_logits(merged, ids), ours, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_an_adapter_peft_wrote_loads_in_lmlab_with_equal_outputs(base, tmp_path, kind):
    ckpt, hf = base
    if kind == "ia3":
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"], init_ia3_weights=False)  # fmt: skip
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                              use_dora=kind == "dora", init_lora_weights=False)  # fmt: skip
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf), cfg).eval()
    ref.save_pretrained(tmp_path / "theirs")
    conf = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(hf)  # PEFT names the HF directory
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    theirs = ref(input_ids=ids).logits
    ours = _logits(load_model(tmp_path / "theirs"), ids)
    assert torch.allclose(ours[..., : theirs.shape[-1]], theirs, atol=1e-5)


def test_a_new_lora_changes_nothing_and_only_adapters_get_gradients(base):
    ckpt, _ = base
    ids = torch.randint(0, 300, (2, 9))
    model = load_model(ckpt)
    before = _logits(model, ids)
    add_adapters(
        model,
        parse_peft(r"lora:r=8,target_modules=re:.*\.(q|k|v|o|gate|up|down)_proj"),
        base=str(ckpt),
    )
    assert torch.equal(_logits(model, ids), before)  # B = 0: the model is unchanged
    model.train()
    _perturb(model)
    model(ids).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    trainable, total = trainable_counts(model)
    assert trainable == sum(model.state_dict()[k].numel() for k in adapter_names(model))
    assert trainable < 0.2 * total


def _sft(ckpt, data, out, steps, peft_spec):
    from lmlab.adapt.instruct import instruct, parse_source
    from lmlab.train.loop import TrainConfig

    cfg = TrainConfig(batch_size=4, seq_len=64, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                      max_steps=steps, checkpoint_every=2, log_every=1, eval_every=100,
                      weight_decay=0.0)  # fmt: skip
    instruct(ckpt, [parse_source(str(data))], out, cfg, peft=parse_peft(peft_spec))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x and "val_loss" not in x]


def test_training_saves_only_the_adapter_and_resumes_exactly(base, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    ckpt, _ = base
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = "dora:r=4,target_modules=q_proj|v_proj|down_proj"
    straight = _sft(ckpt, data, tmp_path / "a", 4, spec)
    _sft(ckpt, data, tmp_path / "b", 2, spec)  # stops with its step-2 checkpoint
    resumed = {x["step"]: x for x in _sft(ckpt, data, tmp_path / "b", 4, spec)}
    assert [x["step"] for x in straight] == [1, 2, 3, 4]
    for x in straight:
        assert resumed[x["step"]]["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
    for d in ("a/last", "a/model"):
        tensors = load_file(str(tmp_path / d / "adapter_model.safetensors"))
        assert tensors and all(
            k.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")) for k in tensors
        )
        assert not (tmp_path / d / "model.safetensors").exists()
    blob = torch.load(tmp_path / "a/last/trainer_state.pt", weights_only=True)
    n_adapter = len(load_file(str(tmp_path / "a/last/adapter_model.safetensors")))
    assert len(blob["optimizer"]["state"]) == n_adapter  # AdamW moments for adapters only
    # the trained adapter generates, and merges into a plain checkpoint with equal logits
    ids = torch.randint(0, 300, (1, 7))
    adapted = _logits(load_model(tmp_path / "a/model"), ids)
    code, _, err = lmlab_here(
        monkeypatch, capsys, "adapt", "merge", str(ckpt), str(tmp_path / "a/model"),
        "--out", str(tmp_path / "merged"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "merged/model.safetensors").is_file()
    assert torch.allclose(_logits(load_model(tmp_path / "merged"), ids), adapted, atol=1e-5)
    code, out, err = lmlab_here(
        monkeypatch, capsys, "generate", str(tmp_path / "a/model"), "--prompt", "What",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err


def test_bad_adapters_and_settings_exit_2_naming_them(base, tmp_path, monkeypatch, capsys):
    ckpt, _ = base
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for spec, words in [
        ("bogus", "method"),
        ("lora:r=0", "r:"),
        ("lora:r=x", "r must be a number"),
        ("lora:target_modules=nothing", "match no linear layer"),
        ("lora:alpha", "key=value"),
    ]:
        code, _, err = lmlab_here(
            monkeypatch, capsys, "sft", "--model", str(ckpt), "--data", str(data), "--out",
            str(tmp_path / "o"), "--peft", spec,
        )  # fmt: skip
        assert code == 2 and words in err, (spec, err)
        assert not (tmp_path / "o").exists()
    # an adapter whose base is gone, or whose tensors do not fit
    model = add_adapters(load_model(ckpt), parse_peft("lora:r=2"), base=str(tmp_path / "gone"))
    save_checkpoint(model, tmp_path / "orphan", tokenizer_dir=ckpt)
    code, _, err = lmlab_here(monkeypatch, capsys, "generate", str(tmp_path / "orphan"),
                              "--prompt", "x")  # fmt: skip
    assert code == 2 and "gone" in err
    conf = tmp_path / "orphan" / "adapter_config.json"
    raw = json.loads(conf.read_text())
    conf.write_text(json.dumps({**raw, "base_model_name_or_path": str(ckpt), "r": 3}))
    code, _, err = lmlab_here(monkeypatch, capsys, "generate", str(tmp_path / "orphan"),
                              "--prompt", "x")  # fmt: skip
    assert code == 2 and "lora_A.weight has shape" in err
    code, _, err = lmlab_here(
        monkeypatch, capsys, "adapt", "merge", str(ckpt), str(ckpt), "--out", str(tmp_path / "m")
    )
    assert code == 2 and "not an adapter directory" in err


def test_model_info_counts_what_training_trains(monkeypatch, capsys):
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import Transformer

    code, out, err = lmlab_here(
        monkeypatch, capsys, "model", "info", "llama", "--size", "10M", "--peft", "lora:r=8",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    info = json.loads(out)
    cfg = ModelConfig.from_dict(info["config"])
    model = add_adapters(Transformer(cfg), parse_peft("lora:r=8"))
    trainable, total = trainable_counts(model)
    assert info["peft"]["trainable parameters"].startswith(f"{trainable:,} of {total:,}")


def test_the_server_puts_adapters_on_one_shared_base(base, tmp_path):
    from lmlab.serve.engine import EngineLimits
    from lmlab.serve.server import build

    ckpt, _ = base
    dirs = {}
    for i, spec in enumerate(["lora:r=2", "ia3"]):
        model = add_adapters(load_model(ckpt), parse_peft(spec), base=str(ckpt))
        _perturb(model, seed=i)
        dirs[spec.split(":")[0]] = save_checkpoint(model, tmp_path / str(i), tokenizer_dir=ckpt)
    specs = [f"{k}={v}" for k, v in dirs.items()]
    engines = build(str(ckpt), "base", specs, EngineLimits(), progress=lambda *_: None)
    plain = engines["base"].model  # (engines' threads start with the server: none here)
    ids = torch.randint(0, 300, (1, 8))
    for name, d in dirs.items():
        m = engines[name].model
        assert m.layers[0].mlp.down_proj.weight is plain.layers[0].mlp.down_proj.weight
        assert torch.equal(_logits(m, ids), _logits(load_model(d), ids))
    assert not hasattr(plain.layers[0].self_attn.q_proj, "lora_A")  # the base untouched


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_on_a_quantized_base(base, tmp_path, monkeypatch, capsys, method):
    """LoRA on a quantized base equals the same LoRA on the dequantized base (the float
    model the quantized weights stand for); training it moves the adapter only, and the
    int8 kernel's missing backward is not needed."""
    from lmlab.model.quant import QuantLinear

    ckpt, _ = base
    q_dir = tmp_path / "q"
    code, _, err = lmlab_here(monkeypatch, capsys, "quantize", str(ckpt), "--out", str(q_dir),
                              "--method", method, "--group-size", "32")  # fmt: skip
    assert code == 0, err
    spec = parse_peft("lora:r=4,target_modules=q_proj|v_proj|down_proj")
    quant = add_adapters(load_model(q_dir), spec, base=str(q_dir))
    assert any(isinstance(m, QuantLinear) for m in quant.modules())
    deq = load_model(ckpt)  # the float model, its weights replaced by the dequantized ones
    for name, m in quant.named_modules():
        if isinstance(m, QuantLinear):
            deq.get_submodule(name).weight.data.copy_(m.dequantized())
    add_adapters(deq, spec, base=str(ckpt))
    _perturb(quant)
    deq.load_state_dict({k: v for k, v in quant.state_dict().items() if "lora_" in k},
                        strict=False)  # fmt: skip
    ids = torch.randint(0, 300, (2, 9))
    assert torch.allclose(_logits(quant, ids), _logits(deq, ids), atol=1e-4)
    # a gradient step: only the adapter's tensors get gradients; the int8 codes stay
    before = {k: v.clone() for k, v in quant.state_dict().items() if "qweight" in k}
    quant.train()
    weight_shapes = {tuple(m.dequantized().shape) for m in quant.modules()
                     if isinstance(m, QuantLinear)}  # fmt: skip
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        loss = quant(ids).logsumexp(-1).sum()
    # no layer, adapted or not, keeps a float copy of its weight for the backward (QLoRA)
    assert not [s for s in saved if tuple(s) in weight_shapes]
    loss.backward()
    grads = {n for n, p in quant.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(torch.equal(before[k], v) for k, v in quant.state_dict().items() if k in before)
    # saved, it loads on the quantized base; merged, it is the dequantized weight + s·BA
    out = save_checkpoint(quant, tmp_path / "qlora", tokenizer_dir=ckpt)
    assert torch.allclose(_logits(load_model(out), ids), _logits(quant, ids), atol=1e-5)
    merged = merge_adapters(load_model(out))
    layer = quant.layers[0].self_attn.q_proj
    expect = layer.dequantized() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    assert torch.allclose(merged.layers[0].self_attn.q_proj.weight, expect, atol=1e-6)
    # the command: the whole base in float (adapted layers or not), or quantized again
    for extra in ([], ["--quantize", "int8"]):
        dest = tmp_path / f"merged{len(extra)}"
        code, _, err = lmlab_here(monkeypatch, capsys, "adapt", "merge", str(q_dir), str(out),
                                  "--out", str(dest), *extra)  # fmt: skip
        assert code == 0, err
        conf = json.loads((dest / "config.json").read_text())
        assert (conf.get("quantization") or {}).get("method") == (extra[1] if extra else None)
        assert ("weight error" in err) == bool(extra)
        got = _logits(load_model(dest), ids)
        assert torch.allclose(got, _logits(quant, ids), atol=1e-4 if not extra else 0.5)
    with pytest.raises(Exception, match="dora on a quantized base"):
        add_adapters(load_model(q_dir), parse_peft("dora:r=2"))


def test_a_hub_base_name_resolves_to_the_store_model():
    """PEFT writes the Hub id of the base into adapter_config.json; a store model made from
    it stands in for it, so such an adapter loads offline."""
    from lmlab.model.store import resolve_model

    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == resolve_model(
        "smollm2-135m-instruct"
    )
    assert str(resolve_model("someone/unknown-model")) == "someone/unknown-model"


def test_bottleneck_adapters_in_lmlabs_own_layout(base, tmp_path, monkeypatch, capsys):
    """Houlsby adapters after attention (o_proj) and after the feed-forward (down_proj):
    new, they change nothing; trained, they save in lmlab's layout and load back equal;
    they are not linear, so merging is refused."""
    ckpt, _ = base
    ids = torch.randint(0, 300, (2, 9))
    model = load_model(ckpt)
    before = _logits(model, ids)
    add_adapters(model, parse_peft("bottleneck:r=8"), base=str(ckpt))
    assert torch.equal(_logits(model, ids), before)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapter_" in n and ("o_proj" in n or "down_proj" in n) for n in names)
    _perturb(model)
    out = save_checkpoint(model, tmp_path / "b", tokenizer_dir=ckpt)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LMLAB_BOTTLENECK"
    assert torch.equal(_logits(load_model(out), ids), _logits(model, ids))
    assert not torch.allclose(_logits(model, ids), before, atol=1e-3)
    code, _, err = lmlab_here(monkeypatch, capsys, "adapt", "merge", str(ckpt), str(out),
                              "--out", str(tmp_path / "m"))  # fmt: skip
    assert code == 2 and "not linear" in err and not (tmp_path / "m").exists()

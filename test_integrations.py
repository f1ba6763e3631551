"""Property tests for sorsa_integrations.py: what the models people fine-tune, their files, PEFT's loader
and the meta device need beyond sorsa.py. Helpers and tolerances as in test_sorsa.py; the verbs
apply_sorsa, load_adapter and adapter_state_dict here are the companion's, which do all that sorsa's do."""

import copy
import io
import json
import os
import re
import stat
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from safetensors.torch import load_file

import bench
import sorsa
import sorsa_integrations as si
from sorsa import SORSALinear, merge_sorsa, orthonormal_regularizer, sorsa_loss
from sorsa_integrations import (adapter_state_dict, apply_sorsa, load_adapter, lora_state_dict, save_adapter,
                                save_lora)
from test_sorsa import (Conv1D, adapter_of, assert_refused_and_unchanged, assert_unchanged, close_outputs, doc_block,
                        gpt2_like, rand, snapshot, tied_model, toy_model, train_steps, trained_pair)

real_torch_save = torch.save


def half_written_save(obj, f):
    """torch.save that dies half-way, as a full disk or a killed process would."""
    buffer = io.BytesIO()
    real_torch_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    raise OSError(28, "No space left on device")


def damaged_files(path, tmp_path):
    """Truncated, byte-flipped and foreign versions of a good adapter file."""
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load alone does not notice
    foreign = tmp_path / "foreign.pt"
    torch.save({"0.q_proj.U_p": torch.zeros(2)}, foreign)
    out = {"truncated": data[: len(data) // 2], "flipped": bytes(flipped), "empty": b""}
    for name, content in out.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    return [tmp_path / f"{name}.pt" for name in out] + [foreign]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_loading_non_finite_adapter_tensors_is_refused(bad_value):
    _, model, _ = trained_pair(5)
    state = adapter_state_dict(model)
    for key in ("0.q_proj.S_p", "1.down.Vt_p0"):
        bad = {k: v.clone() for k, v in state.items()}
        bad[key].view(-1)[0] = bad_value
        target = toy_model(5)
        snap = snapshot(target)
        with pytest.raises(ValueError, match=re.escape(f"({key.rpartition('.')[2]} not finite floats)")):
            load_adapter(target, bad)
        assert_unchanged(target, snap)


class PeftLinear(nn.Linear):
    """A stand-in for a PEFT tuner layer: what apply_sorsa sees in a model get_peft_model wrapped."""


PeftLinear.__module__ = "peft.tuners.lora.layer"
PeftModelForCausalLM = type("PeftModelForCausalLM", (nn.Module,), {"__module__": "peft.peft_model"})


def train_hf(model, idx, labels, steps=5):
    """A few AdamW steps of a Hugging Face model on its own loss, so that what trains moves."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    for _ in range(steps):
        loss = model(idx, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()



def test_adapter_file_round_trip_never_recomputes_an_svd(tmp_path, monkeypatch):
    base, model, x = trained_pair(1, rank=4)
    path = tmp_path / "adapter.pt"
    save_adapter(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]  # no temporary file left

    def no_svd(*args, **kwargs):
        raise AssertionError("load_adapter computed an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    assert torch.equal(fresh(x), model(x))  # same W_r, same factors, same arithmetic


def failing_fsync(fd):
    """os.fsync on a full disk: the new bytes were written, but never reach the disk."""
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("save, files, failure", [
    (lambda m, d: save_adapter(m, d / "adapter.pt"), ["adapter.pt"], (torch, "save", half_written_save)),
    (save_lora, ["adapter_config.json", "adapter_model.safetensors"], (os, "fsync", failing_fsync))])
def test_a_save_that_fails_half_way_leaves_the_old_files_byte_identical_and_no_temporary(tmp_path, monkeypatch,
                                                                                        save, files, failure):
    _, model, x = trained_pair(2)
    save(model, tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in files}
    train_steps(model, x)
    monkeypatch.setattr(*failure)
    with pytest.raises(OSError, match="No space left"):
        save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert all((tmp_path / name).read_bytes() == content for name, content in old.items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_atomic_write_gives_its_file_the_mode_a_plain_open_would(tmp_path, umask):
    """Under umask 022 an adapter must be readable by others (a serving container): -rw-r--r--, as
    open() gives, not the -rw------- of a private temporary file; under 077 it stays private."""
    _, model, _ = trained_pair(2)
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        save_adapter(model, tmp_path / "adapter.pt")
        save_lora(model, tmp_path / "lora")
        si.save_checked({"w": torch.ones(2)}, tmp_path / "cache.pt")  # train_tiny's cached base models
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == expected
    for path in ("adapter.pt", "lora/adapter_model.safetensors", "lora/adapter_config.json", "cache.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / path).st_mode) == expected, path


def test_damaged_adapter_files_give_an_error_naming_the_file_and_change_nothing(tmp_path):
    base, model, _ = trained_pair(3)
    path = tmp_path / "good.pt"
    save_adapter(model, path)
    for bad in damaged_files(path, tmp_path):
        target = copy.deepcopy(base)
        snap = snapshot(target)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load_adapter(target, bad)
        assert_unchanged(target, snap)


def test_adapters_of_another_model_or_with_mixed_ranks_name_the_file_and_change_nothing(tmp_path):
    _, model, _ = trained_pair(4, rank=3)
    _, other_rank, _ = trained_pair(4, rank=2)
    state, state_r2 = adapter_state_dict(model), adapter_state_dict(other_rank)
    files = {"other_model.pt": (state, toy_model(d=10)),  # same names, other shapes
             "fewer_blocks.pt": (state, toy_model(blocks=1)),
             "mixed_rank.pt": ({**state, "0.q_proj.S_p": state_r2["0.q_proj.S_p"]}, toy_model())}
    for file_name, (content, target) in files.items():
        si.save_checked(content, tmp_path / file_name)
        snap = snapshot(target)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / file_name))):
            load_adapter(target, tmp_path / file_name)
        assert_unchanged(target, snap)


@pytest.mark.parametrize("write", ["save_adapter", "adapter_state_dict", "lora_state_dict", "save_lora", "merge_sorsa"])
@pytest.mark.parametrize("key", ["U_p", "S_p", "Vt_p"])
def test_non_finite_factors_are_refused_where_they_would_be_written(tmp_path, write, key):
    _, model, _ = trained_pair(6)
    with torch.no_grad():
        getattr(model[1].down, key).view(-1)[-1] = float("nan")
    snap = snapshot(model)
    calls = {"save_adapter": lambda: save_adapter(model, tmp_path / "a.pt"),
             "adapter_state_dict": lambda: adapter_state_dict(model), "lora_state_dict": lambda: lora_state_dict(model),
             "save_lora": lambda: save_lora(model, tmp_path / "lora"), "merge_sorsa": lambda: merge_sorsa(model)}
    with pytest.raises(ValueError, match=re.escape(f"layer 1.down: {key} contains NaN or Inf")):
        calls[write]()
    assert_unchanged(model, snap)
    assert not list(tmp_path.rglob("*.*"))  # nothing written


@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_lora_export_is_the_learned_change_as_a_rank_2r_product(seed, r):
    base, model, _ = trained_pair(seed, rank=r, targets=["q_proj", "up"])
    lora = lora_state_dict(model)
    assert len(lora) == 2 * len(sorsa.sorsa_modules(model))
    for name, mod in sorsa.sorsa_modules(model):
        A, B = lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"]
        assert A.shape == (2 * r, mod.in_features) and B.shape == (mod.out_features, 2 * r)
        W_0 = base.get_submodule(name).weight
        assert torch.allclose(W_0 + B @ A, mod.merge().weight, rtol=0, atol=1e-12)


def apply_peft_directory_by_hand(base, directory):
    """What PeftModel.from_pretrained(base, directory) + merge does, from the files alone."""
    config = json.loads((directory / "adapter_config.json").read_text())
    weights = load_file(directory / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    for name in config["target_modules"]:
        r = config["rank_pattern"].get(name, config["r"])
        scaling = config["alpha_pattern"].get(name, config["lora_alpha"]) / r
        A = weights[f"base_model.model.{name}.lora_A.weight"]
        B = weights[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == r
        layer = model.get_submodule(name)
        delta = B @ A if type(layer) is not Conv1D else (B @ A).T  # PEFT transposes for a Conv1D base
        with torch.no_grad():
            layer.weight.add_(scaling * delta.to(layer.weight.dtype))
    for name in config["modules_to_save"] or []:  # replaced whole by the saved module
        prefix = f"base_model.model.{name}."
        model.get_submodule(name).load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_peft_export_directory_applied_by_hand_reproduces_the_fine_tuned_model(tmp_path, dtype):
    base, model, x = trained_pair(7, dtype, rank=3)
    save_lora(model, tmp_path / "lora", base_name="toy")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    names = [name for name, _ in sorsa.sorsa_modules(model)]
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 6
    assert config["target_modules"] == sorted(names) and config["lora_dropout"] == 0
    assert config["base_model_name_or_path"] == "toy"
    weights = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert set(weights) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    with torch.no_grad():
        assert close_outputs(apply_peft_directory_by_hand(base, tmp_path / "lora")(x), model(x), dtype)


def test_peft_loads_the_export_and_reproduces_the_fine_tuned_model(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed: the load through PEFT itself is skipped")
    base, model, x = trained_pair(8, torch.float32, rank=3)
    save_lora(model, tmp_path / "lora")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    with torch.no_grad():
        y, y_peft = model(x), loaded(x)
        assert torch.allclose(y_peft, y, atol=1e-5)
        assert torch.allclose(loaded.merge_and_unload()(x), y, atol=1e-5)


class PlainLinearSubclass(nn.Linear):
    """A stand-in for Falcon's FalconLinear: an nn.Linear subclass whose forward writes out x W^T + b."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class SubclassWithOwnInit(nn.Linear):
    def __init__(self, n, m):
        super().__init__(n, m)


class RouterLike(nn.Linear):
    """A stand-in for an MoE router (Llama 4's, PhiMoE's): an nn.Linear subclass that is not x W^T + b."""

    def forward(self, x):
        return torch.softmax(super().forward(x), dim=-1)


class SubclassModel(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.own, self.up = PlainLinearSubclass(d, d), SubclassWithOwnInit(d, d), nn.Linear(d, d)
        self.attn, self.router = nn.MultiheadAttention(d, 2), RouterLike(d, d)

    def forward(self, x):
        h = self.up(self.own(torch.tanh(self.q(x))))
        return (h + self.attn(h, h, h, need_weights=False)[0]) * self.router(h)


def test_linear_subclasses_are_adapted_by_default_and_by_name_and_merge_back_to_their_class():
    """An nn.Linear subclass that computes x W^T + b is adapted (Falcon's), one that does not (a
    router) is not, nor the out_proj whose weight its parent nn.MultiheadAttention reads directly;
    merging gives back the subclass where it keeps nn.Linear's constructor, else a plain nn.Linear."""
    torch.manual_seed(0)
    base = SubclassModel().double()
    x = rand(5, 8, seed=1)
    for targets in (None, ["q", "own", "up"]):
        model = copy.deepcopy(base)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert apply_sorsa(model, 3, targets) == ["q", "own", "up"]
        assert [str(w.message) for w in record] == ([] if targets else [
            "apply_sorsa adapted every linear layer but attn.out_proj (NonDynamicallyQuantizableLinear, whose "
            "weight its parent nn.MultiheadAttention reads directly); router (RouterLike, whose forward is not "
            "x W^T + b)"])
        assert isinstance(model.q, SORSALinear) and model.q.base_type is PlainLinearSubclass
        with torch.no_grad():
            assert close_outputs(model(x), base(x), torch.float64)
        train_steps(model, x, gamma=1e-3)
        with torch.no_grad():
            y = model(x)
            merge_sorsa(model)
            assert type(model.q) is PlainLinearSubclass and type(model.own) is nn.Linear and type(model.up) is nn.Linear
            assert close_outputs(model(x), y, torch.float64)
    for target, words in (("router", "RouterLike, whose forward is not x W^T + b"),
                          ("out_proj", "whose weight its parent nn.MultiheadAttention reads directly")):
        with pytest.raises(TypeError, match=f"{target} matches the targets but is .*{re.escape(words)}"):
            apply_sorsa(copy.deepcopy(base), 3, [target])


class Classifier(nn.Module):
    """A sequence classifier in miniature: a body of linear layers and a new head of `labels` outputs."""

    def __init__(self, d=12, labels=2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.classifier = nn.Linear(d, labels)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


def classifier(seed=0, labels=2, dtype=torch.float64):
    torch.manual_seed(seed)
    return Classifier(labels=labels).to(dtype)


def test_the_default_targets_skip_a_head_narrower_than_the_rank_and_name_it():
    model = classifier(labels=2)
    with pytest.warns(UserWarning, match=r"but classifier \(rank 4 is above its 2 outputs: a new classification "
                                         r"head trains in full with modules_to_save\)"):
        assert apply_sorsa(model, 4) == ["body.0", "body.2"]
    assert type(model.classifier) is nn.Linear and not model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match=r"rank 4 is outside \[1, min\(out, in\)\] = \[1, 2\] for layer classifier"):
        apply_sorsa(classifier(labels=2), 4, ["classifier"])  # named: an error, as before


def test_a_head_that_trains_in_full_travels_with_the_adapter_and_the_peft_export(tmp_path):
    """modules_to_save=["classifier"]: the head is not split, trains in full, and save_adapter /
    load_adapter and save_lora (PEFT's modules_to_save) carry it, so each reproduces the model."""
    base = classifier(seed=3, labels=4)  # 4 labels: rank 4 fits, and the head is still not split
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_sorsa(model, 4, modules_to_save=["classifier"]) == ["body.0", "body.2"]
    assert type(model.classifier) is nn.Linear and model.classifier.weight.requires_grad
    assert [name for name, _ in si.full_modules(model)] == ["classifier"]
    x = rand(6, 12, seed=4)
    train_steps(model, x, gamma=1e-3, target=rand(6, 4, seed=5))
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # it trained
    state = adapter_state_dict(model)
    assert {k for k in state if ".modules_to_save." in k} == {"classifier.modules_to_save.weight",
                                                              "classifier.modules_to_save.bias"}
    save_adapter(model, tmp_path / "adapter.pt")
    loaded = copy.deepcopy(base)
    assert load_adapter(loaded, tmp_path / "adapter.pt") == ["body.0", "body.2"]
    assert loaded.classifier.weight.requires_grad and [n for n, _ in si.full_modules(loaded)] == ["classifier"]
    save_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["target_modules"] == ["body.0", "body.2"]
    with torch.no_grad():
        y = model(x)
        assert torch.equal(loaded(x), y)
        assert close_outputs(apply_peft_directory_by_hand(base, tmp_path / "lora")(x), y, torch.float64)


@pytest.mark.parametrize("call, error, words", [
    (lambda m: load_adapter(m, 3), TypeError, "state must be an adapter dict or a file path, got int"),
    (lambda m: load_adapter("model.pt", {}), TypeError, "load_adapter needs an nn.Module"),
    (lambda m: apply_sorsa(m, 2, ["v_prj"]), ValueError, "Near names: v_proj"),
    (lambda m: apply_sorsa(nn.DataParallel(m), 2), TypeError, "call apply_sorsa on the plain model first"),
])
def test_the_companions_verbs_refuse_bad_arguments_naming_them_and_change_nothing(call, error, words):
    assert_refused_and_unchanged(toy_model(), call, error, words)


def test_bad_modules_to_save_are_refused_before_anything_changes():
    model = classifier(labels=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save 'head' matches no module"):
        apply_sorsa(model, 2, modules_to_save=["head"])
    with pytest.raises(ValueError, match="classifier matches the targets but is in classifier, which trains in full"):
        apply_sorsa(model, 2, ["body.0", "classifier"], modules_to_save="classifier")
    with pytest.raises(TypeError, match="modules_to_save must be None, a name or a list of names"):
        apply_sorsa(model, 2, modules_to_save=[3])
    assert_unchanged(model, snap)


def test_another_adapter_methods_model_is_refused_naming_what_was_found():
    model = toy_model()
    model[0].q_proj = PeftLinear(12, 12).double()
    wrapped = PeftModelForCausalLM()
    wrapped.base_model = toy_model()
    for m, found in ((model, "PEFT's PeftLinear"), (wrapped, "PEFT's PeftModelForCausalLM")):
        snap = snapshot(m)
        with pytest.raises(TypeError, match=f"apply_sorsa needs the base model, but this one holds {found}"):
            apply_sorsa(m, 2)
        with pytest.raises(TypeError, match=f"load_adapter needs the base model, but this one holds {found}"):
            load_adapter(m, adapter_of(0)[1])
        assert_unchanged(m, snap)


def test_gpt2_style_model_adapts_by_default_trains_saves_loads_and_merges_to_its_own_state_dict(tmp_path):
    """all-linear on a GPT-2-like model: every Conv1D adapted, the tied head skipped and named. The
    trained model's adapter loads onto a fresh base, its PEFT export applies (fan_in_fan_out), and
    the merged model's state dict loads into the original architecture (save/from_pretrained)."""
    base = gpt2_like()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"lm_head \(the output head\)"):
        names = apply_sorsa(model, 3)
    assert names == ["c_attn", "c_proj", "c_fc", "mlp_proj"]
    idx = torch.arange(16).view(2, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    for _ in range(5):
        loss = sorsa_loss(nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()), model, 1e-3, 1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y = model(idx)
        assert not torch.allclose(y, base(idx), atol=1e-3)  # it trained
        save_adapter(model, tmp_path / "a.pt")
        fresh = copy.deepcopy(base)
        load_adapter(fresh, tmp_path / "a.pt")
        assert torch.equal(fresh(idx), y)
        merge_sorsa(fresh)  # loaded layers also know what they replaced
        assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
        save_lora(model, tmp_path / "lora")
        assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        assert torch.allclose(apply_peft_directory_by_hand(base, tmp_path / "lora")(idx), y, atol=1e-10)
        merge_sorsa(model)
        state = model.state_dict()
        assert state.keys() == base.state_dict().keys()
        reloaded = gpt2_like(seed=1)  # another random model of the architecture, then the merged weights
        reloaded.load_state_dict(state)
        assert torch.allclose(reloaded(idx), y, atol=1e-10)


def test_peft_loads_the_export_of_a_gpt2_model_and_reproduces_it(tmp_path):
    """The real thing, where transformers and peft are installed: GPT-2 from a small random config."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: GPT-2 is skipped")
    peft = pytest.importorskip("peft", reason="peft is not installed: the load through PEFT is skipped")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="lm_head"):
        apply_sorsa(model, 4)
    idx = torch.arange(16).view(2, 8)
    train_hf(model, idx, idx)
    save_lora(model, tmp_path / "lora")
    with torch.no_grad():
        y = model(idx).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
        assert torch.allclose(loaded(idx).logits, y, atol=1e-4)
        merge_sorsa(model)
        model.save_pretrained(tmp_path / "merged")
        again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
        assert torch.allclose(again(idx).logits, y, atol=1e-4)


def test_a_real_falcon_is_adapted_by_default_and_merges_back_to_falcon_linear():
    """Falcon's projections are FalconLinear, an nn.Linear subclass (skipped where transformers is missing)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: Falcon is skipped")
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    torch.manual_seed(0)
    base = transformers.FalconForCausalLM(config).eval()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="lm_head"):
        names = apply_sorsa(model, 4)
    assert len(names) == 8 and all(sorsa.sorsa_modules(model)[i][1].base_type.__name__ == "FalconLinear" for i in range(8))
    idx = torch.arange(16).view(2, 8)
    with torch.no_grad():
        assert torch.allclose(model(idx).logits, base(idx).logits, atol=1e-5)
        merge_sorsa(model)
        assert {type(m).__name__ for n, m in model.named_modules() if n in names} == {"FalconLinear"}
        assert torch.allclose(model(idx).logits, base(idx).logits, atol=1e-5)


def test_a_real_bert_classifier_trains_its_head_in_full_and_peft_reproduces_it(tmp_path):
    """BERT for sequence classification with 2 labels: the default skips the head, naming it;
    modules_to_save=["classifier"] trains it in full, and PEFT loads the export with it."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: BERT is skipped")
    peft = pytest.importorskip("peft", reason="peft is not installed: the load through PEFT is skipped")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=64, num_labels=2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    with pytest.warns(UserWarning, match=r"classifier \(rank 4 is above its 2 outputs"):
        apply_sorsa(copy.deepcopy(base), 4)
    model = copy.deepcopy(base)
    apply_sorsa(model, 4, modules_to_save=["classifier"])
    idx = torch.arange(16).view(2, 8)
    train_hf(model, idx, torch.tensor([0, 1]))
    save_lora(model, tmp_path / "lora")
    with torch.no_grad():
        model.eval()
        y = model(idx).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
        assert not torch.allclose(base(idx).logits, y, atol=1e-3)  # it trained
        assert torch.allclose(loaded(idx).logits, y, atol=1e-5)


def test_the_readme_trainer_callback_adds_the_regularizer_once_per_optimizer_step_after_the_clip(tmp_path):
    """Hugging Face's Trainer with the callback of docs/huggingface.md, gradient accumulation 2 and a clip that bites
    (max_grad_norm 0.01): at each optimizer step the callback runs once, sees the clipped task gradient,
    and adds (gamma / lr) grad L_reg to it unclipped; each checkpoint gets an adapter that reproduces the model."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: the Trainer is skipped")
    namespace = {}
    exec(doc_block("class SORSACallback"), namespace)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with pytest.warns(UserWarning, match="lm_head"):
        apply_sorsa(model, 4)
    with torch.no_grad():  # off orthonormality, so that the regularizer has a gradient to add
        for _, layer in sorsa.sorsa_modules(model):
            layer.U_p.add_(0.05 * torch.randn_like(layer.U_p))
    params = [p for p in model.parameters() if p.requires_grad]
    gamma, lr, seen = 4e-4, 1e-3, []

    class Checked(namespace["SORSACallback"]):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clipped = [p.grad.clone() for p in params]
            g_reg = torch.autograd.grad((gamma / lr) * sorsa.orthonormal_regularizer(model), params, allow_unused=True,
                                        materialize_grads=True)
            super().on_pre_optimizer_step(args, state, control, **kwargs)
            seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped])).item())
            for p, c, g in zip(params, clipped, g_reg):
                assert torch.allclose(p.grad, c + g, rtol=1e-5, atol=1e-7)

    data = [{"input_ids": torch.arange(8) + i, "labels": torch.arange(8) + i} for i in range(12)]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                          max_steps=3, max_grad_norm=0.01, learning_rate=lr, weight_decay=0.0,
                                          report_to=[], logging_strategy="no", save_strategy="steps", save_steps=3,
                                          use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[Checked(gamma)])
    trainer.train()
    assert len(seen) == trainer.state.global_step == 3  # once per optimizer step, not per micro-batch
    assert max(seen) <= 0.01 * (1 + 1e-4)  # after the clip
    torch.manual_seed(0)
    loaded = transformers.LlamaForCausalLM(config)  # the same base, rebuilt
    load_adapter(loaded, tmp_path / "checkpoint-3" / "sorsa_adapter.pt")
    idx = torch.arange(8).view(1, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(idx).logits, model(idx).logits, atol=1e-5)


def test_default_targets_skip_the_output_head_tied_weights_and_linear_subclasses_and_name_them():
    """target_modules=None (or "all-linear") means every linear layer a default can adapt, as PEFT's
    all-linear: a head found by get_output_embeddings() or named lm_head, a tied weight, and
    nn.MultiheadAttention's out_proj (a subclass whose weight MHA reads directly) are skipped."""
    class HFLike(nn.Module):  # a head under another name, found as Hugging Face models expose it
        def __init__(self):
            super().__init__()
            self.attn, self.up, self.embed_out = nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 5)

        def get_output_embeddings(self):
            return self.embed_out

    for targets in (None, "all-linear"):
        model = HFLike()
        with pytest.warns(UserWarning) as record:
            assert apply_sorsa(model, 2, targets) == ["up"]
        message = str(record[0].message)
        assert "embed_out (the output head)" in message and "attn.out_proj (NonDynamicallyQuantizableLinear" in message
        assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    tied = tied_model()
    with pytest.raises(ValueError, match=r"no nn.Linear or Conv1D-style layer to adapt; skipped: 1 \(tied to 0.weight\)"):
        apply_sorsa(tied, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: nothing to say
        apply_sorsa(toy_model(), 2)


def test_a_model_partly_on_the_meta_device_is_refused_before_anything_changes_naming_the_layers():
    model = toy_model()
    for layer in (model[1].up, model[1].down):  # what accelerate's disk offload leaves behind
        layer.to_empty(device="meta")
    types, weights = [type(m) for m in model.modules()], [p for p in model.parameters()]
    with pytest.raises(ValueError, match="2 of the 10 layers to adapt have their weights on the meta device.*1.up, 1.down") as info:
        apply_sorsa(model, 2)
    assert "load the model fully first" in str(info.value)
    assert [type(m) for m in model.modules()] == types and all(a is b for a, b in zip(model.parameters(), weights))
    whole = toy_model().to_empty(device="meta")  # wholly on meta: the shapes, as for parameter counts
    apply_sorsa(whole, 2)
    assert all(p.is_meta for p in whole.parameters()) and len(sorsa.sorsa_modules(whole)) == 10


def test_compiled_models_are_seen_through_by_every_verb_and_their_adapters_load_onto_the_plain_base(tmp_path):
    base, model, x = trained_pair(9, torch.float32)
    compiled = torch.compile(model, backend="eager")  # the wrapper, without a compiler's start-up time
    plain_state = adapter_state_dict(model)
    assert adapter_state_dict(compiled).keys() == plain_state.keys()
    assert lora_state_dict(compiled).keys() == lora_state_dict(model).keys()
    assert torch.equal(orthonormal_regularizer(compiled), orthonormal_regularizer(model))
    save_adapter(compiled, tmp_path / "a.pt")
    save_lora(compiled, tmp_path / "lora")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a.pt")
    assert torch.equal(fresh(x), model(x))
    names = [name for name, _ in sorsa.sorsa_modules(model)]
    with torch.no_grad():
        y = model(x)
        assert merge_sorsa(compiled) == names
        assert not sorsa.sorsa_modules(model) and torch.allclose(compiled(x), y, atol=1e-5)


def test_every_target_pattern_must_match_and_a_typo_names_the_near_names():
    cases = [(["q_proj", "v_prj"], "'v_prj'", "v_proj"),
             (["0.q_proj", "q"], "'q'", "q_proj"),
             (["0.up", "1.down", "44"], "'44'", "")]
    for targets, named, near in cases:
        model = toy_model()
        snap = snapshot(model)
        with pytest.raises(ValueError, match=f"target {re.escape(named)} matches no layer.*Near names: .*{near}"):
            apply_sorsa(model, 2, targets)
        assert_unchanged(model, snap)


def test_save_adapter_without_adapters_writes_no_file(tmp_path):
    with pytest.raises(ValueError, match="no SORSA adapters"):
        save_adapter(toy_model(), tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model_name, rank, millions", [
    ("Llama 2 7B", 128, 320), ("Mistral 7B", 64, 168), ("Gemma 7B", 64, 200), ("RWKV6 7B", 64, 176)])
def test_trainable_parameters_of_table_1_from_meta_shapes(model_name, rank, millions):
    """Every linear layer of every block adapted; shapes from the published configs (bench.LLM_BLOCKS)."""
    model = bench.meta_blocks(model_name)
    blocks, shapes = bench.LLM_BLOCKS[model_name]
    assert len(apply_sorsa(model, rank)) == blocks * len(shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6) == millions


def test_sorsa_alone_adapts_plain_linear_layers_and_names_the_subclasses_it_leaves_to_the_companion():
    """sorsa.apply_sorsa's default adapts exactly nn.Linear (and Conv1D-style) layers: a subclass, whatever its
    forward, is left out and named (the companion probes it); named, it is refused before anything changes."""
    torch.manual_seed(0)
    model = SubclassModel().double()
    with pytest.warns(UserWarning) as record:
        assert sorsa.apply_sorsa(model, 3) == ["up"]
    message = str(record[0].message)
    for name, kind in (("q", "PlainLinearSubclass"), ("own", "SubclassWithOwnInit"),
                       ("attn.out_proj", "NonDynamicallyQuantizableLinear"), ("router", "RouterLike")):
        assert f"{name} ({kind}, an nn.Linear subclass (sorsa_integrations probes those))" in message
    fresh = SubclassModel().double()
    snap = snapshot(fresh)
    with pytest.raises(TypeError, match="q matches the targets but is PlainLinearSubclass, an nn.Linear subclass"):
        sorsa.apply_sorsa(fresh, 3, ["q", "up"])
    assert_unchanged(fresh, snap)


# ----------------------------------------------------------------------------- the split after sharding, one process


def unsplit(base, rank, targets=None):
    """base's structure adapted on the meta device, then materialized holding garbage, as before a load."""
    model = copy.deepcopy(base).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head, left out and named: tested elsewhere
        apply_sorsa(model, rank, targets)
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("make, targets", [(toy_model, ["q_proj", "v_proj", "up", "down"]), (gpt2_like, None)])
@pytest.mark.parametrize("niter", [None, 2])
def test_split_in_one_process_is_apply_sorsa_on_the_loaded_base(make, targets, niter):
    """Without torch.distributed, split_sharded on a model adapted on meta and loaded through base_state_for_sorsa
    (Conv1D's (in, out) weights transposed) is sorsa.apply_sorsa on the base: the same factors bit for bit, and W_r
    to float64 rounding (split_sharded subtracts W_p an 8th of the rows at a time, in other GEMM blocks)."""
    base = make(0)
    expected = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sorsa.apply_sorsa(expected, 3, targets, niter=niter)
    model = unsplit(base, 3, targets)
    model.load_state_dict(si.base_state_for_sorsa(model, base.state_dict()), strict=False)
    si.split_sharded(model, niter)
    got = model.state_dict()
    for key, value in expected.state_dict().items():
        if key.endswith("W_r"):
            assert torch.allclose(got[key], value, rtol=0, atol=1e-14 * value.abs().max().item()), key
        else:
            assert torch.equal(got[key], value), key


def test_split_refuses_what_it_cannot_split_before_changing_anything():
    base = toy_model(0)
    with pytest.raises(ValueError, match="found no SORSA layer: call sorsa_integrations.apply_sorsa on the meta"):
        si.split_sharded(base)
    model = unsplit(base, 3, ["q_proj", "up"])
    with pytest.raises(KeyError, match="the base state has no '0.q_proj.weight' for SORSA layer '0.q_proj'"):
        si.base_state_for_sorsa(model, {})
    for bad in (float("nan"), float("inf"), -float("inf")):  # each, alone among finite values (the check reads max, min)
        state = base.state_dict()
        state["1.up.weight"][0, 0] = bad
        model.load_state_dict(si.base_state_for_sorsa(model, state), strict=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"changed nothing: rank 0: W_0 of 1.up holds NaN or Inf"):
            si.split_sharded(model)
        assert all(torch.equal(before[k].view(torch.uint8), v.view(torch.uint8)) for k, v in model.state_dict().items())
    model.load_state_dict(si.base_state_for_sorsa(model, base.state_dict()), strict=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for niter in (-1, 2.5, True):  # as apply_sorsa refuses them, before anything changes
        with pytest.raises(ValueError, match=r"niter must be None \(exact SVD\) or an int >= 0, got"):
            si.split_sharded(model, niter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_split_that_fails_midway_says_how_far_it_got(monkeypatch):
    """A failure no check can foresee (an SVD that does not converge, out of memory) in a later turn: the error
    says how many layers the earlier turns split and what to do; the first turn's failure changed nothing."""
    base = toy_model(0)
    real, calls = sorsa._top_triplets, []

    def fails_on(n):
        def factors(*args):
            calls.append(1)
            if len(calls) == n:
                raise torch.linalg.LinAlgError("the SVD did not converge")
            return real(*args)
        return factors
    for n, words in ((3, "split 2 of 4 layers before this error, the rest still hold W_0"), (1, "changed nothing")):
        calls.clear()
        monkeypatch.setattr(sorsa, "_top_triplets", real)
        model = unsplit(base, 3, ["q_proj", "up"])
        model.load_state_dict(si.base_state_for_sorsa(model, base.state_dict()), strict=False)
        monkeypatch.setattr(sorsa, "_top_triplets", fails_on(n))
        with pytest.raises(ValueError, match=f"split_sharded {words}.*rank 0: _LinAlgError: the SVD did not converge"):
            si.split_sharded(model)

"""Interop with PyTorch and PEFT: `denselora_jax.torch.apply_adapter` against our JAX forward and gradients (tiny
model, SmolLM2-135M), PEFT LoRA/DoRA directories read by `load_adapter` (parity with peft itself, training
continues, unsupported features refused), `python -m denselora_jax.merge` (against base + adapter, transformers
and peft's merge_and_unload), and the reason DenseLoRA is not a PEFT plug-in."""

import json
import os
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import safetensors.numpy
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from denselora_jax import (
    PROJECTIONS,
    AdapterConfig,
    count_adapter_params,
    fingerprint,
    forward,
    init_adapter,
    load_adapter,
    load_pretrained,
    load_tokenizer,
    save_adapter,
)
from denselora_jax.adapters.io import AdapterFileError, AdapterMismatchError
from denselora_jax.merge import NotMergeableError, main, merge_lora
from denselora_jax.step import loss_sums, train_step
from denselora_jax.torch import DenseLoRALinear, LoRALinear, apply_adapter

TINY = dict(  # GQA, and biases on the attention projections (DoRA and merging must leave them alone)
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    attention_bias=True,
)
R = 4
GROUP = {t: "self_attn" if t in PROJECTIONS[:4] else "mlp" for t in PROJECTIONS}
WRAPPERS = (DenseLoRALinear, LoRALinear)  # DoRALinear is a LoRALinear


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLaMA (with a word-level tokenizer) written by save_pretrained, read by load_pretrained."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, TINY["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    mc, params = load_pretrained(path)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, TINY["vocab_size"], (2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    cot = rs.randn(*ids.shape, TINY["vocab_size"]).astype(np.float32) * mask[..., None]
    return dict(path=path, mc=mc, params=params, ids=ids, mask=mask, cot=cot, fp=fingerprint(mc, params))


# One compilation per shape and config instead of op-by-op execution.
jit_forward = jax.jit(forward, static_argnums=0, static_argnames="adapter_config")


def torch_model(path) -> LlamaForCausalLM:
    # eager attention: fully masked (left-pad) query rows stay finite, as in ours
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def torch_logits(model, ids, mask) -> torch.Tensor:
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits


def assert_close(ours, ref, rel, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert scale > 0 and err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def real(logits, mask):
    return np.asarray(logits)[mask.astype(bool)]


def random_adapter(mc, params, ac, seed=0, scale=0.15):
    """Every tensor random and non-zero; DoRA's magnitude scaled per unit around its initial W0 norms."""
    rs = np.random.RandomState(seed)
    init = init_adapter(mc, ac, jax.random.key(seed), base_params=params)

    def fill(path, x):
        if path[-1].key == "magnitude":
            return x * jnp.asarray(rs.uniform(0.5, 1.5, x.shape), jnp.float32)
        return jnp.asarray(scale * rs.randn(*x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, init)


# --- apply_adapter: PyTorch against the JAX forward ------------------------------------------------------------

CASES = [
    AdapterConfig(rank=R, alpha=2.0 * R),  # DenseLoRA as the paper: shared E/D, gelu
    AdapterConfig(rank=R, targets=PROJECTIONS, share_across_layers=False, activation="silu"),
    AdapterConfig(method="lora", rank=R, targets=PROJECTIONS, use_rslora=True, alpha=8.0),
    AdapterConfig(method="dora", rank=R, targets=("q_proj", "o_proj", "gate_proj", "down_proj")),
]


@pytest.mark.parametrize("ac", CASES, ids=lambda ac: f"{ac.method}-shared={ac.share_across_layers}")
def test_apply_adapter_matches_the_jax_forward_and_gradients(tiny, tmp_path, ac):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    adapter = random_adapter(mc, params, ac)
    save_adapter(tmp_path / "a", adapter, ac, base_fingerprint=tiny["fp"])
    model = torch_model(tiny["path"])
    assert apply_adapter(model, tmp_path / "a") is model

    # Exactly the target Linear modules are wrapped; everything else is untouched.
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, WRAPPERS)}
    L = mc.num_hidden_layers
    assert set(wrapped) == {f"model.layers.{i}.{GROUP[t]}.{t}" for i in range(L) for t in ac.targets}
    others = [t for t in PROJECTIONS if t not in ac.targets]
    assert all(type(getattr(getattr(model.model.layers[0], GROUP[t]), t)) is torch.nn.Linear for t in others)
    # Only the adapter trains, each shared tensor counted once: exactly the JAX adapter's parameter count.
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == count_adapter_params(mc, ac)
    mods = {(i, t): wrapped[f"model.layers.{i}.{GROUP[t]}.{t}"] for i in range(L) for t in ac.targets}
    if ac.method == "denselora" and ac.share_across_layers:
        assert all(mods[i, t].encoder is mods[0, t].encoder for i, t in mods)
        assert all(mods[i, t].decoder is mods[0, t].decoder for i, t in mods)

    logits_t = torch_logits(model, ids, mask)
    (logits_t * torch.tensor(tiny["cot"])).sum().backward()

    def loss(a):
        logits = jit_forward(mc, params, ids, mask, adapter=a, adapter_config=ac)
        return jnp.sum(logits * tiny["cot"]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapter)
    base = jit_forward(mc, params, ids, mask)
    assert np.abs(real(logits - base, mask)).max() > 0.05 * np.abs(real(base, mask)).max()  # not a no-op
    assert_close(real(logits_t.detach(), mask), real(logits, mask), 1e-4, "logits")

    def torch_grad(x):  # torch [out, in] -> ours [in, out]
        return x.grad.numpy().T

    for (i, t), m in mods.items():
        for name, g in grads["layers"][t].items():
            assert_close(torch_grad(getattr(m, name)), g[i], 1e-4, f"{t} {name} layer {i}")
    for t, tensors in grads.get("shared", {}).items():  # torch accumulated them over all layers
        for name, g in tensors.items():
            assert_close(torch_grad(getattr(mods[0, t], name)), g, 1e-4, f"shared {t} {name}")


@pytest.mark.parametrize("method", ["denselora", "dora"])
def test_dropout_is_active_in_train_mode_only(tiny, tmp_path, method):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    ac = AdapterConfig(method=method, rank=R, dropout=0.3)
    save_adapter(tmp_path / "a", random_adapter(mc, params, ac), ac)
    model = apply_adapter(torch_model(tiny["path"]), tmp_path / "a")
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.3]
    assert len(drops) == mc.num_hidden_layers * len(ac.targets) * (3 if method == "denselora" else 1)
    with torch.no_grad():
        model.train()
        a, b = torch_logits(model, ids, mask), torch_logits(model, ids, mask)
        model.eval()
        c, d = torch_logits(model, ids, mask), torch_logits(model, ids, mask)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    adapter, _ = load_adapter(tmp_path / "a")
    ours = jit_forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac)  # no rng: no dropout
    assert_close(real(c, mask), real(ours, mask), 1e-4, "eval logits")


def test_apply_adapter_refusals(tiny, tmp_path):
    mc, params = tiny["mc"], tiny["params"]
    ac = CASES[0]
    save_adapter(tmp_path / "a", random_adapter(mc, params, ac), ac, base_fingerprint=tiny["fp"])
    model = apply_adapter(torch_model(tiny["path"]), tmp_path / "a")
    with pytest.raises(
        ValueError, match=r"layers\[0\].self_attn.q_proj is a DenseLoRALinear.*already carries"
    ):
        apply_adapter(model, tmp_path / "a")
    with pytest.raises(TypeError, match="expected a transformers LlamaForCausalLM"):
        apply_adapter(model.model, tmp_path / "a")
    # saved for another base: refused, unless forced (the shapes match)
    save_adapter(tmp_path / "b", random_adapter(mc, params, ac), ac, base_fingerprint="0" * 64)
    with pytest.raises(AdapterMismatchError, match=r"fingerprint 0000000000000000.*or force=True"):
        apply_adapter(torch_model(tiny["path"]), tmp_path / "b")
    with pytest.warns(UserWarning, match="loading anyway"):
        apply_adapter(torch_model(tiny["path"]), tmp_path / "b", force=True)
    # made for another model shape
    wide = mc.replace(intermediate_size=2 * mc.intermediate_size)
    other = init_adapter(wide, AdapterConfig(method="lora", rank=R), jax.random.key(0))
    save_adapter(tmp_path / "c", other, AdapterConfig(method="lora", rank=R))
    with pytest.raises(AdapterMismatchError, match="another model shape"):
        apply_adapter(torch_model(tiny["path"]), tmp_path / "c")


@pytest.mark.slow
def test_apply_adapter_on_smollm2(smollm2_gguf, tmp_path):
    hf = LlamaForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    mc, params = load_pretrained(smollm2_gguf)
    ids = load_tokenizer(smollm2_gguf)("The capital of France is", return_tensors="np")["input_ids"]
    mask = np.ones_like(ids)
    ac = AdapterConfig(rank=8)  # DenseLoRA, paper targets, shared E/D
    adapter = random_adapter(mc, params, ac, scale=0.15)
    save_adapter(tmp_path / "a", adapter, ac, base_fingerprint=fingerprint(mc, params))
    with torch.no_grad():
        base_t = torch_logits(hf, ids, mask).numpy()
        adapted_t = torch_logits(apply_adapter(hf, tmp_path / "a"), ids, mask).numpy()
    base = np.asarray(jit_forward(mc, params, ids, mask))
    adapted = np.asarray(jit_forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac))
    assert np.abs(adapted - base).max() > 0.05 * np.abs(base).max()  # the adapter really changes the model
    assert_close(adapted_t, adapted, 1e-4, "adapted logits")
    assert_close(adapted_t - base_t, adapted - base, 1e-3, "the adapter's effect on the logits")


# --- PEFT LoRA / DoRA directories --------------------------------------------------------------------------------

PEFT_CASES = [
    dict(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], use_rslora=True),
    dict(
        r=R, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj"], use_dora=True, lora_dropout=0.1
    ),
]


def save_peft(path, tiny_path, seed=0, **kw):
    """A peft LoRA/DoRA model with every adapter tensor random, saved by peft's save_pretrained."""
    model = peft.get_peft_model(torch_model(tiny_path), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kw", PEFT_CASES, ids=["lora-rslora", "dora"])
def test_peft_directory_loads_with_parity(tiny, tmp_path, kw):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    peft_model = save_peft(tmp_path / "p", tiny["path"], **kw)
    adapter, ac = load_adapter(tmp_path / "p", model_config=mc)
    assert ac == AdapterConfig(
        method="dora" if kw.get("use_dora") else "lora",
        rank=kw["r"],
        alpha=kw["lora_alpha"],
        dropout=kw.get("lora_dropout", 0.0),
        targets=kw["target_modules"],
        use_rslora=kw.get("use_rslora", False),
    )
    with torch.no_grad():
        ref = torch_logits(peft_model, ids, mask)
        # the same directory through denselora_jax.torch
        ours_t = torch_logits(apply_adapter(torch_model(tiny["path"]), tmp_path / "p"), ids, mask)
    ours = jit_forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac)
    base = jit_forward(mc, params, ids, mask)
    assert np.abs(real(ours - base, mask)).max() > 0.05 * np.abs(real(base, mask)).max()
    assert_close(real(ours, mask), real(ref, mask), 1e-4, "JAX vs peft")
    assert_close(real(ours_t, mask), real(ref, mask), 1e-5, "denselora_jax.torch vs peft")


def test_peft_lora_continues_training(tiny, tmp_path):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    save_peft(tmp_path / "p", tiny["path"], **PEFT_CASES[0], lora_dropout=0.05)
    adapter, ac = load_adapter(tmp_path / "p", model_config=mc)
    tx = optax.adam(1e-2)
    batch = {
        "input_ids": ids[None],
        "attention_mask": mask[None],
        "loss_mask": mask[None],
    }  # [accum, rows, T]
    step = jax.jit(partial(train_step, mc, ac, tx, False))
    new, _, metrics = step(adapter, tx.init(adapter), params, batch, jax.random.key(0))
    assert bool(metrics["finite"]) and not bool(metrics["skipped"])
    assert jax.tree.structure(new) == jax.tree.structure(adapter)
    assert all(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(adapter))
    )

    rows = {k: v[0] for k, v in batch.items()}

    def loss(a):
        nll, n = jax.jit(loss_sums, static_argnums=(0, 1))(mc, ac, a, params, rows, None)
        return float(nll / n)

    assert loss(new) < loss(adapter)
    save_adapter(tmp_path / "ours", new, ac)  # from then on it is one of this project's adapters
    assert load_adapter(tmp_path / "ours")[1] == ac


@pytest.fixture(scope="module")
def peft_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "p"
    save_peft(path, tiny["path"], r=R, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return path


def edited(peft_dir, tmp_path, config=None, drop=(), add=None):
    """A copy of the PEFT directory with config entries changed and tensors dropped or added."""
    path = tmp_path / "edited"
    shutil.copytree(peft_dir, path)
    meta = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**meta, **(config or {})}))
    tensors = safetensors.numpy.load_file(path / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)} | (add or {})
    safetensors.numpy.save_file(tensors, path / "adapter_model.safetensors")
    return path


A0 = "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(config={"bias": "all"}), r"bias='all' \(trained bias terms\)"),
        (dict(config={"lora_bias": True}), r"lora_bias=True \(LoRA bias terms\)"),
        (
            dict(config={"modules_to_save": ["lm_head"]}),
            r"modules_to_save=\['lm_head'\] \(fully trained extra",
        ),
        (dict(config={"rank_pattern": {"q_proj": 2}}), "layer-specific ranks"),
        (dict(config={"alpha_pattern": {"q_proj": 2}}), "layer-specific alphas"),
        (dict(config={"layers_to_transform": [0]}), "only some layers adapted"),
        (dict(config={"init_lora_weights": "pissa"}), "'pissa' \\(changes the base weights\\)"),
        (dict(config={"use_qalora": True}), r"use_qalora=True \(not implemented here\)"),
        (dict(config={"peft_type": "IA3"}), "a PEFT IA3 adapter"),
        (dict(add={"base_model.model.lm_head.lora_A.weight": np.zeros((R, 64), np.float32)}), "lm_head"),
        (dict(drop=["layers.1.self_attn.q_proj"]), r"q_proj is adapted in layers \[0, 2\] only"),
        (dict(drop=["layers.1.mlp.down_proj.lora_B"]), r"down_proj is adapted in layers \[0, 2\] only"),
        (dict(add={A0.format(i=2): np.zeros((R + 1, 64), np.float32)}), "q_proj has layer-specific ranks"),
        (
            dict(config={"use_dora": True}),
            r"missing \['base_model.model.model.layers.0.mlp.down_proj.lora_mag",
        ),
    ],
)
def test_unsupported_peft_features_are_refused(peft_dir, tmp_path, edit, message):
    with pytest.raises(AdapterFileError, match=message) as e:
        load_adapter(edited(peft_dir, tmp_path, **edit))
    assert "can be imported" in str(e.value) or "missing" in message


def test_peft_directory_for_another_model_or_format(tiny, peft_dir, tmp_path):
    with pytest.raises(AdapterMismatchError, match="another model shape"):
        load_adapter(peft_dir, model_config=tiny["mc"].replace(hidden_size=32))
    with pytest.raises(AdapterMismatchError, match="3 layers vs 4"):
        load_adapter(peft_dir, model_config=tiny["mc"].replace(num_hidden_layers=4))
    path = edited(peft_dir, tmp_path)
    os.rename(path / "adapter_model.safetensors", path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"only adapter_model\.bin.*safe_serialization=True"):
        load_adapter(path)


# --- merge --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ac", CASES[2:], ids=lambda ac: ac.method)
def test_merge_cli_writes_a_model_equal_to_base_plus_adapter(tiny, tmp_path, capsys, ac):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    adapter = random_adapter(mc, params, ac)
    save_adapter(tmp_path / "a", adapter, ac, base_fingerprint=tiny["fp"])
    out = tmp_path / "merged"
    assert main(["--model", str(tiny["path"]), "--adapter", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    want = jit_forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac)
    mc2, merged = load_pretrained(out)
    assert mc2 == mc
    assert_close(real(jit_forward(mc2, merged, ids, mask), mask), real(want, mask), 1e-5, "merged (JAX)")
    with torch.no_grad():
        hf = torch_logits(torch_model(out), ids, mask)
    assert_close(real(hf, mask), real(want, mask), 1e-4, "merged (transformers)")
    text = "w5 w17 w3 nonsense w99"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(tiny["path"])(text)["input_ids"]
    )

    # merge_lora itself leaves the base untouched and changes exactly the target kernels
    again = merge_lora(mc, params, adapter, ac)
    flat, flat_base = jax.tree_util.tree_flatten_with_path(again)[0], jax.tree.leaves(params)
    changed = {jax.tree_util.keystr(p) for (p, x), y in zip(flat, flat_base) if x is not y}
    assert changed == {f"['layers']['{GROUP[t]}']['{t}']['kernel']" for t in ac.targets}


def test_merged_peft_adapter_equals_peft_merge_and_unload(tiny, tmp_path):
    ids, mask = tiny["ids"], tiny["mask"]
    peft_model = save_peft(tmp_path / "p", tiny["path"], **PEFT_CASES[1])  # DoRA, with an attention bias
    out = tmp_path / "merged"
    assert main(["--model", str(tiny["path"]), "--adapter", str(tmp_path / "p"), "--out", str(out)]) == 0
    with torch.no_grad():
        want = torch_logits(peft_model.merge_and_unload(), ids, mask)
        got = torch_logits(torch_model(out), ids, mask)
    assert_close(real(got, mask), real(want, mask), 1e-5, "merged by us vs by peft")


def test_merge_refusals(tiny, tmp_path, capsys):
    mc, params = tiny["mc"], tiny["params"]
    ac = CASES[0]
    adapter = random_adapter(mc, params, ac)
    save_adapter(tmp_path / "dense", adapter, ac)
    out = tmp_path / "out"
    args = ["--model", str(tiny["path"]), "--out", str(out), "--adapter"]
    assert main([*args, str(tmp_path / "dense")]) == 2
    assert "DenseLoRA cannot be merged" in capsys.readouterr().err and not out.exists()
    with pytest.raises(NotMergeableError, match="non-linear in x"):
        merge_lora(mc, params, adapter, ac)

    lora = AdapterConfig(method="lora", rank=R)
    save_adapter(tmp_path / "lora", random_adapter(mc, params, lora), lora, base_fingerprint="0" * 64)
    assert main([*args, str(tmp_path / "lora")]) == 2
    assert "or force=True" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match="loading anyway"):
        assert main([*args, str(tmp_path / "lora"), "--force"]) == 0
    assert main([*args, str(tmp_path / "lora"), "--force"]) == 2  # out now holds a model
    assert "not an empty directory" in capsys.readouterr().err


# --- PEFT plug-in ---------------------------------------------------------------------------------------------------


def test_peft_cannot_register_a_third_party_method():
    """Why denselora_jax.torch.apply_adapter and not a PEFT method (see its docstring): PEFT's registration only
    accepts names already in its closed PeftType enum. If this fails, peft opened it: register DenseLoRA."""
    with pytest.raises(
        ValueError, match=r"Unknown PEFT type DENSELORA, please add an entry to peft\.utils\.peft_types"
    ):
        peft.utils.register_peft_method(name="denselora", config_cls=peft.PeftConfig, model_cls=None)
    assert "DENSELORA" not in {t.name for t in peft.utils.PeftType}

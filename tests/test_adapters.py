"""DenseLoRA / LoRA / DoRA on the frozen model: identity at init, gradients only to the adapter, parity with an
independent PyTorch DenseLoRA wired into transformers' LlamaForCausalLM and with `peft` (LoRA, DoRA), dropout,
and one clear error per bad configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from denselora_jax import PAPER_TARGETS, PROJECTIONS, AdapterConfig, abstract_adapter, forward, init_adapter
from denselora_jax.model.loading import load_pretrained

TINY = dict(  # GQA: 4 query heads share 2 key/value heads
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)
GROUP = {t: "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for t in PROJECTIONS}
R = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLaMA written with save_pretrained and read back with load_pretrained."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    mc, params = load_pretrained(path)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, TINY["vocab_size"], (2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # left padding
    cotangent = rs.randn(*ids.shape, TINY["vocab_size"]).astype(np.float32) * mask[..., None]
    return dict(path=path, mc=mc, params=params, ids=ids, mask=mask, cot=cotangent)


def torch_model(path) -> LlamaForCausalLM:
    # eager attention: fully masked (left-pad) query rows stay finite, as in ours
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def torch_loss(model, t):
    pos = np.maximum(t["mask"].cumsum(-1) - 1, 0)
    logits = model(
        torch.tensor(t["ids"]), attention_mask=torch.tensor(t["mask"]), position_ids=torch.tensor(pos)
    ).logits
    return (logits * torch.tensor(t["cot"])).sum(), logits.detach().numpy()


def jax_loss_and_grad(t, adapter, ac):
    def loss(a):
        logits = forward(t["mc"], t["params"], t["ids"], t["mask"], adapter=a, adapter_config=ac)
        return jnp.sum(logits * t["cot"]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapter)
    return np.asarray(logits), grads


def assert_close(ours, ref, rel=1e-4, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert scale > 0 and err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def real(logits, mask):
    return logits[mask.astype(bool)]


# --- identity at initialisation --------------------------------------------------------------------------

INIT_CASES = [
    AdapterConfig(rank=R),
    AdapterConfig(rank=R, targets=PROJECTIONS, share_across_layers=False, activation="silu"),
    AdapterConfig(method="lora", rank=R, targets=PROJECTIONS, use_rslora=True),
    AdapterConfig(method="dora", rank=R, targets=PROJECTIONS),
]


@pytest.mark.parametrize("ac", INIT_CASES, ids=lambda ac: f"{ac.method}-{len(ac.targets)}")
def test_init_is_exactly_the_base_model(tiny, ac):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"][:1, :5], tiny["mask"][:1, :5]
    adapter = init_adapter(mc, ac, jax.random.key(1), base_params=params)
    # Op by op, every base computation runs the very same kernel with and without the adapter: bitwise equal.
    with jax.disable_jit():
        base = np.asarray(forward(mc, params, ids, mask))
        adapted = np.asarray(forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac))
    np.testing.assert_array_equal(adapted, base)
    # Compiled, XLA may pick another matmul kernel for the base projection once the graph around it changes
    # (a last-bit difference); the adapter itself still adds nothing.
    compiled = forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac)
    assert_close(compiled, base, rel=1e-6, what="compiled")


# --- gradients reach the adapter only ----------------------------------------------------------------------


def _dot_shapes_and_prims(jaxpr, shapes=None, prims=None):
    """Output shapes of every dot_general and every primitive name, in all nested jaxprs (scan, remat, ...)."""
    shapes, prims = (set() if shapes is None else shapes), (set() if prims is None else prims)
    for eqn in jaxpr.eqns:
        prims.add(eqn.primitive.name)
        if eqn.primitive.name == "dot_general":
            shapes.add(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    _dot_shapes_and_prims(inner, shapes, prims)
    return shapes, prims


@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_gradients_reach_only_the_adapter(tiny, method):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    ac = AdapterConfig(method=method, rank=R, targets=PROJECTIONS)
    adapter = jax.tree.map(
        lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape),
        init_adapter(mc, ac, jax.random.key(0)),
    )

    def loss(a, p):
        return jnp.sum(forward(mc, p, ids, mask, adapter=a, adapter_config=ac) * tiny["cot"])

    grads = jax.grad(lambda a: loss(a, params))(adapter)  # the base is closed over: a constant
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
        lambda a: (a.shape, a.dtype), abstract_adapter(mc, ac)
    )
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))

    # A base weight's gradient is a dot_general producing a kernel-shaped array (or, for the embedding, a
    # scatter-add). The adapter's gradient program has none; the full gradient (the control) has them.
    kernel_2d = {(i, o) for i, o in mc.projection_dims().values()} | {
        (o, i) for i, o in mc.projection_dims().values()
    }
    base_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim > 1}
    base_shapes |= {s[1:] for s in base_shapes} | {s[::-1] for s in base_shapes} | kernel_2d
    adapter_only = jax.make_jaxpr(jax.grad(loss, argnums=0))(adapter, params).jaxpr
    shapes, prims = _dot_shapes_and_prims(adapter_only)
    assert not shapes & base_shapes and "scatter-add" not in prims
    both = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(adapter, params).jaxpr
    shapes, prims = _dot_shapes_and_prims(both)
    for t, (i, o) in mc.projection_dims().items():
        assert {(i, o), (o, i)} & shapes, t
    assert "scatter-add" in prims


# --- DenseLoRA against an independent PyTorch implementation ------------------------------------------------


class TorchDenseLoRA(torch.nn.Module):
    """y = W0 x + s * act(D @ M @ act(E @ x)), the paper's formula (no dropout), around a frozen nn.Linear."""

    def __init__(self, base, E, M, D, s, act):
        super().__init__()
        self.base, self.E, self.M, self.D, self.s, self.act = base, E, M, D, s, act

    def forward(self, x):
        h = self.act(torch.nn.functional.linear(x, self.E))
        return self.base(x) + self.s * self.act(torch.nn.functional.linear(h @ self.M.T, self.D))


TORCH_ACT = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}
DENSE_CASES = [  # alpha = 2r: the paper's scaling s = 2
    AdapterConfig(rank=R, alpha=2.0 * R, targets=PAPER_TARGETS),
    AdapterConfig(rank=R, alpha=2.0 * R, targets=("v_proj", "o_proj", "gate_proj")),
    AdapterConfig(
        rank=R,
        alpha=2.0 * R,
        targets=("q_proj", "o_proj", "gate_proj", "down_proj"),
        share_across_layers=False,
    ),
    AdapterConfig(rank=R, targets=PROJECTIONS, activation="relu", alpha=8.0),
]


@pytest.mark.parametrize("ac", DENSE_CASES, ids=lambda ac: f"{'-'.join(ac.targets)}-{ac.share_across_layers}")
def test_denselora_matches_pytorch(tiny, ac):
    model = torch_model(tiny["path"])
    for p in model.parameters():
        p.requires_grad_(False)
    L, dims, g = TINY["num_hidden_layers"], tiny["mc"].projection_dims(), torch.Generator().manual_seed(1)

    def param(*shape, scale):
        return torch.nn.Parameter(scale * torch.randn(*shape, generator=g))

    E, D, M = {}, {}, {}  # torch orientation (out x in); keyed (target, layer)
    for t in ac.targets:
        d_in, d_out = dims[t]
        shared_E, shared_D = param(R, d_in, scale=0.3), param(d_out, R, scale=0.3)
        for layer in range(L):
            E[t, layer] = shared_E if ac.share_across_layers else param(R, d_in, scale=0.3)
            D[t, layer] = shared_D if ac.share_across_layers else param(d_out, R, scale=0.3)
            M[t, layer] = param(R, R, scale=0.5)
            parent = getattr(model.model.layers[layer], GROUP[t])
            base = getattr(parent, t)
            setattr(
                parent,
                t,
                TorchDenseLoRA(
                    base, E[t, layer], M[t, layer], D[t, layer], ac.scaling, TORCH_ACT[ac.activation]
                ),
            )

    # Our tree, built from the torch tensors by the layout in adapters/core.py: [in, out] = torch.T.
    def ours(x):
        return jnp.asarray(x.detach().numpy().T)

    def stack(tensors, t):
        return jnp.stack([ours(tensors[t, layer]) for layer in range(L)])

    adapter = {"layers": {t: {"dense": stack(M, t)} for t in ac.targets}}
    if ac.share_across_layers:
        adapter["shared"] = {t: {"encoder": ours(E[t, 0]), "decoder": ours(D[t, 0])} for t in ac.targets}
    else:
        for t in ac.targets:
            adapter["layers"][t] |= {"encoder": stack(E, t), "decoder": stack(D, t)}
    assert jax.tree.map(jnp.shape, adapter) == jax.tree.map(jnp.shape, abstract_adapter(tiny["mc"], ac))

    loss, ref_logits = torch_loss(model, tiny)
    loss.backward()
    logits, grads = jax_loss_and_grad(tiny, adapter, ac)
    mask = tiny["mask"]
    base = np.asarray(forward(tiny["mc"], tiny["params"], tiny["ids"], mask))
    assert np.abs(real(ref_logits - base, mask)).max() > 0.05 * np.abs(real(base, mask)).max()  # not a no-op
    assert_close(real(logits, mask), real(ref_logits, mask), what="logits")
    for t in ac.targets:
        for layer in range(L):
            assert_close(
                grads["layers"][t]["dense"][layer], M[t, layer].grad.numpy().T, what=f"M {t} {layer}"
            )
            if not ac.share_across_layers:
                assert_close(grads["layers"][t]["encoder"][layer], E[t, layer].grad.numpy().T, what=f"E {t}")
                assert_close(grads["layers"][t]["decoder"][layer], D[t, layer].grad.numpy().T, what=f"D {t}")
        if ac.share_across_layers:  # torch accumulates the shared tensors' gradient over all layers
            assert_close(grads["shared"][t]["encoder"], E[t, 0].grad.numpy().T, what=f"E {t}")
            assert_close(grads["shared"][t]["decoder"], D[t, 0].grad.numpy().T, what=f"D {t}")


# --- LoRA and DoRA against peft ------------------------------------------------------------------------------

PEFT_CASES = [
    AdapterConfig(method="lora", rank=R),
    AdapterConfig(method="lora", rank=R, targets=PROJECTIONS, use_rslora=True, alpha=8.0),
    AdapterConfig(method="dora", rank=R),
    AdapterConfig(method="dora", rank=R, targets=("o_proj", "gate_proj", "down_proj"), use_rslora=True),
]


@pytest.mark.parametrize("ac", PEFT_CASES, ids=lambda ac: f"{ac.method}-{len(ac.targets)}-{ac.use_rslora}")
def test_lora_and_dora_match_peft(tiny, ac):
    cfg = peft.LoraConfig(
        r=R,
        lora_alpha=ac.alpha,
        target_modules=list(ac.targets),
        lora_dropout=0.0,
        use_dora=ac.method == "dora",
        use_rslora=ac.use_rslora,
    )
    model = peft.get_peft_model(torch_model(tiny["path"]), cfg)
    L, g = TINY["num_hidden_layers"], torch.Generator().manual_seed(2)
    mods = {
        (t, layer): getattr(getattr(model.base_model.model.model.layers[layer], GROUP[t]), t)
        for t in ac.targets
        for layer in range(L)
    }

    ours_init = init_adapter(tiny["mc"], ac, jax.random.key(0), base_params=tiny["params"])
    with torch.no_grad():
        for (t, layer), m in mods.items():
            if ac.method == "dora":  # our initial magnitude is peft's: the column norms of W0
                mag = m.lora_magnitude_vector["default"].weight
                assert_close(
                    ours_init["layers"][t]["magnitude"][layer], mag.numpy(), rel=1e-6, what="magnitude"
                )
                mag.mul_(0.5 + torch.rand(mag.shape, generator=g))
            for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                w.copy_(0.2 * torch.randn(w.shape, generator=g))

    def stack(get, t):
        return jnp.stack([jnp.asarray(get(mods[t, layer]).detach().numpy().T) for layer in range(L)])

    adapter = {"layers": {}}
    for t in ac.targets:
        adapter["layers"][t] = {
            "lora_A": stack(lambda m: m.lora_A["default"].weight, t),
            "lora_B": stack(lambda m: m.lora_B["default"].weight, t),
        }
        if ac.method == "dora":
            adapter["layers"][t]["magnitude"] = stack(lambda m: m.lora_magnitude_vector["default"].weight, t)
    assert jax.tree.structure(adapter) == jax.tree.structure(ours_init)

    loss, ref_logits = torch_loss(model, tiny)
    loss.backward()
    logits, grads = jax_loss_and_grad(tiny, adapter, ac)
    assert_close(real(logits, tiny["mask"]), real(ref_logits, tiny["mask"]), what="logits")
    for (t, layer), m in mods.items():
        assert_close(
            grads["layers"][t]["lora_A"][layer], m.lora_A["default"].weight.grad.numpy().T, what=f"A {t}"
        )
        assert_close(
            grads["layers"][t]["lora_B"][layer], m.lora_B["default"].weight.grad.numpy().T, what=f"B {t}"
        )
        if ac.method == "dora":
            mag = m.lora_magnitude_vector["default"].weight.grad.numpy()
            assert_close(grads["layers"][t]["magnitude"][layer], mag, what=f"magnitude {t}")


# --- dropout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["denselora", "lora", "dora"])
def test_dropout_only_with_an_rng(tiny, method):
    mc, params, ids, mask = tiny["mc"], tiny["params"], tiny["ids"], tiny["mask"]
    ac = AdapterConfig(method=method, rank=R, dropout=0.3)
    adapter = init_adapter(mc, ac, jax.random.key(0), base_params=params)
    adapter = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(x.size), x.shape), adapter)
    run = jax.jit(lambda a, rng: forward(mc, params, ids, mask, adapter=a, adapter_config=ac, rng=rng))
    det = jax.jit(lambda a: forward(mc, params, ids, mask, adapter=a, adapter_config=ac))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(det(adapter), det(adapter))
    np.testing.assert_array_equal(run(adapter, k1), run(adapter, k1))
    assert np.abs(real(run(adapter, k1) - det(adapter), mask)).max() > 1e-3
    assert np.abs(real(run(adapter, k1) - run(adapter, k2), mask)).max() > 1e-3
    # without dropout in the config, an rng changes nothing
    ac0 = AdapterConfig(method=method, rank=R, dropout=0.0)
    out0 = forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac0, rng=k1)
    np.testing.assert_allclose(
        out0, forward(mc, params, ids, mask, adapter=adapter, adapter_config=ac0), atol=1e-5
    )


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-4), "rank must be a positive integer"),
        (dict(targets=("q_proj", "qkv_proj")), "unknown projection(s) ['qkv_proj']"),
        (dict(targets=("self_attn.q",)), "o_proj, gate_proj"),
        (dict(method="vera"), "methods: denselora, lora, dora"),
    ],
)
def test_bad_adapter_config_is_one_clear_error(kw, message):
    with pytest.raises(ValueError) as e:
        AdapterConfig(**kw)
    assert message in str(e.value)


def test_dora_init_needs_the_base(tiny):
    with pytest.raises(ValueError, match="pass base_params"):
        init_adapter(tiny["mc"], AdapterConfig(method="dora", rank=R), jax.random.key(0))

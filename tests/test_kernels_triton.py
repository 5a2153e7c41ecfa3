"""Triton kernels against the torch references (fp32 and bf16).

Runs on CUDA with triton installed (`pip install -e .[gpu,test]`), and skips otherwise. Without a
GPU the kernels' logic can still be checked on CPU with triton's interpreter:
`TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py` (fp32 only: the interpreter cannot do
bf16 dots; smaller shapes; NumPy < 2.3, see kernels/README.md).
"""

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and (DEVICE == "cuda" or INTERPRET)),
    reason="needs triton and CUDA (pip install -e .[gpu]), or TRITON_INTERPRET=1",
)

from looprl.kernels import (  # noqa: E402
    LoRAFactors,
    chunked_logprobs_and_entropy,
    enable_fused_moe_lora,
    moe_lora_experts,
    naive_logprobs_and_entropy,
)
from looprl.kernels.moe_lora import TorchGrouped  # noqa: E402

DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="triton's interpreter cannot do bf16 dots"))]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


def skewed_routing(T, E, k, g):
    """Top-k routing where expert 0 is hot, the last expert is never chosen."""
    logits = torch.randn(T, E, generator=g, device=DEVICE)
    logits[:, 0] += 2.0
    logits[:, -1] = -1e9
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def sorted_routes(T, E, k, g):
    """(order, counts): order sorts the T*k skewed top-k routes by expert (stable), counts per expert."""
    idx, _ = skewed_routing(T, E, k, g)
    flat = idx.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=E)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("with_rows", [True, False])
def test_grouped_primitives_match_torch(dtype, trans, with_rows):
    from looprl.kernels.triton_moe_lora import TritonGrouped

    g = gen()
    T, E, k, K, N, r = (333, 9, 3, 200, 150, 12) if not INTERPRET else (70, 5, 2, 40, 36, 6)

    def rand(*shape):  # nothing below is a multiple of the block sizes
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    order, counts = sorted_routes(T, E, k, g)
    rows = order // k if with_rows else None
    x = rand(T if with_rows else order.numel(), K)
    w = rand(E, N, K) if trans else rand(E, K, N)
    xa = rand(order.numel(), r)
    b = rand(E, N, r) if trans else rand(E, r, N)

    ref, tri = TorchGrouped(), TritonGrouped()
    p_ref, p_tri = ref.plan(counts, order.numel()), tri.plan(counts, order.numel(), dtype)
    for lora in (None, (xa, b, 0.37)):
        torch.testing.assert_close(tri.gmm(x, w, p_tri, rows=rows, trans=trans, lora=lora),
                                   ref.gmm(x, w, p_ref, rows=rows, trans=trans, lora=lora), **tol(dtype))
    out_t, out_r = tri.gouter(x, xa, p_tri, rows=rows, scale=0.5), ref.gouter(x, xa, p_ref, rows=rows, scale=0.5)
    assert out_t[-1].abs().max() == 0  # the idle expert
    assert rel_err(out_t, out_r) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the epilogue: routing weight (fp32) times each row, rows stored back in (token, slot) order
    rw = torch.rand(order.numel(), generator=g, device=DEVICE)
    kw = dict(rows=rows, trans=trans, lora=(xa, b, 0.37), row_scale=rw, out_rows=order)
    scattered = tri.gmm(x, w, p_tri, **kw)
    torch.testing.assert_close(scattered, ref.gmm(x, w, p_ref, **kw), **tol(dtype))
    plain = ref.gmm(x, w, p_ref, rows=rows, trans=trans, lora=(xa, b, 0.37))
    torch.testing.assert_close(scattered[order], (plain.float() * rw[:, None]).to(dtype), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("r", [6, 80])
def test_gmm_lora_computes_side_product_in_the_projection(dtype, trans, r):
    """gmm_lora: out = x op(w) + s (x op(p)) op(q) and the side product x op(p) from one launch
    (r <= 64), over several column tiles (only the first stores the side product), or two (r > 64)."""
    from looprl.kernels.triton_moe_lora import TritonGrouped

    g = gen()
    T, E, k, K, N = (333, 9, 3, 200, 300) if not INTERPRET else (50, 5, 2, 40, 150)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=DEVICE) * K ** -0.5).to(dtype)

    order, counts = sorted_routes(T, E, k, g)
    x = rand(T, K)
    w, p, q = (rand(E, N, K), rand(E, r, K), rand(E, N, r)) if trans else (rand(E, K, N), rand(E, K, r), rand(E, r, N))
    rw = torch.rand(order.numel(), generator=g, device=DEVICE)
    ref, tri = TorchGrouped(), TritonGrouped()
    p_ref, p_tri = ref.plan(counts, order.numel()), tri.plan(counts, order.numel(), dtype)
    for kw in (dict(rows=order // k), dict(rows=order // k, row_scale=rw, out_rows=order)):
        out_t, side_t = tri.gmm_lora(x, w, p_tri, (p, q, 0.37), trans=trans, **kw)
        out_r, side_r = ref.gmm_lora(x, w, p_ref, (p, q, 0.37), trans=trans, **kw)
        assert side_t.shape == (order.numel(), r)
        torch.testing.assert_close(side_t, side_r, **tol(dtype))
        torch.testing.assert_close(out_t, out_r, **tol(dtype))
    # a zero LoRA scale (alpha 0): the launch skips the LoRA product but still stores the side product
    out_t, side_t = tri.gmm_lora(x, w, p_tri, (p, q, 0.0), rows=order // k, trans=trans)
    torch.testing.assert_close(side_t, side_r, **tol(dtype))
    torch.testing.assert_close(out_t, ref.gmm(x, w, p_ref, rows=order // k, trans=trans), **tol(dtype))


@pytest.fixture
def tma_tiles(monkeypatch):
    """Every projection tile switched to TMA loads. Returns the block shapes of the descriptors made,
    so a test can tell the TMA path ran (odd strides fall back to pointer loads silently)."""
    from dataclasses import replace

    from looprl.kernels import triton_moe_lora as tm

    wide = {key: {kind: replace(c, tma=True) for kind, c in by_kind.items()}
            for key, by_kind in tm.TritonGrouped.WIDE.items()}
    monkeypatch.setattr(tm.TritonGrouped, "WIDE", wide)
    made, real = [], tm.TensorDescriptor.from_tensor

    def from_tensor(t, block_shape, padding="zero"):
        made.append(tuple(block_shape))
        return real(t, block_shape, padding)

    monkeypatch.setattr(tm.TensorDescriptor, "from_tensor", staticmethod(from_tensor))
    return made


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("with_rows", [True, False])
def test_tma_loads_match_torch(dtype, trans, with_rows, tma_tiles):
    """Weight tiles (and rows already sorted by expert) by TMA: the boxes run past N, K, the last
    row, and (sorted rows) into the next expert's rows; none of that may reach the output."""
    from looprl.kernels.triton_moe_lora import TritonGrouped

    g = gen()
    # 16-byte aligned strides (TMA needs them), nothing a multiple of the block sizes
    T, E, k, K, N, r = (333, 9, 3, 200, 296, 12) if not INTERPRET else (50, 5, 2, 40, 72, 6)  # N > 64: wide

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=DEVICE) * K ** -0.5).to(dtype)

    order, counts = sorted_routes(T, E, k, g)
    rows = order // k if with_rows else None
    x = rand(T if with_rows else order.numel(), K)
    w, p, q = (rand(E, N, K), rand(E, r, K), rand(E, N, r)) if trans else (rand(E, K, N), rand(E, K, r), rand(E, r, N))
    rw = torch.rand(order.numel(), generator=g, device=DEVICE)
    ref, tri = TorchGrouped(), TritonGrouped()
    p_ref, p_tri = ref.plan(counts, order.numel()), tri.plan(counts, order.numel(), dtype)
    torch.testing.assert_close(tri.gmm(x, w, p_tri, rows=rows, trans=trans),
                               ref.gmm(x, w, p_ref, rows=rows, trans=trans), **tol(dtype))
    kw = dict(rows=rows, trans=trans, row_scale=rw, out_rows=order)
    out_t, side_t = tri.gmm_lora(x, w, p_tri, (p, q, 0.37), **kw)
    out_r, side_r = ref.gmm_lora(x, w, p_ref, (p, q, 0.37), **kw)
    torch.testing.assert_close(side_t, side_r, **tol(dtype))
    torch.testing.assert_close(out_t, out_r, **tol(dtype))
    c = TritonGrouped.WIDE[TritonGrouped._key(dtype)][(with_rows, trans)]
    w_box = (1, c.block_n, c.block_k) if trans else (1, c.block_k, c.block_n)
    x_boxes = [] if with_rows else [(p_tri.block_m, c.block_k)]
    assert tma_tiles == [w_box, *x_boxes] * 2  # gmm, then gmm_lora: one launch each


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_kernels_match_torch(dtype):
    from looprl.kernels.triton_moe_lora import TritonGrouped

    g = gen()
    n, i_dim = (300, 200) if not INTERPRET else (20, 40)
    h = torch.randn(n, 2 * i_dim, generator=g, device=DEVICE).to(dtype)
    ga = torch.randn(n, i_dim, generator=g, device=DEVICE).to(dtype)
    rw = torch.rand(n, generator=g, device=DEVICE).to(dtype)
    ref, tri = TorchGrouped(), TritonGrouped()
    act = torch.nn.functional.silu
    torch.testing.assert_close(tri.glu_forward(h, act), ref.glu_forward(h, act), **tol(dtype))
    for name, a, b in zip(["a", "d_h", "d_rw"], tri.glu_backward(h, ga, rw, act), ref.glu_backward(h, ga, rw, act)):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [False, True])
def test_moe_lora_triton_matches_torch_reference(dtype, tma, request):
    made = request.getfixturevalue("tma_tiles") if tma else None
    g = gen()
    # interpreter: I and H > 64, so the projections take the wide (TMA-capable) tiles
    T, H, I, E, k, r = (513, 256, 96, 16, 4, 16) if not INTERPRET else (70, 80, 72, 5, 2, 6)
    idx, w = skewed_routing(T, E, k, g)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)

    x = rand(T, H).requires_grad_()
    w = w.to(dtype).requires_grad_()
    wgu, wd = rand(E, 2 * I, H, scale=H ** -0.5), rand(E, H, I, scale=I ** -0.5)
    lora = [rand(E, r, H, scale=H ** -0.5), rand(E, 2 * I, r, scale=0.1),
            rand(E, r, I, scale=I ** -0.5), rand(E, H, r, scale=0.1)]
    for t in lora:
        t.requires_grad_()
    grad_out = rand(T, H)

    def run(impl):
        out = moe_lora_experts(x, idx, w, wgu, wd, LoRAFactors(lora[0], lora[1], 2.0),
                               LoRAFactors(lora[2], lora[3], 2.0), impl=impl)
        return [out, *torch.autograd.grad(out, [x, w, *lora], grad_out)]

    names = ["out", "d_hidden", "d_weights", "d_A_gate_up", "d_B_gate_up", "d_A_down", "d_B_down"]
    for name, a, b in zip(names, run("triton"), run("torch")):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 2e-2), name
    if tma:  # 4 projections, each with a weight descriptor; down fwd and gate_up bwd read sorted rows
        assert sum(len(box) == 3 for box in made) == 4 and sum(len(box) == 2 for box in made) == 2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_triton_model_matches_peft(family):
    from test_kernels import forward_backward, tiny_peft

    model = tiny_peft(family).to(DEVICE)
    model.base_model.model.set_experts_implementation("eager")  # the reference loop, any dtype/device
    ids = torch.randint(0, 128, (2, 17), device=DEVICE)
    ref_logits, ref_grads = forward_backward(model, ids)
    assert enable_fused_moe_lora(model, "triton") == 2
    logits, grads = forward_backward(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [64, 1000, 4096])
def test_triton_logprobs_match_naive(dtype, chunk_size):
    g = gen()
    B, T, H, V = (3, 70, 128, 3001) if not INTERPRET else (2, 6, 16, 1201)
    hidden = torch.randn(B, T, H, generator=g, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=DEVICE) * H ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g, device=DEVICE)
    labels[0, :2] = -100
    labels[1, 0], labels[1, 1], labels[1, 2] = V - 1, 0, 999  # last / first id; 999 ends a 1000-chunk
    gl = torch.randn(B, T, generator=g, device=DEVICE)
    ge = torch.randn(B, T, generator=g, device=DEVICE)

    def run(fn, **kw):
        lp, ent = fn(hidden, weight, labels, temperature=0.8, **kw)
        return [lp, ent, *torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), [hidden, weight])]

    tri = run(chunked_logprobs_and_entropy, chunk_size=chunk_size, impl="triton")
    torch_chunked = run(chunked_logprobs_and_entropy, chunk_size=chunk_size)
    naive = run(naive_logprobs_and_entropy)
    for name, a, b, c in zip(["logp", "entropy", "d_hidden", "d_lm_head"], tri, torch_chunked, naive):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), name
        assert rel_err(a, c) < (1e-5 if dtype == torch.float32 else 1e-2), name

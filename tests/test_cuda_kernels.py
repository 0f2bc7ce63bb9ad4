"""What only a GPU can show: the CUDA kernels run, and behave as a fused kernel must.

The numerical grid (tests/test_add_norm.py), gradcheck, opcheck, torch.compile and
module tests run on CUDA too through their device parameter; this file adds what
is specific to the kernels: every launch path, bitwise determinism, fully written
outputs, streams, CUDA graphs, devices and limits. Skipped without a GPU.
"""

import dataclasses

import pytest
import torch

import residual_fused as rf
from oracle import Case, check_against_reference, make_inputs, run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# One hidden size per launch path of csrc/kernels (vec8: hidden % 8 == 0 and aligned).
# Above 8192, sm_90 splits rows across a thread-block cluster; other GPUs take the
# rows (32 elements per thread), staged and streamed kernels.
PATH_SIZES = {
    "rows, 4 threads per row (vec8)": 64,
    "rows, 2 warps per row (vec8)": 1024,
    "rows, 3 warps per row, several rows per CTA (vec8)": 1536,
    "rows, 10 warps per row (vec8)": 5120,
    "rows, 32 elements per thread (vec8)": 16384,
    "cluster of 3, short last slice / fwd staged, bwd streamed (vec8)": 16392,
    "cluster of 5 / fwd staged, bwd streamed (vec8)": 40000,
    "cluster of 8 / streamed (vec8)": 65536,
    "cluster of 16, 32 elements per thread / streamed (vec8)": 262144,
    "rows (element-wise)": 41,
    "rows, many warps (element-wise)": 3001,
    "streamed (element-wise)": 5125,
}


def test_kernels_are_loaded():
    assert rf.cuda_kernels_available(), (
        "CUDA is available but the CUDA kernels are not loaded (python -m residual_fused says why); build with "
        "pip install --no-build-isolation -e .")


@pytest.mark.parametrize("hidden", list(PATH_SIZES.values()), ids=list(PATH_SIZES))
@pytest.mark.parametrize("prenorm", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_every_launch_path(hidden, rms, prenorm):
    # two dtype mixes with compiled fast paths, and one for the generic kernel
    for dtype, res, param in ((torch.bfloat16, torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float32, torch.float32),
                              (torch.bfloat16, torch.bfloat16, torch.float32)):
        case = Case(rms=rms, shape=(37, hidden), x=dtype, residual=res, weight=param,
                    bias=None if rms else param, prenorm=prenorm)
        check_against_reference(case, "cuda", seed=hidden)


@pytest.mark.parametrize("hidden", [128, 1024, 4096, 16384, 3001, 24576, 131072])
@pytest.mark.parametrize("param", [torch.bfloat16, torch.float32])
def test_rows_are_batch_invariant(hidden, param):
    """A row's outputs and input gradients are bitwise the same alone or in any batch."""
    torch.manual_seed(hidden)
    n = min(4096, (1 << 26) // hidden)
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    dr = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    norm = rf.FusedAddNorm(hidden, prenorm=True).to("cuda", param)

    def run(rows):
        xs, rs = x[:rows].clone().requires_grad_(), r[:rows].clone().requires_grad_()
        y, res = norm(xs, rs)
        torch.autograd.backward([y, res], [dy[:rows], dr[:rows]])
        return y, res, xs.grad, rs.grad

    full = run(n)
    for rows in (1, 7, 83):
        for got, want in zip(run(rows), full):
            assert torch.equal(got, want[:rows]), f"rows={rows}"


@pytest.mark.parametrize("hidden", [131072, 262144])
def test_largest_hidden_sizes(hidden):
    check_against_reference(Case(shape=(3, hidden), prenorm=True), "cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="thread-block clusters need sm_90")
@pytest.mark.parametrize("hidden", [16392, 65536, 262144])
def test_wide_rows_use_clusters_on_sm90(hidden):
    """On sm_90 rows wider than 16384 run the cluster kernels, not a silent fallback."""
    x = torch.randn(64, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    norm = rf.FusedAddNorm(hidden, prenorm=True).to("cuda", torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y, res = norm(x, r)
        torch.autograd.backward([y, res], [torch.ones_like(y), torch.ones_like(res)])
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert "add_norm_fwd_cluster_kernel" in names and "add_norm_bwd_cluster_kernel" in names, names[:2000]


def test_hidden_size_limit_is_an_error():
    x = torch.randn(2, 262145, device="cuda")
    with pytest.raises(RuntimeError, match="outside the CUDA kernels' range"):
        rf.add_layer_norm(x)


@pytest.mark.parametrize("hidden", [64, 1000, 4096])
def test_misaligned_and_strided_rows(hidden):
    """Row starts that are not 16-byte aligned take the element-wise kernels."""
    rows = 19
    base = torch.randn(rows * (hidden + 3) + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:1 + rows * (hidden + 3)].view(rows, hidden + 3)[:, :hidden]  # odd offset, odd stride
    r = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    y, res = rf.add_rms_norm(x, r, w, 1e-6, prenorm=True)
    y_ref, res_ref = rf.reference.add_rms_norm(x.double(), r.double(), w.double(), 1e-6, prenorm=True)
    torch.testing.assert_close(res.double(), res_ref, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("hidden", [64, 1024, 5120, 16384, 65536, 5125, 24576, 262144])
@pytest.mark.parametrize("rms", [False, True])
def test_weight_gradients_are_bitwise_deterministic(hidden, rms):
    case = Case(rms=rms, shape=(517, hidden), x=torch.bfloat16, residual=torch.bfloat16,
                weight=torch.float32, bias=None if rms else torch.float32, prenorm=True)
    inputs, grads = make_inputs(case, "cuda")
    first, second = run("ours", case, inputs, grads), run("ours", case, inputs, grads)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_non_default_stream_and_other_device_current():
    case = Case(shape=(64, 2048), prenorm=True)
    inputs, grads = make_inputs(case, "cuda")
    expected = run("ours", case, inputs, grads)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run("ours", case, inputs, grads)
    torch.cuda.current_stream().wait_stream(side)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_other_than_the_current_one():
    case = Case(shape=(32, 768), prenorm=True)
    inputs, grads = make_inputs(case, "cuda:1")
    with torch.cuda.device(0):
        got = run("ours", case, inputs, grads)
    with torch.cuda.device(1):
        expected = run("ours", case, inputs, grads)
    for name in expected:
        assert got[name].device.index == 1 and torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("rms", [False, True])
def test_cuda_graph_capture_replays_like_eager(rms):
    norm = (rf.FusedAddRMSNorm(1024, prenorm=True) if rms else rf.FusedAddNorm(1024, prenorm=True))
    norm = norm.cuda()
    proj = torch.nn.Linear(1024, 1024).cuda()
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    r = torch.randn(64, 1024, device="cuda", requires_grad=True)

    def step():
        y, res = norm(proj(x), r)
        (y.square().sum() + res.sum()).backward()
        return y.detach().clone(), res.detach().clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside the graph
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in [x, r, *norm.parameters(), *proj.parameters()]:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # grads are None here, so capture allocates them
        y_static, res_static = step()
    graph.replay()  # rewrites the captured outputs and .grad tensors in place
    torch.cuda.synchronize()
    graph_grads = [x.grad.clone(), r.grad.clone(), norm.weight.grad.clone()]
    for p in [x, r, *norm.parameters(), *proj.parameters()]:
        p.grad = None
    y_eager, res_eager = step()
    # Our kernels are deterministic; the Linear's cuBLAS kernels need not be bitwise so
    # across capture and eager, hence a tight tolerance rather than equality.
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_static, y_eager, **close)
    torch.testing.assert_close(res_static, res_eager, **close)
    for g, p in zip(graph_grads, [x, r, norm.weight]):
        torch.testing.assert_close(g, p.grad, **close)


@pytest.mark.parametrize("rms", [False, True])
def test_cuda_graph_of_the_inplace_decode_step(rms):
    """A decode step as inference engines capture it: the in-place form over static
    buffers, replayed on new data, writes what the out-of-place call returns."""
    hidden, rows = 4096, 8
    x = torch.empty(rows, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.empty(rows, hidden, device="cuda", dtype=torch.float32)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    fn = (lambda: rf.add_rms_norm_(x, r, w, 1e-6)) if rms else (lambda: rf.add_layer_norm_(x, r, w, None))
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            x.normal_(), r.normal_()
            fn()  # warm up outside the graph (plans and attributes cached)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(3):
            x0, r0 = torch.randn_like(x), torch.randn_like(r)
            x.copy_(x0), r.copy_(r0)
            graph.replay()
            want = (rf.add_rms_norm(x0, r0, w, 1e-6, prenorm=True) if rms
                    else rf.add_layer_norm(x0, r0, w, None, prenorm=True))
            assert torch.equal(x, want[0]) and torch.equal(r, want[1])


def test_errors_on_cuda_match_cpu():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="residual: shape"):
        rf.add_layer_norm(x, torch.randn(4, 32, device="cuda"))
    with pytest.raises(ValueError, match="residual is on cpu but x is on cuda"):
        rf.add_layer_norm(x, torch.randn(4, 64))
    with pytest.raises(TypeError, match="x: dtype torch.int32"):
        rf.add_layer_norm(x.int())


def test_bwd_with_only_residual_out_used():
    x = torch.randn(8, 256, device="cuda", requires_grad=True)
    r = torch.randn(8, 256, device="cuda", requires_grad=True)
    _, res = rf.add_layer_norm(x, r, prenorm=True)
    res.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


def test_fp64_mixed_with_lower_precision_residual():
    case = Case(shape=(9, 96), x=torch.float64, residual=torch.float32, weight=torch.float16,
                bias=torch.bfloat16, prenorm=True)
    check_against_reference(case, "cuda")
    check_against_reference(dataclasses.replace(case, memory_efficient=True, prenorm=False), "cuda")

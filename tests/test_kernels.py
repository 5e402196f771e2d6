"""XNOR-popcount kernels: packing, exactness against the float emulation, layer integration."""
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU check on a machine with only torch and CuPy: the property tests skip

    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def given(**kwargs):
        return pytest.mark.skip(reason="hypothesis is not installed")

    def settings(**kwargs):
        return lambda f: f

    def assume(condition):
        return None

from bnnctl import kernels
from bnnctl.kernels import cpu
from bnnctl.workers.binarize import BinarizeConfig, hard_sign
from bnnctl.workers.layers import ActivationConfig, BinaryConv2d
from bnnctl.workers.models import ModelConfig, build_model

needs_cpu_kernel = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernel")
needs_cuda = pytest.mark.skipif(not kernels.available("cuda"), reason="no CUDA device with CuPy")


def emulate(x, w, alpha, stride, padding):
    y = F.conv2d(hard_sign(x), hard_sign(w), stride=stride, padding=padding)
    return y if alpha is None else y * alpha.view(1, -1, 1, 1)


@given(c=st.integers(1, 200), bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_round_trip_any_channel_count(c, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 3, 2, generator=g)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    packed = kernels.pack_bits(x, bits)
    assert packed.shape == (2, 3, 2, kernels.words_for(c, bits))
    assert torch.equal(kernels.unpack_bits(packed, c, bits), hard_sign(x))


def test_bit_layout():
    x = -torch.ones(1, 70, 1, 1)
    x[0, [0, 3, 64, 69]] = 1.0
    words = kernels.pack_bits(x, 64)[0, 0, 0]
    assert words.tolist() == [(1 << 0) | (1 << 3), (1 << 0) | (1 << 5)]


@needs_cpu_kernel
@given(n=st.integers(1, 3), c=st.integers(1, 150), h=st.integers(1, 11), w=st.integers(1, 11),
       o=st.integers(1, 70), k=st.sampled_from([1, 2, 3, 5, 7]), stride=st.sampled_from([1, 2, 3]),
       padding=st.integers(0, 3), use_alpha=st.booleans(), portable=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_cpu_kernel_equals_the_float_emulation_exactly(n, c, h, w, o, k, stride, padding, use_alpha, portable, seed):
    """Both the vector (AVX-512, where the CPU has it) and the portable kernel."""
    assume(h + 2 * padding >= k and w + 2 * padding >= k)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    x[x.abs() < 0.05] = 0.0  # exact zeros must count as +1
    wt = torch.randn(o, c, k, k, generator=g)
    alpha = torch.rand(o, generator=g) * 2 - 0.5 if use_alpha else None
    result = cpu.xnor_conv2d(x, wt, alpha, stride, padding, portable=portable)
    assert torch.equal(result, emulate(x, wt, alpha, stride, padding))


@needs_cpu_kernel
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for the baseline x86-64")
def test_cpu_kernel_built_without_avx512_is_exact_too(tmp_path, monkeypatch):
    """Machines without AVX-512 VPOPCNTDQ get the scalar packing and kernel: build that variant here
    (baseline x86-64, no OpenMP) and check it on border-heavy shapes."""
    monkeypatch.setenv("BNNCTL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "FLAGS", ("-O2", "-march=x86-64", "-fPIC", "-shared", "-std=c99"))
    monkeypatch.setattr(cpu, "_compile", lambda compiler, flags: _real_compile(compiler, tuple(f for f in flags if f != "-fopenmp")))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    assert not cpu.vector_popcount() and not cpu.multithreaded()
    g = torch.Generator().manual_seed(5)
    for n, c, size, o, k, stride, padding in ((2, 70, 9, 33, 3, 1, 1), (1, 130, 7, 17, 3, 2, 2), (1, 5, 6, 8, 1, 1, 0)):
        x, w = torch.randn(n, c, size, size, generator=g), torch.randn(o, c, k, k, generator=g)
        alpha = torch.rand(o, generator=g)
        assert torch.equal(cpu.xnor_conv2d(x, w, alpha, stride, padding), emulate(x, w, alpha, stride, padding))


_real_compile = cpu._compile


@needs_cpu_kernel
def test_cpu_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Rows are shared among OpenMP threads (where the kernel was built with OpenMP); each thread
    keeps its own border tables, so 1, 2 and 3 threads must agree bit for bit, also on border rows."""
    g = torch.Generator().manual_seed(3)
    x, w, alpha = torch.randn(3, 70, 13, 11, generator=g), torch.randn(40, 70, 3, 3, generator=g), torch.rand(40, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cpu.xnor_conv2d(x, w, alpha, 1, 1))
    finally:
        torch.set_num_threads(before)
    expected = emulate(x, w, alpha, 1, 1)
    assert all(torch.equal(r, expected) for r in results)


@needs_cpu_kernel
def test_papers_layer_shapes_exact():
    for c, size in ((128, 16), (256, 8)):
        x, w = torch.randn(2, c, size, size), torch.randn(c, c, 3, 3)
        alpha = torch.rand(c)
        packed = cpu.pack_weight(w)
        assert torch.equal(cpu.xnor_conv2d(x, packed, alpha, 1, 1), emulate(x, w, alpha, 1, 1))
        assert torch.equal(cpu.xnor_conv2d(x, packed, alpha, 2, 1), emulate(x, w, alpha, 2, 1))
    x, w = torch.randn(1, 64, 56, 56), torch.randn(64, 64, 1, 1)  # ResNet shortcut 1x1, stride 2
    assert torch.equal(cpu.xnor_conv2d(x, w, None, 2, 0), emulate(x, w, None, 2, 0))
    x, w = torch.randn(1, 3, 32, 32), torch.randn(64, 3, 7, 7)  # stem 7x7, stride 2, padding 3
    assert torch.equal(cpu.xnor_conv2d(x, w, None, 2, 3), emulate(x, w, None, 2, 3))


@needs_cpu_kernel
def test_inputs_are_validated_before_launch():
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        cpu.xnor_conv2d(x, torch.randn(4, 9, 3, 3))
    with pytest.raises(ValueError, match="alpha"):
        cpu.xnor_conv2d(x, torch.randn(4, 8, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="does not fit"):
        cpu.xnor_conv2d(torch.randn(1, 8, 2, 2), torch.randn(4, 8, 3, 3))
    with pytest.raises(ValueError, match="float32"):
        cpu.xnor_conv2d(x.double(), torch.randn(4, 8, 3, 3))


def _pair(backend, **kw):
    torch.manual_seed(0)
    a = BinaryConv2d(24, 40, kw.pop("k", 3), kw.pop("stride", 1), binarize=kw.pop("binarize", BinarizeConfig()),
                     activation=ActivationConfig("prelu"), backend="float", **kw)
    b = BinaryConv2d(a.in_channels, a.out_channels, a.kernel_size, a.stride, groups=a.groups, binarize=a.binarize,
                     activation=ActivationConfig("prelu"), backend=backend)
    b.load_state_dict(a.state_dict())
    return a, b


@needs_cpu_kernel
@pytest.mark.parametrize("backend", ["xnor", "auto"])
@pytest.mark.parametrize("stride", [1, 2])
def test_layer_backend_is_bit_identical_in_eval_and_training(backend, stride):
    a, b = _pair(backend, stride=stride)
    x = torch.randn(3, 24, 9, 9)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    a.train(), b.train()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.weight_source.weight.grad, b.weight_source.weight.grad)


@needs_cpu_kernel
def test_xnor_backend_runs_the_kernel_only_when_both_operands_are_binary(monkeypatch):
    calls = []
    real = kernels.xnor_conv2d
    monkeypatch.setattr(kernels, "xnor_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 24, 6, 6)
    _, sign = _pair("xnor")
    sign.eval()(x)
    assert calls == [1]
    _, approx = _pair("xnor", binarize=BinarizeConfig(quantizer="tanh"))
    a, b = _pair("float", binarize=BinarizeConfig(quantizer="tanh"))
    approx.train()(x)  # tanh activations are not binary in training: float path
    assert calls == [1]
    approx.eval()(x)  # but exactly binary in evaluation
    assert calls == [1, 1]
    _, grouped = _pair("xnor", groups=2)
    grouped.eval()(x)  # groups > 1: float path
    assert calls == [1, 1]


@needs_cpu_kernel
@pytest.mark.parametrize("backend", ["xnor", "auto"])
@pytest.mark.parametrize("alpha", ["analytic", "learned"])
def test_inference_runs_the_whole_layer_in_the_kernel_with_the_same_bits(backend, alpha, monkeypatch):
    """Compiled by fuse(), under no_grad in eval the whole layer (BatchNorm + sign folded into
    thresholds, conv, alpha, PReLU) is one fused kernel call on the raw input; the result equals the
    float backend bit for bit, also after the weights change in place (the prepared call is
    rebuilt). With gradients on, the quantized operands go through autograd and the per-layer
    kernel as before."""
    from bnnctl.workers import backends, fused

    monkeypatch.setattr(backends, "_AUTO_CHOICE", {})
    fused_calls, plain_calls = [], []
    real_run, real_conv = cpu.ConvPlan.run, kernels.xnor_conv2d
    monkeypatch.setattr(cpu.ConvPlan, "run", lambda self, x, **k: fused_calls.append(type(x).__name__)
                        or real_run(self, x, **k))
    monkeypatch.setattr(kernels, "xnor_conv2d", lambda x, w, alpha=None, *a, **k:
                        plain_calls.append((bool(x.abs().ne(1).any()), alpha is not None)) or real_conv(x, w, alpha, *a, **k))
    ref, fast = _pair(backend, binarize=BinarizeConfig(alpha=alpha))
    with torch.no_grad():
        if alpha == "learned":
            fast.alpha.value.uniform_(0.5, 2.0)
            ref.alpha.value.copy_(fast.alpha.value)
        for layer in (ref, fast):  # a BatchNorm that is not the identity, with a negative scale
            layer.bn.running_mean.copy_(torch.linspace(-1, 1, 24))
            layer.bn.weight.copy_(torch.linspace(-2, 2, 24))
    ref.eval(), fast.eval()
    x = torch.randn(2, 24, 9, 9)
    x[0, 0, :3, :3] = 0.0
    if backend == "auto":
        backends._AUTO_CHOICE[backends._auto_key(fast, x)] = True  # as if measured faster
    compiled = fused.fuse(fast)
    with torch.no_grad():
        assert torch.equal(compiled(x), ref(x))
        assert torch.equal(compiled(x), ref(x))  # the prepared call is kept
        noise = torch.randn_like(ref.weight_source.weight)
        ref.weight_source.weight.add_(noise)
        fast.weight_source.weight.add_(noise)  # the compiled layer shares it
        assert torch.equal(compiled(x), ref(x))
    assert fused_calls == ["Tensor"] * 3
    # auto checks the fused result once per weight version against the layer-by-layer path
    assert plain_calls == ([] if backend == "xnor" else [(True, True)] * 2)
    y = fast(x.clone().requires_grad_(True))
    assert torch.equal(y, ref(x))
    assert plain_calls[-1] == (False, False) and len(fused_calls) == 3  # autograd: quantized operands


@needs_cpu_kernel
def test_auto_backend_keeps_the_float_path_where_the_kernel_disagrees(monkeypatch):
    """A kernel that is wrong on some device (say an unverified GPU) must not change results: auto
    compares the bits once per shape and keeps the float emulation, with a warning."""
    from bnnctl.workers import backends

    real = kernels.xnor_conv2d
    monkeypatch.setattr(kernels, "xnor_conv2d", lambda *a, **k: real(*a, **k) + 2.0)  # injected fault
    monkeypatch.setattr(backends, "_AUTO_CHOICE", {})
    a, b = _pair("auto")
    x = torch.randn(2, 24, 7, 7)
    with pytest.warns(RuntimeWarning, match="disagreed with the float emulation"):
        with torch.no_grad():
            assert torch.equal(b.eval()(x), a.eval()(x))
    assert list(backends._AUTO_CHOICE.values()) == [False]


@needs_cpu_kernel
def test_whole_model_with_the_xnor_backend_matches_the_float_one():
    cfg = ModelConfig(width=32, depth=2, num_outputs=4)
    torch.manual_seed(1)
    ref = build_model(cfg).eval()
    torch.manual_seed(1)
    fast = build_model(ModelConfig(width=32, depth=2, num_outputs=4, backend="xnor")).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(x)[-1], fast(x)[-1])
        assert torch.equal(fast(x)[-1], fast(x)[-1])  # the cached packed weights stay valid


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    source = Path(kernels.__file__).with_name("xnor_cuda.cu")
    for arch in ("sm_80", "sm_90"):
        out = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-o", str(tmp_path / f"{arch}.cubin"), str(source)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"{arch}.cubin").stat().st_size > 0


@needs_cuda
@pytest.mark.parametrize("method", ["popc", "mma"])
@pytest.mark.parametrize("c,size,stride,padding", [(5, 7, 1, 1), (130, 9, 2, 1), (256, 16, 1, 1), (64, 8, 1, 0)])
def test_gpu_kernel_equals_the_float_emulation_exactly(method, c, size, stride, padding):
    from bnnctl.kernels import gpu

    if method == "mma" and not gpu.tensor_cores():
        pytest.skip("no 1-bit tensor cores with AND (compute capability < 8.0)")
    x = torch.randn(2, c, size, size, device="cuda")
    w = torch.randn(33, c, 3, 3, device="cuda")
    alpha = torch.rand(33, device="cuda")
    expected = emulate(x, w, alpha, stride, padding)
    assert torch.equal(gpu.xnor_conv2d(x, w, alpha, stride, padding, method=method), expected)
    packed = gpu.pack_weight(w, method)
    assert torch.equal(gpu.xnor_conv2d(x, w, alpha, stride, padding, packed), expected)


# ------------------------------------------------------------------ GPU kernels: host emulation


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    """kernels/xnor_cuda.cu built as C++ for the host (tests/cuda_host_emulation.cpp)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler for the host emulation of the CUDA kernels")
    out = tmp_path_factory.mktemp("cuda_emulation") / "emulation.so"
    source = Path(__file__).with_name("cuda_host_emulation.cpp")
    build = subprocess.run([compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-DBNN_HOST_EMULATION",
                            f"-I{Path(kernels.__file__).parent}", "-o", str(out), str(source), "-lpthread"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return ctypes.CDLL(str(out))


@pytest.fixture
def emulated_gpu(cuda_emulator, monkeypatch):
    """kernels.gpu with its launches run by the host emulation on CPU tensors."""
    from bnnctl.kernels import gpu

    def launch(name, grid, block, args, device):
        converted = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                converted.append(ctypes.c_void_p(arg.data_ptr()))
            elif isinstance(arg, np.int64):
                converted.append(ctypes.c_longlong(int(arg)))
            elif isinstance(arg, np.int32):
                converted.append(ctypes.c_int(int(arg)))
            else:
                raise TypeError(f"unexpected kernel argument {arg!r}")
        gx, gy = (tuple(grid) + (1,))[:2]
        getattr(cuda_emulator, f"emu_{name}")(ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(block), *converted)

    monkeypatch.setattr(gpu, "_launch", launch)
    monkeypatch.setattr(gpu, "_check_device", lambda x, w: None)
    monkeypatch.setattr(gpu, "tensor_cores", lambda device=None: True)
    return gpu


@pytest.mark.parametrize("method", ["popc", "mma"])
@pytest.mark.parametrize("n,c,size,o,k,stride,padding", [
    (2, 70, 9, 33, 3, 1, 1),    # channel and output tails, border pixels
    (1, 130, 7, 40, 3, 2, 1),   # two 128-bit steps per tap, stride 2
    (1, 5, 6, 8, 1, 1, 0),      # 1x1, few channels
    (1, 32, 5, 70, 3, 1, 2),    # padding 2: taps wholly outside
])
def test_cuda_kernels_in_host_emulation_equal_the_float_emulation(emulated_gpu, method, n, c, size, o, k, stride,
                                                                    padding):
    """The CUDA source's indexing and finishing arithmetic, run on the CPU; the tensor-core kernel
    with the mma emulated by the PTX fragment layout. Not a substitute for the GPU tests below."""
    g = torch.Generator().manual_seed(c * 31 + o)
    x = torch.randn(n, c, size, size, generator=g)
    x[x.abs() < 0.05] = 0.0
    w = torch.randn(o, c, k, k, generator=g)
    alpha = torch.rand(o, generator=g)
    packed = emulated_gpu.pack_weight(w, method)
    assert packed.words.shape == (-(-o // 32) * 32, k * k, 4 * -(-c // 128) if method == "mma" else -(-c // 32))
    for a in (alpha, None):
        result = emulated_gpu.xnor_conv2d(x, w, a, stride, padding, packed)
        assert torch.equal(result, emulate(x, w, a, stride, padding))


def test_gpu_methods_are_validated(emulated_gpu):
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="method must be one of popc, mma"):
        emulated_gpu.xnor_conv2d(x, w, method="xor")

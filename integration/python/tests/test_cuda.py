"""MDOptimizer on CUDA tensors (device=cuda:K), and the checks of devices, options and
gradient sources around it.

The first tests run everywhere: a device= option that does not name the parameters' device,
parameters on several devices, a library without the CUDA backend, a stream on the CPU, the
step_info switch, and gradients read from another attribute (Megatron's float32 main_grad
for bf16 weights). The tests marked `cuda` need a GPU that torch sees and a libmdopt built
with the CUDA backend (mdopt.cuda_backend()); elsewhere they skip, saying which is missing.
On a GPU they hold:
  - the CUDA step against the CPU step on the same gradients (adamw-based presets to 1e-4 of
    the largest weight; md-muon, whose Newton-Schulz runs in bf16 on the GPU and in float32
    on the CPU, to 5% of the weights' displacement, as the bf16 NS of torch.optim.Muon is
    held in test_compare_torch.py);
  - bf16 weights stepped from float32 main_grad equal float32 weights stepped from the same
    gradients, rounded once to bf16 (at most one bf16 ulp apart);
  - the stream: step() returns while a long kernel queued before it on torch's current
    stream still runs (no host wait), reads gradients written on a side stream behind such
    a kernel (ordered on the caller's stream), and with info=True returns only after it;
  - state_dict round trips on the GPU bit for bit, and loads into a CPU optimizer;
  - a NaN gradient skips the step (info or not), a host pointer is refused by the library.
Each measured error is also written as an MDOPT_METRIC line (helpers.report_metric).
"""
import copy
import io
import time

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")

import mdopt  # noqa: E402
from helpers import batch, mlp, report_metric  # noqa: E402
from mdopt import _core, _lib  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402


def P(*shape, **kw):
    return torch.nn.Parameter(torch.randn(*shape, **kw))


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return ("no CUDA GPU visible to torch %s (torch.cuda.is_available() is False)"
                % torch.__version__)
    ok, why = mdopt.cuda_backend(0)
    if not ok:
        return "libmdopt (%s) cannot run on CUDA: %s" % (mdopt.library_path, why)
    return None


_SKIP = _cuda_skip_reason()
cuda = pytest.mark.skipif(_SKIP is not None, reason="needs a CUDA GPU and a CUDA build of "
                          "libmdopt: %s" % _SKIP)


# --- everywhere: the checks around devices ------------------------------------------------

def test_device_option_must_name_the_parameters_device():
    ok, why = mdopt.cuda_backend()
    assert isinstance(ok, bool) and (ok or why)
    with pytest.raises(mdopt.MdoptError) as e:  # a value the library refuses as such
        MDOptimizer([P(4, 3)], device="gpu")
    assert e.value.status == "MDOPT_INVALID_ARGUMENT" and "device" in e.value.message
    with pytest.raises(ValueError, match=r"device=cuda:0 was asked for.*parameters are on cpu") \
            as e:
        MDOptimizer([P(4, 3)], device="cuda:0")
    if not ok:  # and says that this library could not have run there anyway
        assert "cannot run on CUDA" in str(e.value)
    with pytest.raises(ValueError, match="device=cuda:1 was asked for"):
        MDOptimizer([P(4, 3)], options="threads=1 device=cuda:1")
    opt = MDOptimizer([P(4, 3)], device="cpu", threads=1)  # naming the right one is fine
    assert opt.device == torch.device("cpu")


def test_a_library_without_the_cuda_backend_says_so():
    ok, why = mdopt.cuda_backend()
    if ok:
        _core.Optimizer(mdopt.comm.local(), "device=cuda:0").destroy()
        return
    assert "cuda=" in why
    with pytest.raises(mdopt.MdoptError) as e:
        _core.Optimizer(mdopt.comm.local(), "device=cuda:0")
    assert e.value.status in ("MDOPT_UNSUPPORTED", "MDOPT_DEVICE_ERROR")
    assert "cuda" in e.value.message.lower()
    if torch.cuda.is_available():  # a GPU but a CPU-only library: the build is named
        w = torch.nn.Parameter(torch.randn(4, 3, device="cuda"))
        with pytest.raises(mdopt.MdoptError, match=r"on cuda:0 and this libmdopt .* cannot "
                           r"run there.*MDOPT_LIBRARY"):
            MDOptimizer([w])


def test_parameters_on_several_devices_are_refused():
    a = P(4, 3)
    m = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"several devices \('a' \(group 'g'\) on cpu; 'm' "
                       r"\(group 'h'\) on meta\)"):
        MDOptimizer([{"params": [a], "names": ["a"], "name": "g"},
                     {"params": [m], "names": ["m"], "name": "h"}])
    opt = MDOptimizer([a], preset="adamw", threads=1)
    with pytest.raises(ValueError, match="several devices"):
        opt.add_param_group({"params": [m]})
    assert len(opt.param_groups) == 1  # refused and not kept


def test_step_info_and_streams_on_the_cpu():
    model = mlp(3)
    opt = MDOptimizer(model.parameters(), preset="md-adamw", threads=1, step_info=False)
    assert opt.step_info is False and opt.device == torch.device("cpu")
    x, y = batch(1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.last_step is None
    opt.step(info=True)
    assert opt.last_step.step == 2 and not opt.last_step.skipped
    assert MDOptimizer(mlp(3).parameters(), preset="adamw", threads=1).step_info  # the default
    with pytest.raises(mdopt.MdoptError) as e:  # a stream is a CUDA backend's argument
        opt.mdopt.step(1.0, stream=0x1234)
    assert e.value.status == "MDOPT_INVALID_ARGUMENT" and "stream" in e.value.message
    opt.mdopt.step(1.0, stream=0, info=False)  # 0 is NULL: accepted
    with pytest.raises(TypeError, match="grad_attr"):
        MDOptimizer([P(4, 3)], grad_attr="main grad")


def _bf16_pair(preset_m, seed):
    torch.manual_seed(seed)
    w16 = [torch.nn.Parameter(torch.randn(12, 8).bfloat16()),
           torch.nn.Parameter(torch.randn(8).bfloat16())]
    w32 = [torch.nn.Parameter(w.detach().float()) for w in w16]
    def groups(ws):
        return [{"params": [ws[0]], "preset": preset_m, "name": "m"},
                {"params": [ws[1]], "preset": "vector", "name": "v"}]
    return w16, w32, groups


def test_bf16_weights_read_float32_main_grad():
    """grad_attr="main_grad": bf16 weights registered with float32 gradients step exactly
    as float32 weights on the same gradients, rounded once to bf16 (the f32 master is the
    same arithmetic); the same weights stepped from bf16-rounded .grad end elsewhere."""
    w16, w32, groups = _bf16_pair("md-muon", 5)
    for w in w16:
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32)
    o16 = MDOptimizer(groups(w16), threads=1, grad_attr="main_grad")
    o32 = MDOptimizer(groups(w32), threads=1)
    assert [e[2] for e in o16._entries] == [_lib.DTYPE_F32, _lib.DTYPE_F32]
    c16 = [torch.nn.Parameter(w.detach().clone()) for w in w16]
    oc = MDOptimizer(groups(c16), threads=1)  # control: .grad in bf16
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        for a, b, c in zip(w16, w32, c16):
            grad = torch.randn(a.shape, generator=g)
            a.main_grad.copy_(grad)
            b.grad = grad.clone()
            c.grad = grad.bfloat16()
        o16.step()
        o32.step()
        oc.step()
        for a, b in zip(w16, w32):
            assert torch.equal(a.detach(), b.detach().bfloat16())
    assert not torch.equal(w16[0].detach(), c16[0].detach())


def test_grad_attr_falls_back_to_grad():
    model_a, model_b = mlp(12), mlp(12)
    oa = MDOptimizer(model_a.parameters(), preset="md-adamw", threads=1, grad_attr="main_grad")
    ob = MDOptimizer(model_b.parameters(), preset="md-adamw", threads=1)
    for t in range(2):
        x, y = batch(40 + t)
        for model, opt in ((model_a, oa), (model_b, ob)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# --- on a GPU -----------------------------------------------------------------------------

def _groups(model, preset):
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [{"params": [m.weight for m in lin], "preset": preset, "name": "matrices"},
            {"params": [m.bias for m in lin], "preset": "vector", "name": "vectors"}]


DIMS = (32, 64, 48, 16)


def _grads(model, seed, device="cpu"):
    """The mean-squared-error gradients of one fixed batch, on the model's own device."""
    x, y = batch(seed, n=64, d_in=DIMS[0], d_out=DIMS[-1])
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@cuda
@pytest.mark.parametrize("preset,bound", [("md-adamw", 1e-4), ("adamw", 1e-4),
                                          ("md-muon", 0.05)])
def test_cuda_steps_match_the_cpu(preset, bound):
    cpu_model = mlp(20, dims=DIMS)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu_opt = MDOptimizer(_groups(cpu_model, preset), threads=1)
    gpu_opt = MDOptimizer(_groups(gpu_model, preset))
    assert gpu_opt.device == torch.device("cuda", 0) and gpu_opt.step_info is False
    start = [p.detach().double().clone() for p in cpu_model.parameters()]
    for t in range(6):
        grads = _grads(cpu_model, 200 + t)  # the same gradients for both
        for p, g in zip(gpu_model.parameters(), grads):
            p.grad = g.cuda()
        cpu_opt.step()
        gpu_opt.step()
        assert gpu_opt.last_step is None
    torch.cuda.synchronize()
    worst = 0.0
    for (name, c), g, w0 in zip(cpu_model.named_parameters(), gpu_model.parameters(), start):
        c, g = c.detach().double(), g.detach().double().cpu()
        if preset == "md-muon" and c.dim() == 2:  # bf16 NS on the GPU: against the motion
            err = ((g - c).norm() / (c - w0).norm()).item()
        else:
            err = ((g - c).abs().max() / c.abs().max()).item()
        worst = max(worst, err)
        assert err <= bound, "%s: %.3g > %.3g" % (name, err, bound)
    report_metric("python.cuda_vs_cpu.%s" % preset, worst, bound)


@cuda
def test_cuda_bf16_weights_with_float32_main_grad():
    torch.manual_seed(21)
    base = mlp(21, dims=DIMS)
    m16 = copy.deepcopy(base).cuda().bfloat16()
    m32 = copy.deepcopy(m16).float()  # the same starting values
    for p in m16.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device="cuda")
    o16 = MDOptimizer(_groups(m16, "md-adamw"), grad_attr="main_grad")
    o32 = MDOptimizer(_groups(m32, "md-adamw"))
    g = torch.Generator(device="cuda").manual_seed(22)
    for _ in range(5):
        for a, b in zip(m16.parameters(), m32.parameters()):
            grad = torch.randn(a.shape, generator=g, device="cuda") * 1e-2
            a.main_grad.copy_(grad)
            b.grad = grad.clone()
        o16.step()
        o32.step()
    torch.cuda.synchronize()
    worst = 0
    for a, b in zip(m16.parameters(), m32.parameters()):
        a, b = a.detach().float(), b.detach().bfloat16().float()
        ulps = ((a - b).abs() / (b.abs() * 2.0 ** -7).clamp(min=1e-30)).max().item()
        worst = max(worst, ulps)
    report_metric("python.cuda_bf16_main_grad_ulps", worst, 1)
    assert worst <= 1.0


@cuda
def test_cuda_step_is_ordered_on_the_callers_stream_without_a_host_wait():
    model = mlp(23, dims=DIMS).cuda()
    ref = copy.deepcopy(model)
    opt = MDOptimizer(_groups(model, "md-adamw"))
    ref_opt = MDOptimizer(_groups(ref, "md-adamw"))
    steps = [_grads(mlp(24, dims=DIMS), 300 + t) for t in range(3)]

    # How long the sleep kernel runs here.
    cycles = int(2e8)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    b.synchronize()
    sleep_s = a.elapsed_time(b) / 1e3
    assert sleep_s > 0.02

    # Step 1, default stream: step() returns while the kernel queued before it still runs.
    for p, g in zip(model.parameters(), steps[0]):
        p.grad = g.cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    opt.step()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    report_metric("python.cuda_step_host_s_behind_sleep", host_s, 0.5 * sleep_s)
    assert host_s < 0.5 * sleep_s, "step() waited for the GPU (%.3f s of %.3f s)" % (
        host_s, sleep_s)

    # Step 2, a side stream: the gradients are written there behind a long kernel; the step
    # must read them after the writes (it joins the caller's stream), not before.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        for p, g in zip(model.parameters(), steps[1]):
            p.grad.copy_(g.cuda(non_blocking=False))
        opt.step()
    side.synchronize()

    # Step 3, asking for the outcome on the side stream: returns only after the sleep.
    for p, g in zip(model.parameters(), steps[2]):
        p.grad.copy_(g.cuda())
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)
        opt.step(info=True)
        waited_s = time.perf_counter() - t0
    assert opt.last_step.step == 3 and not opt.last_step.skipped
    assert waited_s >= 0.8 * sleep_s, "step(info=True) returned before the stream's work"
    torch.cuda.synchronize()

    for g in steps:
        for p, gg in zip(ref.parameters(), g):
            p.grad = gg.cuda()
        ref_opt.step()
    torch.cuda.synchronize()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), "%s: the steps on the side stream read other gradients" % n


@cuda
def test_cuda_state_dict_round_trip_and_load_on_the_cpu():
    data = [_grads(mlp(26, dims=DIMS), 400 + t) for t in range(5)]

    def run(model, opt, grads):
        for g in grads:
            for p, gg in zip(model.parameters(), g):
                p.grad = gg.to(p.device)
            opt.step()

    model = mlp(25, dims=DIMS).cuda()
    opt = MDOptimizer(_groups(model, "md-muon"))
    run(model, opt, data[:2])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    run(model, opt, data[2:])
    torch.cuda.synchronize()

    fresh = mlp(27, dims=DIMS).cuda()  # other weights: the load brings the saved ones
    fopt = MDOptimizer(_groups(fresh, "md-muon"))
    fopt.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for n, p in fresh.named_parameters():
        assert torch.equal(p.cpu(), saved[n]), n
    run(fresh, fopt, data[2:])
    torch.cuda.synchronize()
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), "%s differs after the resumed steps" % n

    on_cpu = mlp(28, dims=DIMS)  # the GPU's checkpoint on the CPU backend
    copt = MDOptimizer(_groups(on_cpu, "md-muon"), threads=1)
    copt.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for n, p in on_cpu.named_parameters():
        assert torch.equal(p, saved[n]), n
    run(on_cpu, copt, data[2:3])
    assert copt.last_step.step == 3


@cuda
def test_cuda_non_finite_gradient_skips():
    model = mlp(29, dims=DIMS).cuda()
    opt = MDOptimizer(_groups(model, "md-muon"),
                      named_parameters=model.named_parameters())
    grads = _grads(mlp(30, dims=DIMS), 500)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.cuda()
    model[2].weight.grad[3, 4] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(info=True)
    assert opt.last_step.skipped and opt.last_step.step == 0
    assert "2.weight" in opt.last_step.message
    opt.step()  # no info: queued, decided on the GPU
    assert opt.group_info("matrices").skipped == 3
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@cuda
def test_cuda_refusals():
    w = torch.nn.Parameter(torch.randn(4, 3, device="cuda"))
    h = P(4, 3)
    with pytest.raises(ValueError, match=r"several devices.*on cuda:0.*on cpu|several "
                       r"devices.*on cpu.*on cuda:0"):
        MDOptimizer([w, h])
    with pytest.raises(ValueError, match="device=cpu was asked for.*on cuda:0"):
        MDOptimizer([w], device="cpu")
    assert MDOptimizer([w], preset="adamw", device="cuda").device == w.device  # torch's name
    other = "cuda:%d" % torch.cuda.device_count()
    with pytest.raises(ValueError, match="device=%s was asked for" % other):
        MDOptimizer([w], device=other)
    # The library's own check: host memory registered with device=cuda:0.
    opt = _core.Optimizer(mdopt.comm.local(), "device=cuda:0")
    opt.add_group("g", "preset=adamw")
    with pytest.raises(mdopt.MdoptError) as e:
        opt.add_param("host_w", "g", (4, 3), _lib.DTYPE_F32, h.data_ptr(), _lib.DTYPE_F32,
                      h.data_ptr())
        opt.finalize()
    assert e.value.status == "MDOPT_INVALID_ARGUMENT" and "host_w" in e.value.message

"""Small models and helpers shared by the tests."""
import torch


def mlp(seed, bias=True, dims=(12, 24, 16, 6)):
    """A small tanh MLP with 1/sqrt(d_in) weights."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = torch.nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.normal_(0.0, a ** -0.5)
            if bias:
                lin.bias.normal_(0.0, 0.1)
        layers.append(lin)
        if i + 2 < len(dims):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def batch(seed, n=32, d_in=12, d_out=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g, dtype=dtype),
            torch.randn(n, d_out, generator=g, dtype=dtype))


def train(model, opt, steps, sched=None, seed=100, x_slice=None):
    """`steps` steps of MSE regression on fixed batches; x_slice picks this rank's rows."""
    for t in range(steps):
        x, y = batch(seed + t)
        if x_slice is not None:
            x, y = x[x_slice], y[x_slice]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def rel_err(model_a, model_b):
    """max over tensors of max|a - b| / max|b|."""
    return max(((a.detach().double() - b.detach().double()).abs().max() /
                b.detach().double().abs().max()).item()
               for a, b in zip(model_a.parameters(), model_b.parameters()))


def float64_ns(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's _zeropower_via_newtonschulz with float64 products."""
    a, b, c = ns_coefficients
    x = grad.to(torch.float64)
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if grad.size(0) > grad.size(1):
        x = x.T
    return x.to(grad.dtype)


def report_metric(name, value, tolerance):
    """A measured error beside its bound, one line `MDOPT_METRIC <name> <value> <tolerance>`
    appended to $MDOPT_METRICS_FILE when that is set (launch/device-check.sh gathers these
    lines from every test into its summary); nothing otherwise (pytest captures stdout)."""
    import os
    path = os.environ.get("MDOPT_METRICS_FILE")
    if path:
        with open(path, "a") as f:
            f.write("MDOPT_METRIC %s %.6g %.6g\n" % (name, float(value), float(tolerance)))

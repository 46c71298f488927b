"""MDOptimizer: mdopt as a torch.optim.Optimizer (float32 or bfloat16 tensors, on the CPU or
on one CUDA GPU).

    from mdopt.torch import MDOptimizer
    opt = MDOptimizer(model.parameters(), preset="md-muon", lr=0.02, threads=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for batch in data:
        opt.zero_grad(); loss_fn(model(batch)).backward(); opt.step(); sched.step()

The optimizer runs where the parameters are: CPU tensors -> device=cpu; CUDA tensors (all on
one GPU K) -> device=cuda:K, with a libmdopt built with the CUDA backend (mdopt.cuda_backend()
says). On CUDA every call is ordered on torch's current stream of that GPU
(torch.cuda.current_stream(K).cuda_stream is passed to mdopt_step, mdopt_grads_ready and
mdopt_gather_params) and step() does not wait for the GPU unless step information is asked
for (step_info=True, or step(info=True)): last_step is then None after a step that did not
ask. Building the optimizer, checkpoints and group_info() synchronise the device.

Every param group becomes one mdopt group, "preset=<preset> key=value ..." (docs/ABI.md,
"Group specs"). Its keys may be spelled as in torch (lr, betas, eps, weight_decay, momentum,
nesterov) or as in the spec (beta1, beta2, gain_lr, sphere, gains, ns_coeffs, ...); keys
not given take the preset's values, and `lr` is filled in with the preset's lr when absent,
so LR schedulers see it. `param_groups[i]["lr"]` is read at every step and pushed with
mdopt_set_group_lr (the group's gain_lr follows by the same factor), which is how every
torch LR scheduler works. betas, momentum, eps and weight_decay are pushed the same way
when they change (mdopt_set_group_hparam: OneCycleLR and CyclicLR with cycle_momentum=True
work); the other keys are fixed at the first step (a change before it rebuilds mdopt, one
after it is refused naming the keys).

Building the optimizer registers every tensor and projects each sphere matrix onto its
sphere, writing the model's weights (the method's initialisation), as mdopt_finalize does.
mdopt keeps its own state (f32 weights are their own master copy; bf16 weights get an f32
master inside mdopt); on one rank `self.state` holds read-only copies of it (read_state()),
and state_dict() carries mdopt's checkpoint (on CUDA the library stages it through host
memory).

torch's conventions (docs/integration.md, "Differences from torch.optim"): frozen
parameters (requires_grad=False at the build) are listed but not registered; a parameter
whose gradient is None at a step is left untouched, weights and state (at several ranks with
grads=local: when no rank has a gradient for it; a rank without one adds zeros to the mean,
as DDP does for unused parameters); a step where no parameter has a gradient does nothing;
each parameter keeps its own step count (state["step"], the t of its Adam bias
corrections), advanced only at the steps where it had a gradient, as torch's Adam keeps it;
non-contiguous parameters are staged through
contiguous copies; invalid hyperparameters are ValueErrors worded like torch's; a tensor
listed twice is warned of and registered once; copy.deepcopy makes an independent
optimizer (one rank), copy.copy one sharing this one.
"""

import copy
import ctypes
import os
import re
import tempfile
import warnings
import weakref

import torch

from . import _core
from . import checkpoint_ref as _ckref
from . import comm as _comm
from ._lib import DTYPE_BF16, DTYPE_F32, MdoptError, lib as _clib

# Keys of a group spec (docs/ABI.md), passed through as they are.
SPEC_KEYS = ("base", "sphere", "radius", "gains", "gain_param", "lr", "gain_lr", "beta1",
             "beta2", "eps", "momentum", "nesterov", "ns_steps", "ns_coeffs", "muon_scale",
             "weight_decay", "tangent", "preserve_init", "layout", "blocks")
# mdopt_create's options: keyword arguments of MDOptimizer with these names go there.
OPTION_KEYS = ("device", "threads", "kernels", "ns_dtype", "ns_form", "ns_comm_dtype",
               "grad_comm_dtype", "grads", "gather", "bucket_mb", "comm_timeout_s",
               "update_norms", "comm_pad")
# Spec keys mdopt_set_group_hparam changes between steps (lr has its own call).
_SETTABLE = ("beta1", "beta2", "eps", "momentum", "weight_decay")
# Group keys that are not spec keys: the preset, mdopt's group name, parameter names.
_META_KEYS = ("params", "preset", "name", "names")
# torch.optim spellings of features mdopt does not have: accepted only when off.
_TORCH_OFF_KEYS = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")
_DTYPES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16}
_TORCH_DTYPES = {DTYPE_F32: torch.float32, DTYPE_BF16: torch.bfloat16}
_DEVICE_OPTION = re.compile(r"(?:^|\s)device=(\S*)")
_CUDA_ORDINAL = re.compile(r"cuda:(\d+)$")
_NAME_BAD = re.compile(r"[^\x21-\x7e]")  # mdopt names: printable, no whitespace


def _spec_value(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _spec_items(group):
    """The spec's key=value pairs of a group (torch spellings mapped), preset first."""
    items = [("preset", group["preset"])]
    for k in SPEC_KEYS:
        if k == "beta1" and "betas" in group:
            items += [("beta1", group["betas"][0]), ("beta2", group["betas"][1])]
        elif k == "beta2" and "betas" in group:
            continue
        elif k in group:
            items.append((k, group[k]))
    return [(k, _spec_value(v)) for k, v in items]


def _spec(group):
    return " ".join("%s=%s" % kv for kv in _spec_items(group))


def _fixed(group):
    """What must not change after the build: the spec without lr."""
    return [kv for kv in _spec_items(group) if kv[0] != "lr"]


def _number(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def _check_hyperparameters(group):
    """torch.optim's checks of the hyperparameters a group carries, with torch's wording
    (ValueError); everything else about a spec is left to mdopt (MdoptError)."""
    if "lr" in group:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= _number(lr):
            raise ValueError("Invalid learning rate: {}".format(lr))
    if "eps" in group and not 0.0 <= _number(group["eps"]):
        raise ValueError("Invalid epsilon value: {}".format(group["eps"]))
    if "betas" in group:
        betas = group["betas"]
        for i in (0, 1):
            if not 0.0 <= _number(betas[i]) < 1.0:
                raise ValueError("Invalid beta parameter at index {}: {}".format(i, betas[i]))
    for k in ("beta1", "beta2"):
        if k in group and not 0.0 <= _number(group[k]) < 1.0:
            raise ValueError("Invalid {} value: {}".format(k, group[k]))
    if "momentum" in group and not 0.0 <= _number(group["momentum"]) < 1.0:
        raise ValueError("Invalid momentum value: {}".format(group["momentum"]))
    if "weight_decay" in group and not 0.0 <= _number(group["weight_decay"]):
        raise ValueError("Invalid weight_decay value: {}".format(group["weight_decay"]))


def _changed(before, after):
    """The spec keys whose values differ between two _fixed() lists, as 'key: old -> new'."""
    b, a = dict(before), dict(after)
    return ["%s: %s -> %s" % (k, b.get(k, "the preset's"), a.get(k, "the preset's"))
            for k in list(b) + [k for k in a if k not in b] if b.get(k) != a.get(k)]


def _extent(t):
    """Bytes from a tensor's first element to just past its last (strided layouts too)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


class _LibraryState(dict):
    """opt.state of an MDOptimizer on one rank: per parameter, copies of mdopt's state read
    (mdopt_get_state) when first looked at after a step, under torch's names where they
    exist. Writing into them changes nothing in mdopt."""

    def __init__(self, opt):
        super().__init__()
        self._owner = weakref.ref(opt)
        self._version = None

    def _refresh(self):
        opt = self._owner()
        if opt is None or opt._state_version == self._version:
            return
        dict.clear(self)
        dict.update(self, opt._read_state())
        self._version = opt._state_version

    def __getitem__(self, k):
        self._refresh()
        return dict.get(self, k, {})  # like torch's defaultdict(dict), without inserting

    def __contains__(self, k):
        self._refresh()
        return dict.__contains__(self, k)

    def __iter__(self):
        self._refresh()
        return dict.__iter__(self)

    def __len__(self):
        self._refresh()
        return dict.__len__(self)

    def __repr__(self):
        self._refresh()
        return dict.__repr__(self)

    def get(self, k, default=None):
        self._refresh()
        return dict.get(self, k, default)

    def keys(self):
        self._refresh()
        return dict.keys(self)

    def values(self):
        self._refresh()
        return dict.values(self)

    def items(self):
        self._refresh()
        return dict.items(self)


# opt.state's names of mdopt_get_state fields (torch's where torch has one).
_STATE_FIELDS = (("momentum", "momentum_buffer"), ("exp_avg", "exp_avg"),
                 ("exp_avg_sq", "exp_avg_sq"), ("gain_row", "gain_row"),
                 ("gain_col", "gain_col"), ("gain_scalar", "gain_scalar"),
                 ("radius", "radius"))


def _where(t):
    """A tensor's device as mdopt's device option spells it (cpu, cuda:K) or torch's."""
    if t.device.type == "cuda":
        return "cuda:%d" % (t.device.index or 0)
    return str(t.device)


def _where_device(device):
    return "cuda:%d" % (device.index or 0) if device.type == "cuda" else str(device)


def _library_path():
    from ._lib import path
    return path


def _mdopt_shape(t):
    """mdopt's view of a tensor: 0-D as 1-D, 1..3-D as they are, more as 2-D (d0, rest)."""
    s = tuple(t.shape)
    if len(s) == 0:
        return (1,)
    if len(s) <= 3:
        return s
    rest = 1
    for d in s[1:]:
        rest *= d
    return (s[0], rest)


class MDOptimizer(torch.optim.Optimizer):
    """The mdopt optimizer over torch parameters.

    params: an iterable of tensors or of param-group dicts (torch style); a group may carry
        `preset`, `name` (the mdopt group name; default "group<i>"), `names` (one per
        tensor) and any spec key in torch or spec spelling.
    preset: the default preset of groups that give none.
    comm: an mdopt.comm.Comm (default mdopt.comm.local()), or "mpi" for mdopt.comm.mpi();
        under torchrun, mdopt.comm.torch_distributed().
    options: mdopt_create's option string; keyword arguments named like an option
        (threads=2, grads="local", gather="deferred", kernels="reference", ...) are added.
    named_parameters: (name, tensor) pairs, e.g. model.named_parameters(), to name tensors
        in messages, checkpoints and telemetry.
    state_dir: where state_dict() has mdopt write its checkpoint, each rank its own file
        (default $MDOPT_STATE_DIR). Required on several ranks, on a file system every rank
        sees; on one rank without it the state_dict holds the checkpoint inline.
    overlap: on several ranks with grads=local, report each gradient as final from a
        post-accumulate-grad hook (mdopt_grads_ready), so that the reduce-scatter of full
        buckets overlaps the rest of backward. Only for one backward per step (with
        gradient accumulation the first backward's gradients would be sent). torch >= 2.1.
    grad_attr: the attribute of each tensor that holds its gradient: "grad" (autograd's), or
        e.g. "main_grad" (Megatron's DDP; a tensor without it, or with it None, falls back
        to .grad). Each tensor's gradient dtype is fixed when the optimizer is built: the
        dtype of that attribute's tensor if it exists then (bf16 weights may take float32
        gradients), else the weight's. A gradient of another dtype, device or layout is
        copied into a staging buffer of the registered dtype at every step.
    step_info: whether step() asks mdopt for the step's outcome (skipped, grad norm, ...)
        into last_step. Default: True on the CPU (free there), False on CUDA, where asking
        makes the host wait for the GPU at every step; step(info=True) asks for one step.
    **defaults: spec keys for every group (lr=, betas=, gain_lr=, ...).

    The device follows the parameters: every tensor on the CPU, or every tensor on one CUDA
    GPU K (device=cuda:K is then passed to mdopt_create). A device= option, if given, must
    name that device ("cuda" alone stands for the tensors' GPU).
    """

    def __init__(self, params, preset="md-muon", *, comm=None, options="",
                 named_parameters=None, state_dir=None, overlap=False, grad_attr="grad",
                 step_info=None, **defaults):
        opts = [options] if options else []
        group_defaults = {"preset": preset}
        for k, v in defaults.items():
            if k in OPTION_KEYS:
                opts.append("%s=%s" % (k, _spec_value(v)))
            elif k in _TORCH_OFF_KEYS:
                if v:
                    raise ValueError("MDOptimizer: %s=%r is not available in mdopt" % (k, v))
            elif k in SPEC_KEYS or k == "betas":
                group_defaults[k] = v
            else:
                raise TypeError(
                    "MDOptimizer: unknown keyword argument '%s' (group keys: %s, betas; "
                    "options: %s)" % (k, ", ".join(SPEC_KEYS), ", ".join(OPTION_KEYS)))
        self._options = " ".join(opts)
        m = _DEVICE_OPTION.search(self._options)
        self._device_option = m.group(1) if m else None
        if not isinstance(grad_attr, str) or not grad_attr.isidentifier():
            raise TypeError("MDOptimizer: grad_attr must be an attribute name such as 'grad' "
                            "or 'main_grad', not %r" % (grad_attr,))
        self._grad_attr = grad_attr
        self._step_info = None if step_info is None else bool(step_info)
        self._device = None
        if comm is None:
            comm = _comm.local()
        elif comm == "mpi":
            comm = _comm.mpi()
        elif not isinstance(comm, _comm.Comm):
            raise TypeError("MDOptimizer: comm must be an mdopt.comm.Comm, 'mpi' or None, "
                            "not %r" % type(comm).__name__)
        self.comm = comm
        self._names = {}
        if named_parameters is not None:
            for n, t in named_parameters:
                self._names.setdefault(id(t), n)
        self._state_dir = state_dir
        if overlap and not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise RuntimeError("MDOptimizer(overlap=True) needs torch >= 2.1 "
                               "(register_post_accumulate_grad_hook); this is %s"
                               % torch.__version__)
        self._overlap = bool(overlap)
        self._hooks = []
        self._opt = None
        self._built = False
        self._stepped = False
        self._state_version = 0
        self._steps_known = 0
        self.last_step = None
        self._preset = preset
        super().__init__(params, group_defaults)
        self._build()
        self._built = True
        self.state = _LibraryState(self) if self.comm.size == 1 else {}

    # --- registration -------------------------------------------------------------------

    def add_param_group(self, param_group):
        """Adds a group. Before the first step the mdopt optimizer is rebuilt with it (no
        state exists yet); after the first step this is refused: mdopt's state layout is
        fixed by then."""
        if self._stepped:
            raise RuntimeError(
                "MDOptimizer.add_param_group after the first step: mdopt fixes its "
                "parameters and state when it first steps; pass every group to "
                "MDOptimizer(...) or add it before the first step()")
        if not isinstance(param_group, dict):
            raise TypeError("MDOptimizer: a param group must be a dict, not %r"
                            % type(param_group).__name__)
        for k, v in param_group.items():
            if k in _META_KEYS or k in SPEC_KEYS or k == "betas":
                continue
            if k in _TORCH_OFF_KEYS:
                if v:
                    raise ValueError("MDOptimizer: %s=%r is not available in mdopt" % (k, v))
                continue
            raise ValueError(
                "MDOptimizer: param group key '%s' is unknown (spec keys: %s; torch "
                "spellings: betas; and preset, name, names)" % (k, ", ".join(SPEC_KEYS)))
        if "betas" in param_group and ("beta1" in param_group or "beta2" in param_group):
            raise ValueError("MDOptimizer: give either betas or beta1/beta2, not both")
        index = len(self.param_groups)
        super().add_param_group(param_group)  # warns of a tensor listed twice in the group
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            # A tensor listed twice is registered once (torch steps it once too).
            seen, keep = set(), []
            for i, t in enumerate(group["params"]):
                if id(t) not in seen:
                    seen.add(id(t))
                    keep.append(i)
            if len(keep) != len(group["params"]):
                if group.get("names") is not None and \
                        len(group["names"]) == len(group["params"]):
                    group["names"] = [group["names"][i] for i in keep]
                group["params"] = [group["params"][i] for i in keep]
            group.setdefault("name", "group%d" % index)
            self._check_group(group, index)
            if self._built:
                self._build()
        except BaseException:
            self.param_groups.pop()
            raise

    def _param_name(self, group, i, t):
        names = group.get("names")
        if names is not None:
            if len(names) != len(group["params"]):
                raise ValueError("MDOptimizer: group '%s' has %d params but %d names"
                                 % (group["name"], len(group["params"]), len(names)))
            n = names[i]
        else:
            n = self._names.get(id(t), "%s.%d" % (group["name"], i))
        return _NAME_BAD.sub("_", str(n))[:256] or "param"

    def _check_group(self, group, index):
        name = group["name"]
        if not isinstance(name, str) or not name or _NAME_BAD.search(name) or len(name) > 256:
            raise ValueError("MDOptimizer: group name %r must be 1-256 printable characters "
                             "without whitespace" % (name,))
        for j, other in enumerate(self.param_groups[:-1]):
            if other["name"] == name:
                raise ValueError("MDOptimizer: groups %d and %d are both named '%s'"
                                 % (j, index, name))
        # One device for every tensor: mdopt runs one optimizer on one device.
        first = {}
        for g in self.param_groups:
            for i, t in enumerate(g["params"]):
                first.setdefault(_where(t), (self._param_name(g, i, t), g["name"]))
        if len(first) > 1:
            raise ValueError(
                "MDOptimizer: the parameters are on several devices (%s); one mdopt "
                "optimizer runs on one device: put every parameter on the same CPU or GPU "
                "(or build one optimizer per device)"
                % "; ".join("'%s' (group '%s') on %s" % (n, gn, d)
                            for d, (n, gn) in first.items()))
        for i, t in enumerate(group["params"]):
            pname = self._param_name(group, i, t)
            where = "parameter '%s' (group '%s')" % (pname, name)
            if t.device.type not in ("cpu", "cuda"):
                raise ValueError("MDOptimizer: %s is on %s; mdopt runs on the CPU or on one "
                                 "CUDA GPU (device=cpu, device=cuda:K)" % (where, t.device))
            if t.dtype not in _DTYPES:
                raise ValueError("MDOptimizer: %s is %s; mdopt takes float32 or bfloat16"
                                 % (where, t.dtype))
            if t.is_sparse:
                raise ValueError("MDOptimizer: %s is sparse; mdopt takes dense tensors" % where)
            if t.numel() == 0:
                raise ValueError("MDOptimizer: %s is empty" % where)
        # Aliasing: two tensors over the same memory would be updated twice.
        spans = []
        for g in self.param_groups:
            for i, t in enumerate(g["params"]):
                start = t.data_ptr()
                spans.append((start, start + _extent(t),
                              self._param_name(g, i, t), g["name"]))
        spans.sort()
        for a, b in zip(spans, spans[1:]):
            if b[0] < a[1]:
                raise ValueError(
                    "MDOptimizer: parameters '%s' (group '%s') and '%s' (group '%s') share "
                    "memory; a tensor may be registered once (tie weights by using the same "
                    "Parameter, which is listed once)" % (a[2], a[3], b[2], b[3]))

    def _target_device(self):
        """The device every tensor is on (checked by _check_group) and the options string
        for mdopt_create: device=cuda:K added for CUDA tensors; a device= option given by
        the caller must name the tensors' device."""
        t0 = next((t for g in self.param_groups for t in g["params"]), None)
        device = t0.device if t0 is not None else torch.device("cpu")
        where = _where(t0) if t0 is not None else "cpu"
        asked = self._device_option
        if asked == "cuda" and device.type == "cuda":  # torch's spelling of "the current GPU"
            return device, _DEVICE_OPTION.sub(lambda m: m.group(0).replace(
                "device=cuda", "device=" + where), self._options, count=1)
        if asked is None or asked == where:
            options = self._options
            if asked is None and device.type == "cuda":
                options = ("%s device=%s" % (options, where)).strip()
            return device, options
        if asked != "cpu" and not _CUDA_ORDINAL.match(asked):
            return device, self._options  # a bad value: the library says what is wrong
        message = ("MDOptimizer: device=%s was asked for, but the parameters are on %s; the "
                   "optimizer runs where the parameters are (leave device= out, or move the "
                   "model there before building the optimizer)" % (asked, where))
        if asked != "cpu":
            from . import cuda_backend
            ok, why = cuda_backend(int(asked.split(":")[1]))
            if not ok:
                message += "; and this libmdopt cannot run on CUDA: %s" % why
        raise ValueError(message)

    def _sync(self, device=None):
        """Waits for the GPU (CUDA only): before and after mdopt calls that take no stream
        and read or write the model's tensors (finalize, save, load)."""
        device = device or self._device
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    def _stream(self):
        """torch's current stream of the optimizer's GPU, as mdopt's stream argument."""
        if self._device is None or self._device.type != "cuda":
            return None
        return torch.cuda.current_stream(self._device).cuda_stream

    def _grad_dtype(self, t):
        """The gradient dtype a tensor is registered with: that of its grad_attr tensor if
        it has one now (bf16 weights may take f32 gradients), else the weight's."""
        dt = _DTYPES[t.dtype]
        g = getattr(t, self._grad_attr, None) if self._grad_attr != "grad" else None
        if isinstance(g, torch.Tensor) and g.dtype in _DTYPES:
            gd = _DTYPES[g.dtype]
            if not (dt == DTYPE_F32 and gd == DTYPE_BF16):
                return gd
        return dt

    def _build(self):
        """Creates the mdopt optimizer with every group and tensor and finalizes it (which
        projects the sphere matrices). The previous one, if any, is replaced only once the
        new one is complete."""
        device, options = self._target_device()
        try:
            opt = _core.Optimizer(self.comm, options)
        except MdoptError as e:
            if device.type != "cuda":
                raise
            raise MdoptError(e.status, "MDOptimizer: the parameters are on %s and this "
                             "libmdopt (%s) cannot run there: %s. Build it with the CUDA "
                             "backend (launch/build-cuda.sh, or cmake -DMDOPT_CUDA=ON) and "
                             "point MDOPT_LIBRARY at it" % (_where_device(device),
                                                            _library_path(), e.message)) from None
        entries, stages, frozen = [], {}, []
        for group in self.param_groups:
            try:
                opt.add_group(group["name"], _spec(group))
            except MdoptError as e:
                raise MdoptError(e.status, "param group '%s' (%s): %s"
                                 % (group["name"], _spec(group), e.message)) from None
            for i, t in enumerate(group["params"]):
                pname = self._param_name(group, i, t)
                if not t.requires_grad:
                    frozen.append((t, pname))  # not registered: never projected nor stepped
                    continue
                dt = _DTYPES[t.dtype]
                gdt = self._grad_dtype(t)
                weights = t
                if not t.is_contiguous():  # mdopt works on a contiguous copy (staged)
                    weights = stages[len(entries)] = t.detach().contiguous()
                try:
                    # A tensor attribute mdopt_radius_scale scales its sphere's radius
                    # (mdopt_param_desc.radius_scale; 0 or absent: 1).
                    index = opt.add_param(pname, group["name"], _mdopt_shape(t), dt,
                                          weights.data_ptr(), gdt, None,
                                          float(getattr(t, "mdopt_radius_scale", 0.0)))
                except MdoptError as e:
                    message = e.message
                    if t.dim() == 0:  # mdopt sees a 0-d tensor as 1-D of one element
                        message = message.replace(" is 1-D ", " is 0-d (a scalar) ")
                    raise MdoptError(e.status, "parameter '%s' (group '%s', shape %s, %s): %s"
                                     % (pname, group["name"], tuple(t.shape), t.dtype,
                                        message)) from None
                entries.append((t, dt, gdt, pname))
        if not entries:
            opt.destroy()
            raise ValueError("MDOptimizer: no parameter requires grad (every one is frozen); "
                             "there is nothing to optimize")
        self._sync(device)  # the weights as torch last wrote them
        with torch.no_grad():
            opt.finalize()
            for k, buf in stages.items():
                entries[k][0].copy_(buf)
        self._sync(device)  # the projected weights, before torch reads them
        self._device = device
        lrs = []
        for group in self.param_groups:
            lr, _ = opt.group_lr(group["name"])
            if "lr" not in group:
                group["lr"] = lr
            lrs.append(float(group["lr"]))
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._opt is not None:
            self._opt.destroy()
        self._opt = opt
        self._entries = entries
        self._stages = stages  # index -> contiguous copy of a non-contiguous weight
        self._frozen = frozen
        self._spec_lrs = lrs  # each group's lr in its spec (gain_lr follows lr / this)
        self._state_version += 1
        self._pointers = [None] * len(entries)
        self._buffers = {}  # index -> staging copy of a gradient mdopt cannot read as it is
        self._pushed = [None] * len(self.param_groups)  # lr last set in mdopt, per group
        self._fixed = [_fixed(g) for g in self.param_groups]
        if self._overlap and self.comm.size > 1:
            for k, (t, _, _, _) in enumerate(entries):
                self._hooks.append(t.register_post_accumulate_grad_hook(
                    lambda _t, k=k: self._grad_final(k)))

    def _grad_final(self, k):
        """overlap=True: parameter k's gradient is final; mdopt copies it now and starts
        the reduce-scatter of every bucket whose gradients are all final."""
        ptrs = (self._weight(k).data_ptr(), self._grad_pointer(k))
        if ptrs != self._pointers[k]:
            self._opt.set_pointers(k, ptrs[0], ptrs[1])
            self._pointers[k] = ptrs
        self._opt.grads_ready(k, 1, self._stream())

    # --- stepping -----------------------------------------------------------------------

    def _changed_keys(self, gi, group):
        before, after = dict(self._fixed[gi]), dict(_fixed(group))
        keys = [k for k in list(before) + [k for k in after if k not in before]
                if before.get(k) != after.get(k)]
        settable = all(k in _SETTABLE and k in after for k in keys)
        return keys, after, settable

    def _push_hparams(self, gi, group, keys, after):
        """Pushes the keys that mdopt lets change between steps (beta1, beta2, eps,
        momentum, weight_decay; betas as beta1/beta2) with mdopt_set_group_hparam; on a
        refused value the ones already set are put back."""
        name = group["name"]
        done = []
        try:
            for k in keys:
                old = self._opt.group_hparam(name, k)
                self._opt.set_group_hparam(name, k, float(after[k]))
                done.append((k, old))
        except MdoptError as e:
            for k, old in reversed(done):
                self._opt.set_group_hparam(name, k, old)
            raise MdoptError(e.status, "MDOptimizer: param group '%s': %s"
                             % (name, e.message)) from None
        self._fixed[gi] = _fixed(group)

    def _push_lrs(self):
        """Before a step: every group's lr, and the other keys changed since the last step
        where mdopt takes them. Everything is checked before anything is pushed."""
        pushes = []
        for gi, group in enumerate(self.param_groups):
            if _fixed(group) == self._fixed[gi]:
                continue
            keys, after, settable = self._changed_keys(gi, group)
            if not self._stepped:
                # No state yet: rebuild with the new values (as add_param_group does).
                _check_hyperparameters(group)
                self._build()
                return self._push_lrs()
            if not settable:
                raise MdoptError(
                    "MDOPT_INVALID_STATE",
                    "MDOptimizer: param group '%s' changed after the first step (%s); after "
                    "it mdopt takes new values of lr, betas, eps, momentum and weight_decay "
                    "only (where the group's rule has them), the other keys are fixed"
                    % (group["name"], "; ".join(_changed(self._fixed[gi], _fixed(group)))))
            _check_hyperparameters(group)
            pushes.append((gi, group, keys, after))
        for gi, group, keys, after in pushes:
            self._push_hparams(gi, group, keys, after)
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            if lr != self._pushed[gi]:
                self._opt.set_group_lr(group["name"], lr)
                self._pushed[gi] = lr

    def _grad_tensor(self, t):
        g = getattr(t, self._grad_attr, None) if self._grad_attr != "grad" else None
        return t.grad if g is None else g

    def _grad_pointer(self, k):
        """The gradient pointer mdopt reads for parameter k: None (NULL) when it has no
        gradient, so that mdopt leaves it untouched (at several ranks the ranks without one
        add zeros to the mean)."""
        t, dt, gdt, pname = self._entries[k]
        g = self._grad_tensor(t)
        if g is None:
            return None
        want = _TORCH_DTYPES[gdt]
        if g.device == t.device and not g.is_sparse and \
                g.dtype == want and g.is_contiguous() and g.shape == t.shape:
            return g.data_ptr()
        buf = self._buffers.get(k)
        if buf is None:
            buf = self._buffers[k] = torch.zeros(t.shape, dtype=want, device=t.device)
        if g.is_sparse:
            raise ValueError("MDOptimizer: parameter '%s' has a sparse gradient" % pname)
        if g.numel() != t.numel():
            raise ValueError("MDOptimizer: parameter '%s' has a gradient of shape %s for "
                             "a weight of shape %s" % (pname, tuple(g.shape), tuple(t.shape)))
        buf.copy_(g.reshape(t.shape))
        return buf.data_ptr()

    def _weight(self, k):
        """The tensor mdopt reads and writes for parameter k (its staging copy if the
        parameter is not contiguous)."""
        buf = self._stages.get(k)
        return self._entries[k][0] if buf is None else buf

    @torch.no_grad()
    def _stage_in(self):
        """Non-contiguous parameters: their weights as torch last wrote them, into the
        contiguous copies mdopt works on (f32 weights are mdopt's master copy)."""
        for k, buf in self._stages.items():
            buf.copy_(self._entries[k][0])

    @torch.no_grad()
    def _stage_out(self):
        for k, buf in self._stages.items():
            self._entries[k][0].copy_(buf)

    def _point(self):
        for k in range(len(self._entries)):
            ptrs = (self._weight(k).data_ptr(), self._grad_pointer(k))
            if ptrs != self._pointers[k]:
                self._opt.set_pointers(k, ptrs[0], ptrs[1])
                self._pointers[k] = ptrs

    @torch.no_grad()
    def step(self, closure=None, *, info=None):
        """One mdopt step (collective on several ranks, each passing its own gradients with
        grads=local). Returns the closure's loss. A NaN/Inf gradient skips the step:
        nothing changes and `last_step.skipped` is True. A parameter whose gradient is None
        is left as it was, weights and state (as torch.optim does); at several ranks with
        grads=local only when no rank has a gradient for it (a rank without one adds zeros
        to the mean, as DDP does for unused parameters), with grads=reduced every rank must
        have one or none (else MdoptError MDOPT_INVALID_ARGUMENT and nothing changes).

        info: ask for the step's outcome (last_step) this time; None follows step_info.
        On CUDA without it the call returns with the step queued on torch's current stream
        and last_step is None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for t, pname in self._frozen:
            if self._grad_tensor(t) is not None:
                raise MdoptError(
                    "MDOPT_INVALID_STATE",
                    "MDOptimizer.step: parameter '%s' was frozen (requires_grad=False) when "
                    "the optimizer was built, so mdopt does not hold it, but it has a "
                    "gradient now; build the optimizer after unfreezing it" % pname)
        self._push_lrs()
        if self.comm.size == 1 and all(self._grad_tensor(t) is None
                                       for t, _, _, _ in self._entries):
            self.last_step = None  # no gradient at all: nothing to do, as in torch
            return loss
        # A parameter without a gradient gets a NULL gradient pointer: mdopt skips it.
        self._point()
        if info is None:
            info = self.step_info
        self._stage_in()
        try:
            self.last_step = self._opt.step(1.0, self._stream(), bool(info))
        finally:
            self._stage_out()
        self._stepped = True
        self._state_version += 1
        if self.last_step is not None:
            self._steps_known = self.last_step.step
        return loss

    @property
    def device(self):
        """The torch.device the optimizer runs on (that of its parameters)."""
        return self._device

    @property
    def step_info(self):
        """Whether step() asks for the step's outcome by default (see MDOptimizer)."""
        if self._step_info is not None:
            return self._step_info
        return self._device is None or self._device.type != "cuda"

    def gather_params(self):
        """With gather=deferred on several ranks: all-gathers the weights the last step
        updated; call it before the next forward. A no-op otherwise. On CUDA it is ordered
        on torch's current stream."""
        self._opt.gather_params(self._stream())
        self._stage_out()

    def group_info(self, group):
        """What the last step did to a group (by name or index): a GroupStats of matrices,
        orthogonalized, projected, gain_stepped, skipped, mean_relative_update (NaN unless
        built with update_norms=1). Collective on several ranks."""
        if isinstance(group, int):
            group = self.param_groups[group]["name"]
        return self._opt.group_info(group)

    @property
    def mdopt(self):
        """The underlying mdopt._core.Optimizer (get_state, describe_plan, state_bytes)."""
        return self._opt

    def _read_field(self, k, field):
        """One mdopt_get_state field of parameter k as a float64 CPU tensor, or None where
        the parameter has no such state (collective on several ranks)."""
        h = self._opt.handle
        n = ctypes.c_int64()
        if _clib.mdopt_get_state(h, k, field.encode(), None, 0, ctypes.byref(n)) != 0:
            return None
        out = torch.empty(n.value, dtype=torch.float64)
        buf = ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double))
        if _clib.mdopt_get_state(h, k, field.encode(), buf, n.value, None) != 0:
            return None
        return out

    def _read_state(self):
        """{param: {name: tensor}} of mdopt's per-parameter state (see read_state)."""
        out = {}
        if not self._stepped:
            return out  # as in torch: no state before the first step
        self._sync()
        for k, (t, _, _, _) in enumerate(self._entries):
            st = {}
            # The parameter's own count (mdopt_get_state "step", ABI minor 6); a library
            # without it refuses the field: then the optimizer's count, which it used.
            own = self._read_field(k, "step")
            if own is not None:
                st["step"] = torch.tensor(float(own[0]))
            elif self._steps_known is not None:
                st["step"] = torch.tensor(float(self._steps_known))
            for field, name in _STATE_FIELDS:
                v = self._read_field(k, field)
                if v is None:
                    continue
                if v.numel() == t.numel() and field in ("momentum", "exp_avg", "exp_avg_sq"):
                    v = v.reshape(t.shape)
                st[name] = v.to(device=t.device, dtype=torch.float32)
            out[t] = st
        return out

    def read_state(self):
        """mdopt's per-parameter state, {param: {name: tensor}}: `step` (the steps the
        parameter took: with a gradient, skipped ones excluded), `momentum_buffer` (Muon), `exp_avg` and `exp_avg_sq`
        (Adam), the effective gains `gain_row` / `gain_col` / `gain_scalar` and the sphere
        `radius`, each present where the parameter has it; float32 copies on the
        parameter's device (changing them changes nothing in mdopt). Every tensor is whole:
        on several ranks the call is collective (each rank's rows are all-gathered), so every
        rank must call it. On one rank `opt.state` reads the same, after each step when
        first looked at; on several ranks `opt.state` stays empty."""
        return self._read_state()

    # --- copies -------------------------------------------------------------------------

    def __copy__(self):
        """copy.copy: another MDOptimizer object over the same mdopt optimizer, param
        groups and state (as a shallow copy of a torch optimizer shares them): stepping
        either steps both."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        """copy.deepcopy: an independent optimizer over deep copies of the parameters (or
        the copies already in memo, e.g. in copy.deepcopy((model, opt))), with a copy of
        mdopt's state, written and read back through a temporary checkpoint. One rank only:
        on several ranks a copy would need every rank to make it at once."""
        if self.comm.size > 1:
            raise TypeError(
                "MDOptimizer on %d ranks cannot be deep-copied: its state is sharded over "
                "the ranks; save it with state_dict() and load it into a new MDOptimizer "
                "built on every rank" % self.comm.size)
        groups, current, extras = [], [], []
        known = SPEC_KEYS + _META_KEYS + _TORCH_OFF_KEYS + ("betas",)
        for gi, g in enumerate(self.param_groups):
            ng, extra = {}, {}
            for key, v in g.items():
                # Keys of others (a scheduler's initial_lr, ...) are set after the build.
                into = ng if key in known else extra
                into[key] = [copy.deepcopy(t, memo) for t in v] if key == "params" else \
                    copy.deepcopy(v, memo)
            extras.append(extra)
            # Built with the original's spec lr, so that gain_lr follows the same factor;
            # the group's current lr is pushed at the copy's first step.
            current.append(ng["lr"])
            ng["lr"] = self._spec_lrs[gi]
            groups.append(ng)
        names = [(copy.deepcopy(t, memo), n) for t, _, _, n in self._entries]
        names += [(copy.deepcopy(t, memo), n) for t, n in self._frozen]
        ctor = {k: v for k, v in self.defaults.items() if k not in ("preset",)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = type(self)(groups, preset=self._preset, comm=self.comm,
                             options=self._options, named_parameters=names,
                             state_dir=self._state_dir, overlap=self._overlap,
                             grad_attr=self._grad_attr, step_info=self._step_info, **ctor)
        memo[id(self)] = new
        for g, lr, extra in zip(new.param_groups, current, extras):
            g["lr"] = lr
            g.update(extra)
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            if attr in self.__dict__:
                setattr(new, attr, copy.copy(self.__dict__[attr]))
        if self._stepped:
            with tempfile.TemporaryDirectory(prefix="mdopt-copy-") as d:
                self._sync()
                self._save(d)
                new._sync()
                new._load(d)
                new._sync()
            new._stepped = True
        new._steps_known = self._steps_known
        new.last_step = self.last_step
        return new

    def __getstate__(self):
        raise TypeError("MDOptimizer cannot be pickled: its state lives in libmdopt; save "
                        "opt.state_dict() (torch.save) and load it into a new MDOptimizer")

    def param_index(self, tensor):
        """mdopt's index of a registered tensor (for mdopt.get_state)."""
        for k, (t, _, _, _) in enumerate(self._entries):
            if t is tensor:
                return k
        raise KeyError("tensor is not registered with this MDOptimizer")

    # --- checkpoints --------------------------------------------------------------------

    def _save(self, directory):
        self._stage_in()
        self._sync()
        self._opt.save(directory)

    def _load(self, directory):
        self._opt.load(directory)
        self._stage_out()
        self._state_version += 1
        try:
            import json
            with open(os.path.join(directory, "manifest.json")) as f:
                self._steps_known = int(json.load(f).get("step", 0))
        except (OSError, ValueError):
            self._steps_known = None


    def save_checkpoint(self, directory):
        """mdopt_save (collective; a directory every rank sees): each rank writes its own
        rank file, streamed through a 1 MiB buffer, rank 0 the manifest last. Loads at any
        rank count with load_checkpoint. state_dict() with a state_dir does the same and
        returns a reference to the save."""
        self._sync()
        self._save(directory)

    def load_checkpoint(self, directory):
        """mdopt_load: restores the state and writes the saved weights into the model. Each
        rank opens only the rank files holding rows it holds now."""
        self._sync()
        self._load(directory)
        self._sync()
        self._stepped = True
        self._pushed = [None] * len(self.param_groups)

    @property
    def state_dir(self):
        """Where state_dict() has mdopt write its checkpoint (state_dir= or
        $MDOPT_STATE_DIR; None: one rank, a self-contained state_dict). Settable, e.g. to
        one directory per saved iteration: a save replaces the previous one in the same
        directory, and state_dicts that referred to it can no longer be loaded."""
        return self._state_dir if self._state_dir is not None else \
            (os.environ.get("MDOPT_STATE_DIR") or None)

    @state_dir.setter
    def state_dir(self, value):
        self._state_dir = None if value is None else os.fspath(value)

    def state_dict(self):
        """torch's state_dict plus "mdopt", which holds no optimizer state of another rank:

        - with a checkpoint directory (state_dir= or $MDOPT_STATE_DIR; required on several
          ranks, a directory every rank sees): mdopt_save writes it (each rank its own rank
          file, rank 0 the manifest) and "mdopt" is a reference to that save: the directory,
          step, the manifest's checksum and this rank's file (name, size, checksum). Host
          memory beyond the live state: mdopt's 1 MiB write buffer.
        - on one rank without one: the checkpoint inline (the manifest and the one rank
          file as bytes, i.e. the whole state once more in memory), self-contained.

        Either loads with load_state_dict at any rank count (mdopt reshards)."""
        state, self.state = self.state, {}  # mdopt's state travels in "mdopt", once
        try:
            sd = super().state_dict()
        finally:
            self.state = state
        self._sync()
        d = _ckref.shared_dir(self._state_dir, self.comm.size, "MDOptimizer.state_dict")
        if d is None:
            with tempfile.TemporaryDirectory(prefix="mdopt-state-") as t:
                self._save(t)
                files = self._read_dir(t)
            sd["mdopt"] = {"format": "mdopt-torch-state", "version": 1, "world_size": 1,
                           "step": self._step_count(files), "files": files}
            return sd
        self._save(d)  # collective: every rank writes its file, rank 0 the manifest
        ref = _ckref.make(d, self.comm.rank)
        sd["mdopt"] = {"format": "mdopt-torch-state", "version": 2,
                       "world_size": self.comm.size, "step": ref["step"], "checkpoint": ref}
        return sd

    @staticmethod
    def _read_dir(d):
        import json
        with open(os.path.join(d, "manifest.json"), "rb") as f:
            manifest = f.read()
        files = {"manifest.json": manifest}
        for rf in json.loads(manifest.decode())["rank_files"]:
            with open(os.path.join(d, rf["name"]), "rb") as f:
                files[rf["name"]] = f.read()
        return files

    @staticmethod
    def _step_count(files):
        import json
        return int(json.loads(files["manifest.json"].decode()).get("step", 0))

    def load_referenced(self, ref, directory=None):
        """Loads the mdopt save a checkpoint reference names (collective). The reference is
        checked first (the directory holds that save, its rank file is there with the size
        written); a rank that refuses it still takes part in mdopt_load, on a path that
        does not exist, so that every rank fails together rather than waiting."""
        d = directory or ref["directory"]
        why = _ckref.check(ref, d)
        self._sync()
        if why is not None:
            try:
                self._load(os.path.join(d, "refused-by-rank-%d" % self.comm.rank))
            except MdoptError:
                pass
            raise ValueError("MDOptimizer: cannot load the referenced checkpoint: " + why)
        self._load(d)  # collective; each rank reads only the rows it now holds
        self._sync()
        self._stepped = self._stepped or ref["step"] > 0
        self._pushed = [None] * len(self.param_groups)

    def load_state_dict(self, state_dict):
        """Restores param_groups (torch) and mdopt's state from state_dict(), saved at any
        rank count. Like mdopt_load, it also writes the saved weights into the model. If the
        groups' specs differ from this optimizer's, mdopt is rebuilt with the saved ones
        first (mdopt refuses a checkpoint whose state layout does not match)."""
        sd = dict(state_dict)
        blob = sd.pop("mdopt", None)
        if not isinstance(blob, dict) or blob.get("format") != "mdopt-torch-state":
            raise ValueError("MDOptimizer.load_state_dict: not an MDOptimizer state_dict "
                             "(no 'mdopt' entry)")
        if blob.get("version") not in (1, 2):
            raise ValueError("MDOptimizer.load_state_dict: state_dict version %r; this "
                             "package reads versions 1 and 2" % blob.get("version"))
        names = [g["name"] for g in self.param_groups]
        fixed = [_fixed(g) for g in self.param_groups]
        sd["state"] = {}  # opt.state is read from mdopt, not restored from the dict
        state = self.state
        super().load_state_dict(sd)
        self.state = state
        for g, n in zip(self.param_groups, names):
            g.setdefault("name", n)
        if [_fixed(g) for g in self.param_groups] != fixed or \
                [g["name"] for g in self.param_groups] != names:
            self._build()
        if blob["version"] == 2:
            self.load_referenced(blob["checkpoint"])
            return
        # Version 1: the checkpoint inline (saved on one rank), written out for mdopt_load.
        with tempfile.TemporaryDirectory(prefix="mdopt-load-") as d:
            for name, data in blob["files"].items():
                if os.path.basename(name) != name:
                    raise ValueError("MDOptimizer.load_state_dict: bad file name %r" % name)
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            self._sync()
            self._load(d)  # collective
            self._sync()
        self._stepped = self._stepped or blob.get("step", 0) > 0
        self._pushed = [None] * len(self.param_groups)

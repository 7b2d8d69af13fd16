"""Linear layers on oneDNN's float32 products (gkd.models.onednn), where this machine's timing picks them."""

import pytest
import torch

import gkd.models.onednn as onednn
from gkd.rollout import decode


@pytest.fixture(autouse=True)
def _unsettled(monkeypatch):
    """Each test starts and ends with no product settled for the process (gkd.machine.settle_onednn), and no product
    pinned (tests/conftest.py pins one for the rest of the suite)."""
    import gkd.machine

    monkeypatch.setattr(gkd.machine, "_settled", [])
    monkeypatch.delenv("GKD_CPU_PRODUCT", raising=False)


def _recorded(monkeypatch) -> list:
    """The weight shapes oneDNN's products get, in gkd.models.onednn."""
    calls = []
    real = onednn.onednn_linear
    monkeypatch.setattr(onednn, "onednn_linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
    return calls


def test_a_layer_on_onednn_gives_f_linears_values_and_gradients(monkeypatch):
    """Forward, the input's, the weight's and the bias's gradients, each by oneDNN, as F.linear's; a frozen weight and
    no bias get none."""
    monkeypatch.setattr(onednn, "onednn_faster", lambda: True)
    calls = _recorded(monkeypatch)
    for bias, trained in ((True, True), (False, False)):
        ours, plain = torch.nn.Linear(300, 16, bias=bias), torch.nn.Linear(300, 16, bias=bias)
        plain.load_state_dict(ours.state_dict())
        for m in (ours, plain):
            m.weight.requires_grad_(trained)
        assert onednn.faster_linears(ours) == 1 and onednn.takes_products(ours) and not onednn.takes_products(plain)
        x = torch.randn(3, 5, 300)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        calls.clear()
        outs = [m(xi) for m, xi in zip((ours, plain), xs)]
        grad = torch.randn(3, 5, 16)
        for out in outs:
            out.backward(grad)
        assert calls == [(16, 300), (300, 16)] + ([(300, 15)] if trained else [])  # forward, dL/dx, dL/dW
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
        if trained:
            torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
        else:
            assert ours.weight.grad is None
        if bias:
            torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_the_weight_gradients_transposes_share_one_buffer_per_thread_and_stacked_layers_keep_their_gradients(
        monkeypatch):
    """A weight gradient's transposed output gradient goes into a dead buffer with the room, else one buffer per
    thread (grown as needed; above SCRATCH_BYTES a copy of its own); layers whose backwards follow one another
    through it get F.linear's gradients."""
    g = torch.randn(7, 5)
    import gkd.machine

    rows = gkd.machine.transposed_rows
    first, second = rows(g), rows(torch.randn(4, 6))
    assert first.data_ptr() == second.data_ptr()  # (the first one's values are gone: only while its product runs)
    torch.testing.assert_close(rows(g), g.T, rtol=0, atol=0)
    big = rows(torch.randn(64, 9))  # grows the buffer
    assert rows(torch.randn(2, 3)).data_ptr() == big.data_ptr()
    other = []
    t = __import__("threading").Thread(target=lambda: other.append(rows(g).data_ptr()))
    t.start(), t.join()
    assert other[0] != big.data_ptr()  # another thread's own buffer
    room = torch.empty(5, 9)  # a dead buffer with the room takes it
    assert rows(g, room).data_ptr() == room.data_ptr() and rows(torch.randn(9, 6), room).data_ptr() != room.data_ptr()
    monkeypatch.setattr(gkd.machine, "SCRATCH_BYTES", 100)
    assert rows(torch.randn(64, 9)).data_ptr() != big.data_ptr()  # above the bound: a copy of its own
    monkeypatch.setattr(gkd.machine, "SCRATCH_BYTES", 16 << 20)

    monkeypatch.setattr(onednn, "onednn_faster", lambda: True)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 8))
    plain = torch.nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else m
                                  for m in ours])
    plain.load_state_dict(ours.state_dict())
    assert onednn.faster_linears(ours) == 3
    x = torch.randn(2, 11, 40)
    for m in (ours, plain):
        m(x).pow(2).sum().backward()
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_only_plain_float32_cpu_layers_take_onednn_and_only_where_it_was_timed_faster(monkeypatch):
    class Sub(torch.nn.Linear):
        pass

    def model():
        m = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).bfloat16(), Sub(4, 4),
                                 torch.nn.Linear(4, 4)])
        m[3].forward = lambda x: x  # someone else's
        return m

    monkeypatch.setattr(onednn, "onednn_faster", lambda: False)
    assert onednn.faster_linears(model()) == 0
    monkeypatch.setattr(onednn, "onednn_faster", lambda: True)
    m = model()
    assert onednn.faster_linears(m) == 1
    assert [onednn.takes_products(layer) for layer in m] == [True, False, False, False]
    with torch.no_grad():  # a layer moved off float32 since takes F.linear
        m[0].double()
        torch.testing.assert_close(m[0](torch.ones(2, 4, dtype=torch.float64)),
                                   torch.nn.functional.linear(torch.ones(2, 4, dtype=torch.float64), m[0].weight,
                                                              m[0].bias))


def test_sampling_takes_its_few_row_forms_and_oneDNN_for_many_rows_then_gives_the_layer_back(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_faster", lambda: True)
    calls = _recorded(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Linear(300, 16))
    onednn.faster_linears(model)
    with torch.no_grad(), decode.few_row_linears(model, form="weight_first"):
        model(torch.randn(3, 1, 16))  # few rows: weight-first
        assert calls == []
        model(torch.randn(40, 16))  # a prompt's rows: the layers' own products
        assert calls == [(300, 16), (16, 300)]
    assert all(onednn.takes_products(m) for m in model)


def test_a_one_process_run_trains_and_scores_on_onednn_where_it_is_faster(tiny, tmp_path, monkeypatch):
    """build.student and build.one_teacher give a one-process run's student and local teacher the products."""
    from gkd.config import TrainConfig
    from gkd.train.trainer import Trainer

    import gkd.machine
    import gkd.train.build

    monkeypatch.setattr(gkd.train.build, "onednn_faster", lambda: True)  # (as if timed faster: settled for the run)
    cfg = TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                      output_dir=str(tmp_path / "o"), max_completion_length=4, max_steps=1, micro_batch_size=4,
                      global_batch_size=4, progress_bar=False)
    t = Trainer(cfg, log=lambda *_: None)
    assert gkd.machine.onednn_faster()
    for model in (t.student, t.teacher.model):
        layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert layers and all(onednn.takes_products(m) for m in layers)
    t.close()


def test_a_layer_on_onednn_gives_a_tensor_of_its_own_keeps_what_f_linear_keeps_and_takes_no_rows(monkeypatch):
    """Its output may be changed in place under autograd (a 3-D input); a frozen weight's layer saves the weight
    alone for backward, as F.linear does; a batch of no rows gives an empty output."""
    monkeypatch.setattr(onednn, "onednn_faster", lambda: True)
    layer = torch.nn.Linear(8, 4)
    onednn.faster_linears(layer)
    x = torch.randn(2, 3, 8, requires_grad=True)
    layer(x).add_(1.0).sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad is not None
    layer.weight.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(5, 8, requires_grad=True)).sum().backward()
    assert saved == [torch.Size([4, 8])]
    assert layer(torch.randn(0, 8)).shape == (0, 4)


CACHE_PROBE = """
import ctypes, sys, torch
import gkd.machine as machine
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
def used():
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20
if sys.argv[1] == "cli":  # the command line bounds the caches before torch's own oneDNN operations
    import gkd.cli
    torch.nn.functional.conv2d(torch.randn(1, 16, 64, 64), torch.randn(32, 16, 3, 3))  # (torch's, on oneDNN)
assert machine.has_onednn()
w = torch.randn(64, 64)
before = used()
for rows in range(1, 201):  # 200 shapes, as a run's padded lengths change from step to step
    machine.onednn_linear(torch.randn(rows, 64), w)
print(used() - before)
"""


@pytest.mark.skipif(not decode._ONEDNN, reason="torch built without oneDNN")
def test_onednn_keeps_a_bounded_number_of_built_products_unless_the_user_chose_a_capacity():
    """oneDNN keeps every product it builds (about 0.6 MiB each) in caches of 1024; gkd bounds them before its first
    product, and its command line before any of torch's own oneDNN operations (a convolution), so a process that
    meets a new row count every step does not grow by it; a capacity the user set stays."""
    import os
    import subprocess
    import sys

    def grown(entry="library", **env) -> float:
        clean = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE, entry], env={**clean, **env}, check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])

    bounded, by_cli = grown(), grown("cli")
    chosen = grown(LRU_CACHE_CAPACITY="1024", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    assert bounded < 40 and by_cli < 40 and 80 < chosen, (bounded, by_cli, chosen)


def test_a_few_row_form_a_checkpoint_kept_is_taken_without_timing(monkeypatch):
    """decode.chosen_forms / restore_forms: the forms round-trip through JSON and a restored one is taken as it is
    (the timing is not asked); a oneDNN form is not restored where torch has no oneDNN."""
    import json

    layers = [torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)]
    monkeypatch.setattr(decode, "_FASTEST", {})
    form = decode._FewRowForm(layers)
    monkeypatch.setattr(decode._FewRowForm, "_time", lambda self, rows: "linear")
    assert form.form(3) is decode.FORMS["linear"]
    kept = json.loads(json.dumps(decode.chosen_forms()))
    decode._FASTEST.clear()
    decode.restore_forms([[shapes, rows, threads, "weight_first"] for shapes, rows, threads, _ in kept])
    monkeypatch.setattr(decode._FewRowForm, "_time", lambda self, rows: pytest.fail("timed again"))
    assert decode._FewRowForm(layers).form(3) is decode.FORMS["weight_first"]
    decode._FASTEST.clear()
    monkeypatch.setattr(decode, "_ONEDNN", False)
    decode.restore_forms([[shapes, rows, threads, "onednn"] for shapes, rows, threads, _ in kept])
    assert decode._FASTEST == {}


def test_a_resumed_run_multiplies_with_the_product_and_forms_its_checkpoint_recorded(tiny, tmp_path, monkeypatch):
    """The checkpoint records the run's settled product and its sampling's few-row forms; a resume on a machine whose
    timing now says otherwise takes the recorded ones (and ends on the uninterrupted run's weights, bit for bit: at
    this model's width the two products happen to agree bit for bit, so the recorded choices are asserted as such)."""
    import json
    import shutil

    import gkd.machine
    from gkd.config import TrainConfig
    from gkd.train.trainer import Trainer

    def cfg(out, **kw):
        return TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                           output_dir=str(out), max_completion_length=6, learning_rate=1e-3, lmbda=1.0,
                           lr_scheduler_type="constant", progress_bar=False, max_steps=2, micro_batch_size=8,
                           global_batch_size=8, save_steps=1, **kw)

    monkeypatch.setattr(decode, "_FASTEST", {})
    monkeypatch.setattr(gkd.machine, "_onednn_faster", lambda threads: True)  # the first run's timing
    full = Trainer(cfg(tmp_path / "o"), log=lambda *_: None)
    full.train()
    want = {k: v.detach().clone() for k, v in full.student.state_dict().items()}
    forms = dict(decode._FASTEST)
    assert forms and json.loads((tmp_path / "o" / "checkpoint-1" / "gkd_checkpoint.json").read_text())[
        "cpu_product"] == "onednn"
    full.close()

    shutil.rmtree(tmp_path / "o" / "checkpoint-2")  # as if killed after step 1's checkpoint
    gkd.machine._settled.clear()
    decode._FASTEST.clear()
    monkeypatch.setattr(gkd.machine, "_onednn_faster", lambda threads: False)  # the resumed run's timing
    flipped = {key: "linear" if name != "linear" else "weight_first" for key, name in forms.items()}
    monkeypatch.setattr(decode._FewRowForm, "_time", lambda self, rows: flipped[(self.shapes, rows,
                                                                                 torch.get_num_threads())])
    resumed = Trainer(cfg(tmp_path / "o", resume_from_checkpoint=str(tmp_path / "o" / "checkpoint-1")),
                      log=lambda *_: None)
    assert gkd.machine.onednn_faster() and decode._FASTEST == forms
    resumed.train()
    got = resumed.student.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    resumed.close()


def test_only_timed_forms_are_remembered_for_a_checkpoint(monkeypatch):
    """Layers off the CPU compute few rows by F.linear without timing, and nothing of theirs goes into
    chosen_forms: a checkpoint of an accelerator's run would otherwise pin F.linear on a CPU resume."""
    monkeypatch.setattr(decode, "_FASTEST", {})
    monkeypatch.setattr(decode._FewRowForm, "_time", lambda self, rows: pytest.fail("timed"))
    layers = [torch.nn.Linear(64, 128, device="meta"), torch.nn.Linear(128, 64, device="meta")]
    assert decode._FewRowForm(layers).form(4) is decode._linear and decode.chosen_forms() == []


def test_the_settled_product_is_the_checkpoints_where_this_torch_can_take_it(monkeypatch):
    """build.settle_product: a recorded product wins over the timing; a recorded oneDNN without oneDNN here is
    torch's, said in one line; without a record, the timing decides."""
    from types import SimpleNamespace

    import gkd.machine
    import gkd.train.build as build

    par, said = SimpleNamespace(device=torch.device("cpu"), world=1), []
    for timed, recorded, available, want in ((True, "torch", True, False), (False, "onednn", True, True),
                                             (True, "onednn", False, False), (True, None, True, True),
                                             (False, None, True, False)):
        gkd.machine._settled.clear()
        monkeypatch.setattr(gkd.machine, "_onednn_faster", lambda threads, timed=timed: timed)
        monkeypatch.setattr(build, "has_onednn", lambda available=available: available)
        build.settle_product(par, recorded, said.append)
        assert gkd.machine.onednn_faster() is want and build.product_name(par) == ("onednn" if want else "torch")
    assert len(said) == 1 and "lacks" in said[0]


@pytest.mark.skipif(not decode._ONEDNN, reason="torch built without oneDNN")
def test_gkd_cpu_product_pins_the_product_over_the_timing_and_the_checkpoint(monkeypatch):
    """GKD_CPU_PRODUCT=torch / onednn decides without timing, and over a checkpoint's record (said in one line); any
    other value is a one-line error naming the variable."""
    from types import SimpleNamespace

    import gkd.machine
    import gkd.train.build as build
    from gkd.errors import GKDError

    monkeypatch.setattr(gkd.machine, "_onednn_faster", lambda threads: pytest.fail("timed"))
    par, said = SimpleNamespace(device=torch.device("cpu"), world=1), []
    for pinned, recorded, want in (("torch", "onednn", False), ("onednn", "torch", True), ("onednn", None, True)):
        monkeypatch.setenv("GKD_CPU_PRODUCT", pinned)
        gkd.machine._settled.clear()
        assert gkd.machine.onednn_faster() is want
        build.settle_product(par, recorded, said.append)
        assert build.product_name(par) == pinned
    assert len(said) == 2 and all("GKD_CPU_PRODUCT" in line for line in said)
    gkd.machine._settled.clear()
    monkeypatch.setenv("GKD_CPU_PRODUCT", "mkl")
    with pytest.raises(GKDError, match="GKD_CPU_PRODUCT='mkl': choose auto, torch or onednn"):
        gkd.machine.onednn_faster()

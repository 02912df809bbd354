"""Optimizer-in-backward (issue 11): the ordinary update, one parameter at a time, with no full set of gradients."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from rlclip.errors import ConfigError
from rlclip.optim_in_backward import OptimizerInBackward, build_in_backward
from rlclip.trainer import Trainer

IN_BACKWARD = ("train.max_grad_norm=0", "train.micro_batch_size=16", "max_steps=4", "save_steps=0")


def _trained(tmp_path, in_backward: bool, *extra: str) -> Trainer:
    cfg = tiny_config(tmp_path, *IN_BACKWARD, f"train.optimizer_in_backward={str(in_backward).lower()}", *extra)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weights_and_optimizer_state_equal_the_ordinary_step(tmp_path, optimizer):
    # 4 optimizer steps: mu = 2 passes x 2 mini-batches, so ratios move off 1 and clipping acts
    extra = (f"train.optimizer={optimizer}", "train.weight_decay=0.1")
    plain = _trained(tmp_path / "plain", False, *extra)
    hooked = _trained(tmp_path / "hooked", True, *extra)
    for (name, a), b in zip(plain.model.named_parameters(), hooked.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), _fresh(tmp_path).parameters()))
    plain_state, hooked_state = plain.optimizer.state_dict()["state"], hooked.optimizer.state_dict()["state"]
    assert sorted(plain_state) == sorted(hooked_state)  # keyed by parameter index; filled in backward order
    for index, a in plain_state.items():
        for key in a:
            assert torch.allclose(torch.as_tensor(a[key]), torch.as_tensor(hooked_state[index][key]), rtol=0,
                                  atol=1e-6), (index, key)


def _fresh(tmp_path):
    return Trainer(tiny_config(tmp_path / "fresh", *IN_BACKWARD)).model


def test_each_optimizer_call_sees_exactly_one_gradient(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *IN_BACKWARD, "train.optimizer_in_backward=true", "max_steps=2"))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    live = []
    trainer.in_backward.optimizer.register_step_pre_hook(
        lambda *_: live.append(sum(p.grad is not None for p in params)))
    history = trainer.train()
    assert live == [1] * (len(params) * 2)  # every parameter, once per optimizer step, alone
    assert all(p.grad is None for p in params)
    assert all(h["optim/skipped_steps"] == 0 and math.isfinite(h["optim/grad_norm"]) for h in history)


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    return model, params, OptimizerInBackward(optimizer, params, lambda m, loss: loss.backward())


def test_the_reported_norm_is_the_global_gradient_norm():
    model, params, hooks = _toy()
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(model(x).square().sum(), params)]).norm()
    before = [p.detach().clone() for p in params]
    hooks.backward(model, model(x).square().sum())
    norm, partial = hooks.finish()
    assert not partial and torch.allclose(norm.double(), expected, rtol=1e-6)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_a_nonfinite_loss_runs_no_backward_and_changes_nothing():
    model, params, hooks = _toy()
    before = [p.detach().clone() for p in params]
    hooks.backward(model, model(torch.ones(2, 3, dtype=torch.float64)).sum() * math.inf)
    norm, partial = hooks.finish()
    assert math.isnan(norm) and not partial and hooks.partial_steps == 0
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, params))


def test_a_nonfinite_gradient_stops_stepping_from_its_parameter_on():
    model, params, hooks = _toy()
    first, last = model[0], model[2]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first.weight.register_hook(lambda g: g * math.nan)  # reached after the last layer's parameters
    hooks.backward(model, model(torch.ones(2, 3, dtype=torch.float64)).sum())
    norm, partial = hooks.finish()
    assert math.isnan(norm) and partial and hooks.partial_steps == 1
    after = dict(model.named_parameters())
    assert not torch.equal(before["2.weight"], after["2.weight"]) and not torch.equal(before["2.bias"], last.bias)
    assert torch.equal(before["0.weight"], after["0.weight"])
    assert all(p.grad is None for p in params)


def test_a_backward_it_does_not_run_only_accumulates():
    model, params, hooks = _toy()
    before = [p.detach().clone() for p in params]
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    assert all(torch.equal(a, p) and p.grad is not None for a, p in zip(before, params))


@pytest.mark.parametrize("override, message", [
    ("train.max_grad_norm=1.0", "cannot clip by the global gradient norm"),
    ("train.grad_clip={name: zclip}", "cannot clip by the global gradient norm"),
    ("train.micro_batch_size=8", r"a mini-batch of 16 sequences is 2 micro-batches of 8; set train.micro_batch_size: 16"),
    ("advantage.name=gae", "does not step the PPO critic"),
])
def test_what_it_cannot_do_is_a_one_line_config_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(tmp_path, *IN_BACKWARD, "train.optimizer_in_backward=true", override)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", [
    SimpleNamespace(deepspeed=True, fsdp=None, accelerator=SimpleNamespace(num_processes=1)),
    SimpleNamespace(deepspeed=False, fsdp=object(), accelerator=SimpleNamespace(num_processes=1)),
    SimpleNamespace(deepspeed=False, fsdp=None, accelerator=SimpleNamespace(num_processes=2)),
])
def test_several_processes_deepspeed_and_fsdp_are_refused(layout):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="runs in one process without DeepSpeed or FSDP"):
        build_in_backward(True, optimizer, model, layout)
    assert build_in_backward(False, optimizer, model, layout) is None


def test_the_sparse_tied_embedding_gradient_equals_the_dense_one():
    from transformers import AutoModelForCausalLM

    from rlclip.model_setup import sparse_tied_embedding_gradient
    from rlclip.modeling import resolve_tiny

    grads = []
    for sparse in (False, True):
        model = AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"), dtype=torch.float64)
        assert sparse_tied_embedding_gradient(model) if sparse else not model.get_input_embeddings().sparse
        ids = torch.tensor([[1, 5, 9, 5, 2], [3, 3, 7, 8, 1]])
        logits = model(input_ids=ids).logits  # [2, 5, V]
        torch.log_softmax(logits, -1).gather(-1, ids[:, :, None]).sum().backward()
        weight = model.get_input_embeddings().weight
        assert weight.grad.layout == torch.strided  # the optimizer gets one dense gradient
        grads.append(weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)
    assert grads[1][1:10].abs().sum() > 0


def test_an_untied_embedding_stays_dense():
    from rlclip.model_setup import sparse_tied_embedding_gradient

    model = SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(4, 2),
                            get_output_embeddings=lambda: torch.nn.Linear(2, 4, bias=False))
    assert not sparse_tied_embedding_gradient(model)


def test_the_backward_releases_after_every_64_mib_of_finished_gradients():
    from rlclip.memory import FreeMemoryRelease

    model, params, hooks = _toy()
    release = FreeMemoryRelease(True, every=4 * 8)  # 4 float64 values
    calls = []
    release.trim = calls.append  # count instead of trimming
    release.watch_backward(model)
    hooks.backward(model, model(torch.ones(2, 3, dtype=torch.float64)).sum())
    # done in backward order: 2.bias (2 values), 2.weight (8): release; 0.bias (4): release; 0.weight (12): release
    assert calls == [0, 0, 0]
    assert all(p.grad is None for p in params)  # the release hooks run after the in-backward step


def test_the_trainer_releases_after_generation_before_each_backward_and_before_the_embedding(tmp_path):
    from rlclip.memory import _malloc_trim

    if _malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here")
    # one rollout: 2 optimizer steps of 2 micro-batches each
    on = Trainer(tiny_config(tmp_path / "on", "max_steps=2", "save_steps=0"))
    on.train()
    assert on.release_memory.calls == 1 + 2 * (2 + 2)
    off = Trainer(tiny_config(tmp_path / "off", "max_steps=2", "save_steps=0", "train.release_free_memory=false"))
    off.train()
    assert off.release_memory.calls == 0
    for a, b in zip(on.model.parameters(), off.model.parameters()):
        assert torch.equal(a, b)  # where freed memory lives changes no value


def test_a_forward_with_grad_releases_after_every_5th_decoder_layer_and_generation_does_not():
    from rlclip.memory import FreeMemoryRelease

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(12))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model, calls = Stack(), []
    release = FreeMemoryRelease(True)
    release.trim = calls.append
    release.watch_backward(model)
    with torch.no_grad():
        model(torch.ones(1, 2))
    assert calls == []
    model(torch.ones(1, 2))
    assert len(calls) == 2  # after layers 5 and 10


def test_a_tiny_run_learns_the_same_weights_with_and_without_the_sparse_embedding_gradient(tmp_path, monkeypatch):
    sparse = _trained(tmp_path / "sparse", False)
    assert sparse.model.get_input_embeddings().sparse
    monkeypatch.setattr("rlclip.model_setup.sparse_tied_embedding_gradient", lambda model: False)
    dense = _trained(tmp_path / "dense", False)
    assert not dense.model.get_input_embeddings().sparse
    for (name, a), b in zip(sparse.model.named_parameters(), dense.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name

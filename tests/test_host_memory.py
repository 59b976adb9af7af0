"""Weights copied into anonymous memory (huge pages where the kernel gives them) at load."""

import torch
from transformers import AutoModelForCausalLM

from engine import host_memory
from engine.model_loader import load_model


def _storages(model, min_bytes):
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if t.untyped_storage().nbytes() >= min_bytes}


def test_moved_weights_compute_the_same_and_keep_their_parameter_objects(demo_model_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 33, 7, 100, 2]])
    with torch.no_grad():
        before = model(ids).logits
    params = dict(model.named_parameters(remove_duplicate=False))
    old = {name: (p.data_ptr(), p.clone()) for name, p in params.items()}
    min_bytes = 4096
    expected = sum(_storages(model, min_bytes).values())
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight

    assert host_memory.move_weights(model, min_bytes=min_bytes) == expected > 0
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params[name]  # the same objects: PEFT, optimizers and ties keep theirs
        ptr, value = old[name]
        assert torch.equal(p, value)
        if p.untyped_storage().nbytes() >= min_bytes:
            assert p.data_ptr() != ptr
            assert p.data_ptr() % host_memory.HUGE_PAGE == 0  # each storage starts on a huge page
        else:
            assert p.data_ptr() == ptr
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_views_of_one_storage_stay_views_of_one_copy():
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(64, 48, generator=g)
    module = torch.nn.Module()
    module.gate = torch.nn.Parameter(fused[:32], requires_grad=False)
    module.up = torch.nn.Parameter(fused[32:], requires_grad=False)
    module.register_buffer("table", fused.t())  # a strided view, not a slice
    module.child = torch.nn.Module()
    module.child.gate = module.gate  # tied: one parameter met twice
    want = fused.clone()

    assert host_memory.move_weights(module, min_bytes=1024) == fused.numel() * 4
    storage = module.gate.untyped_storage().data_ptr()
    assert module.up.untyped_storage().data_ptr() == storage == module.table.untyped_storage().data_ptr()
    assert module.up.data_ptr() - module.gate.data_ptr() == 32 * 48 * 4
    assert module.child.gate is module.gate
    assert torch.equal(module.gate, want[:32]) and torch.equal(module.up, want[32:])
    assert torch.equal(module.table, want.t()) and module.table.stride() == (1, 48)
    module.gate.data.fill_(1.0)  # one memory: a write through one view shows in the others
    assert torch.equal(module.table[:, :32], torch.ones(48, 32))


def test_the_loader_leaves_no_large_weight_in_the_checkpoints_file_mapping(demo_model_dir):
    model, _ = load_model(demo_model_dir, torch.device("cpu"))
    big = [t for t in list(model.parameters()) + list(model.buffers())
           if t.untyped_storage().nbytes() >= host_memory.MIN_MOVE_BYTES]
    assert big
    with open("/proc/self/maps") as f:
        file_maps = [line.split()[0].split("-") for line in f if "model.safetensors" in line]
    for t in big:
        assert t.data_ptr() % host_memory.HUGE_PAGE == 0
        assert not any(int(a, 16) <= t.data_ptr() < int(b, 16) for a, b in file_maps)

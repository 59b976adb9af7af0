"""The grouped configuration and the flags that build it: every field has one name, every engine
flag lands in its field, and the defaults of `mace serve` are the configuration's."""

import argparse

import pytest

from engine.config import TRAINING_FIELDS, EngineConfig, MaceConfig, TrainingConfig
from server.cli import build_parser
from server.flags import add_engine_flags, engine_config, training_config


def test_flat_names_reach_their_groups_and_are_validated_there():
    config = EngineConfig.build("m", policy="mace", tau_mem=0.5, kv_cache_bytes=1 << 20, max_model_len=128)
    assert (config.model.path, config.model.max_model_len) == ("m", 128)
    assert config.cache.kv_cache_bytes == 1 << 20 and config.scheduler.policy == "mace"
    assert config.scheduler.mace.tau_mem == 0.5 and config.scheduler.mace.pack_top_k == MaceConfig().pack_top_k
    changed = config.replace(block_size=32, pack_top_k=2)
    assert changed.cache.block_size == 32 and changed.scheduler.mace.pack_top_k == 2
    assert changed.scheduler.mace.tau_mem == 0.5 and config.cache.block_size == 16  # a copy
    with pytest.raises(TypeError, match="no field 'blocksize'"):
        config.replace(blocksize=32)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        config.replace(block_size=24)
    with pytest.raises(ValueError, match="tau_mem must be in"):
        config.replace(tau_mem=0.0)


def test_slos_left_open_take_a_measured_profiles_or_the_defaults():
    sched = EngineConfig.build("m", slo_tbt_ms=50.0).scheduler
    assert (sched.slo_ttft_ms, sched.slo_tbt_ms) == (None, 50.0)
    assert (sched.with_slos((300.0, 25.0)).slo_ttft_ms, sched.with_slos((300.0, 25.0)).slo_tbt_ms) == (300.0, 50.0)
    assert (sched.with_slos().slo_ttft_ms, sched.with_slos().slo_tbt_ms) == (1000.0, 50.0)


def test_every_engine_flag_is_a_field_of_the_configuration():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser, device_default="cpu")
    dests = {a.dest for a in parser._actions} - {"help"}
    fields = EngineConfig.field_names() | TRAINING_FIELDS
    # --model is ModelConfig.path; --no-training turns training off; --threads is the process's
    assert dests - fields == {"model", "no_training", "threads"}


def test_threads_default_to_the_cores_less_one_on_cpu_only(monkeypatch):
    import os

    import torch

    from server.flags import apply_threads, default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        apply_threads(argparse.Namespace(threads=None, device="cuda"))
        assert torch.get_num_threads() == before  # torch's own
        apply_threads(argparse.Namespace(threads=None, device="cpu"))
        assert torch.get_num_threads() == 1
        apply_threads(argparse.Namespace(threads=2, device="cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_mace_serve_defaults_are_the_configurations():
    args = build_parser().parse_args(["serve", "--model", "m"])
    config = engine_config(args)
    defaults = EngineConfig.build("m")
    assert config.model == defaults.model and config.cache == defaults.cache
    # serve's own defaults: the mace policy, which profiles at start without a cost profile
    assert config.scheduler.policy == "mace" and config.scheduler.profile_on_start
    assert config.scheduler.mace == defaults.scheduler.mace
    assert training_config(args, "state") == TrainingConfig(state_dir="state")


def test_flags_land_in_their_fields():
    args = build_parser().parse_args([
        "serve", "--model", "m", "--no-prefix-cache", "--no-chunked-prefill", "--retrain-period", "5",
        "--policy", "periodic", "--kv-prune", "window", "--tau-mem", "0.7", "--learning-rate", "0.01",
        "--lora-target-modules", "q_proj,v_proj", "--grad-accum", "2", "--cost-profile", "p.json",
    ])
    config = engine_config(args)
    assert not config.cache.enable_prefix_caching and not config.scheduler.enable_chunked_prefill
    assert config.scheduler.retrain_period_s == 5.0 and config.scheduler.policy == "periodic"
    assert config.cache.kv_prune == "window" and config.scheduler.mace.tau_mem == 0.7
    assert config.scheduler.cost_profile == "p.json" and not config.scheduler.profile_on_start
    training = training_config(args, None)
    assert (training.lr, training.target_modules, training.grad_accum) == (0.01, ("q_proj", "v_proj"), 2)
    assert training_config(build_parser().parse_args(["serve", "--no-training"]), "s") is None

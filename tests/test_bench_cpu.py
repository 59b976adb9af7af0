"""`mace bench cpu`'s measurement against a real server, and its report's arithmetic."""

import argparse
import json
from pathlib import Path

import pytest

from bench import cpu
from bench.cpu import Peer, measure, report, throughput_workload


def test_the_workload_is_seeded_and_in_range():
    work = throughput_workload(16, 8192, seed=0)
    assert work == throughput_workload(16, 8192, seed=0) and work != throughput_workload(16, 8192, seed=1)
    assert all(32 <= len(p) <= 1024 and 16 <= n <= 256 and min(p) >= 4 and max(p) < 8192 for p, n in work)


async def test_measure_counts_every_token_a_real_server_streams(start_server, demo_model_dir):
    vocab = json.loads((Path(demo_model_dir) / "config.json").read_text())["vocab_size"]
    work = [([5 + i for i in range(40)], 8), ([9] * 70, 5), ([7] * 33, 1)]
    async with start_server() as (url, engine):
        before = engine.core.pool.num_free_blocks
        result = await measure(Peer("mace", url, {}), work, vocab, repeats=1, seed=0)
        assert engine.core.pool.num_free_blocks == before  # every request finished and freed its blocks
    assert result["throughput_tok_s"] == (8 + 5 + 1) / result["throughput_wall_s"]
    assert result["decode_ms_per_token"] > 0 and result["prefill_ms_per_token"] > 0


def test_the_report_gives_each_mace_setup_over_llama_per_round():
    rows = [{"system": "mace", "round": 0, "throughput_tok_s": 120.0, "decode_ms_per_token": 10.0, "prefill_ms_per_token": 1.0},
            {"system": "llama", "round": 0, "throughput_tok_s": 100.0, "decode_ms_per_token": 8.0, "prefill_ms_per_token": 0.5},
            {"system": "mace-512", "round": 0, "throughput_tok_s": 200.0, "decode_ms_per_token": 8.0, "prefill_ms_per_token": 0.5},
            {"system": "mace-512", "round": 1, "throughput_tok_s": 150.0, "decode_ms_per_token": 5.0, "prefill_ms_per_token": 2.0},
            {"system": "llama", "round": 1, "throughput_tok_s": 150.0, "decode_ms_per_token": 10.0, "prefill_ms_per_token": 1.0},
            {"system": "mace", "round": 1, "throughput_tok_s": 120.0, "decode_ms_per_token": 10.0, "prefill_ms_per_token": 1.0}]
    args = argparse.Namespace(dtype="float32", threads=2, requests=16, rounds=2)
    lines = report(rows, args, "m").splitlines()
    assert lines[2] == "| figure | mace | mace-512 | llama | mace / llama | mace-512 / llama |"
    # mace: throughput 120/100 and 120/150; decode 10/8 and 10/10; prefill 1/0.5 and 1/1
    # mace-512: throughput 200/100 and 150/150; decode 8/8 and 5/10; prefill 0.5/0.5 and 2/1
    assert lines[4] == ("| 16-request throughput tok/s | 120.00 (120.00-120.00) | 175.00 (150.00-200.00) "
                        "| 125.00 (100.00-150.00) | 1.00 (0.80-1.20)x | 1.50 (1.00-2.00)x |")
    assert lines[5] == ("| batch-1 decode ms/token | 10.00 (10.00-10.00) | 6.50 (5.00-8.00) | 9.00 (8.00-10.00) "
                        "| 1.12 (1.00-1.25)x | 0.75 (0.50-1.00)x |")
    assert lines[6] == ("| 512-token prefill ms/token | 1.00 (1.00-1.00) | 1.25 (0.50-2.00) | 0.75 (0.50-1.00) "
                        "| 1.50 (1.00-2.00)x | 1.50 (1.00-2.00)x |")
    alone = report([r for r in rows if r["system"] == "mace"], args, "m").splitlines()
    assert alone[2] == "| figure | mace |" and alone[4].endswith("| 120.00 (120.00-120.00) |")


@pytest.mark.parametrize("usage, flags", [("-lm,   --load-mode MODE   model loading mode", ("--load-mode", "none")),
                                          ("--no-mmap   do not memory-map model", ("--no-mmap",)),
                                          ("-t, --threads N", ())])
def test_llama_server_reads_its_weights_into_memory_as_its_build_spells_it(tmp_path, usage, flags):
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\necho '{usage}'\n")
    binary.chmod(0o755)
    assert cpu.no_mmap_flags(binary) == flags

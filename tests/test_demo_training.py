"""The demo model's brief pre-training: loss falls, and the result reloads and serves."""

from engine.demo_model import build_demo_model
from engine.demo_training import train_demo_model
from engine.sampling_params import SamplingParams
from scheduler.builder import generate


def test_training_lowers_the_loss_and_the_checkpoint_still_serves(tmp_path, make_engine):
    path = build_demo_model(tmp_path / "m", "tiny")
    losses = train_demo_model(path, steps=12, seq_len=32, batch_size=4, lr=5e-3)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.5
    core, runner = make_engine(model=str(path))
    out = generate(core, runner, [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0]) == 4

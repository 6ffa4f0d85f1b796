from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ladder_kernels.planning.memory import (
    PeakMemoryTracker,
    peak_memory_bytes,
    process_peak_rss_bytes,
    process_rss_bytes,
    reset_peak_memory,
)


def _mlp_training_step():
    """Build a small MLP, run one forward/backward/AdamW step; return what stays alive."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(32, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _expected_live_after_step() -> int:
    n_params = 64 * 256 + 256 + 256 * 64 + 64
    # weights + AdamW exp_avg and exp_avg_sq (fp32) + one 0-dim fp32 step counter per parameter tensor
    return 3 * n_params * 4 + 4 * 4


def test_counts_alloc_and_free_and_peak():
    with PeakMemoryTracker() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.bfloat16)
        assert mem.current_bytes == 4000 + 1000
        del a
        assert mem.current_bytes == 1000
        c = b.view(10, 50)  # a view shares the storage: not counted again
        assert mem.current_bytes == 1000
        del b, c
    assert mem.current_bytes == 0
    assert mem.peak_bytes == 5000
    mem.reset_peak()
    assert mem.peak_bytes == 0


def test_tensors_from_before_are_the_baseline():
    outside = torch.zeros(10_000)
    with PeakMemoryTracker() as mem:
        outside.add_(1.0)  # in-place on an outside tensor: no allocation
        v = outside[:100]  # view of an outside tensor: no allocation
        made = torch.tensor([1.0, 2.0, 3.0])  # built from data (lift_fresh): an allocation
        assert mem.current_bytes == 12
        assert mem.track(outside) == 40_000
        assert mem.track(outside, v) == 0  # one storage is counted once
    assert mem.current_bytes == 40_012 and mem.peak_bytes == 40_012
    del made


def test_track_modules_and_optimizers():
    model, opt = _mlp_training_step()
    mem = PeakMemoryTracker()
    assert mem.track(model, opt) == _expected_live_after_step()
    with pytest.raises(TypeError, match="PeakMemoryTracker.track.*str"):
        mem.track("weights")


def test_training_step_matches_torch_mem_tracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    reference = mem_tracker.MemTracker()
    with reference:
        kept = _mlp_training_step()
    ref_peak = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    del kept
    with PeakMemoryTracker() as mem:
        kept = _mlp_training_step()
    assert mem.peak_bytes == ref_peak
    assert mem.current_bytes == _expected_live_after_step()
    del kept


def test_fake_cpu_tensors_give_the_real_figures():
    with PeakMemoryTracker() as real:
        kept_real = _mlp_training_step()
    with FakeTensorMode():
        with PeakMemoryTracker() as fake:
            kept_fake = _mlp_training_step()
    assert real.peak_bytes > _expected_live_after_step()  # gradients and activations were alive at some point
    assert (fake.peak_bytes, fake.current_bytes) == (real.peak_bytes, real.current_bytes)
    del kept_real, kept_fake


def test_process_peak_rss_sees_a_large_allocation():
    before = process_rss_bytes()
    block = torch.ones(32 * 2**20)  # 128 MiB, written so that its pages are resident
    assert process_peak_rss_bytes() >= before + block.nbytes * 0.95
    assert process_rss_bytes() > 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_reset_peak_starts_from_live_memory_after_a_freed_heap():
    """Tensors freed into the middle of glibc's heap (below the mmap threshold, between live ones) keep RSS high; a
    reset peak must not count them, or every run after a large one in the same process reports the large one's."""
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # a freed 16 MiB mmap raises glibc's mmap threshold
    blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(i) for i in range(100)]  # 400 MiB, on the heap
    del blocks[::2]  # 200 MiB freed between live blocks: free() cannot hand it back
    retained = process_rss_bytes()
    reset_peak_memory()
    assert peak_memory_bytes() < retained - 150 * 2**20
    assert sum(int(b[0]) for b in blocks) == sum(range(1, 100, 2))  # the live half is intact


def test_categories_split_the_peak():
    def vocab_sized(t):
        return "logits" if t.dim() and t.shape[-1] == 7 else None

    with PeakMemoryTracker(classify=vocab_sized, category="weights") as mem:
        w = torch.empty(100)
        mem.category = "forward"
        a = torch.empty(50)
        logits = torch.empty(3, 7)
        del a
        mem.category = "backward"
        g = torch.empty(25)
    assert mem.current_by_category == {"weights": 400, "forward": 0, "logits": 84, "backward": 100}
    assert mem.peak_by_category == {"weights": 400, "forward": 200, "logits": 84}
    assert sum(mem.peak_by_category.values()) == mem.peak_bytes == 684
    with pytest.raises(TypeError, match="classify must be a callable"):
        PeakMemoryTracker(classify="logits")
    del w, logits, g


def test_track_counts_bitsandbytes_quant_states():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 128), requires_grad=False, quant_type="nf4", compress_statistics=True
    ).to("cpu")
    state = layer.weight.quant_state
    expected = layer.weight.nbytes + state.absmax.nbytes + state.code.nbytes + state.offset.nbytes
    expected += state.state2.absmax.nbytes + state.state2.code.nbytes
    assert PeakMemoryTracker().track(layer) == expected

"""Device-aware pruning of the Triton downproj autotuners, on CPU for a given (capability, limit)."""

import pytest

pytest.importorskip("triton")

from ladder_kernels.kernels.triton import _common  # noqa: E402
from ladder_kernels.kernels.triton import downproj as td  # noqa: E402


@pytest.mark.parametrize("capability", [80, 86, 89, 90])
@pytest.mark.parametrize("dot_fp32", [False, True])
def test_pruning_is_device_aware(capability, dot_fp32):
    facts = _common.facts_for(capability)
    for configs, keys in ((td.FWD_CONFIGS, td.FWD_TILE_KEYS), (td.BWD_CONFIGS, td.BWD_TILE_KEYS)):
        kept = td.prune_configs(configs, facts, dot_fp32)
        assert kept and all(any(c is x for x in configs) for c in kept)
        limit = facts.shared_memory_per_block
        assert all(not _common.config_problems(c, keys, 4 if dot_fp32 else 2, limit) for c in kept)
        spilling_here = [c for c in kept if any(c is x for x in td.PRE_HOPPER_EXCLUDED)]
        assert (spilling_here == []) == (capability < 90 or configs is td.BWD_CONFIGS)
    tiny = _common.DeviceFacts(capability, 1024, 4)
    assert len(td.prune_configs(td.FWD_CONFIGS, tiny, dot_fp32)) == 1  # nothing fits: the smallest, still one


@pytest.mark.parametrize("capability", [80, 86, 90])
@pytest.mark.parametrize("dot_fp32", [False, True])
def test_default_config_fits_the_card(capability, dot_fp32):
    facts = _common.facts_for(capability)
    for defaults in (td.DEFAULT_FWD_CONFIGS, td.DEFAULT_BWD_CONFIGS):
        c = td.default_config(defaults, facts, dot_fp32)
        assert not _common.config_problems(c, tuple(c.kwargs), 4 if dot_fp32 else 2, facts.shared_memory_per_block)
    assert td.default_config(td.DEFAULT_FWD_CONFIGS, facts, False) is td.FWD_CONFIGS[3]  # 16-bit: the usual tile

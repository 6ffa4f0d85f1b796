"""The Triton cross-entropy rows kernel (ladder_kernels.kernels.triton.cross_entropy) where the op's tests do
not reach it: a label outside [0, V), which the op checks eagerly only off a GPU (the check syncs)."""

import types

import pytest
import torch

pytest.importorskip("triton")

from ladder_kernels.kernels.triton import cross_entropy as tce  # noqa: E402
from ladder_kernels.ops.cross_entropy import labels_checked_eagerly  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402


@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_out_of_range_label_gives_nan_not_a_stray_read(softcap):
    logits = torch.randn(4, 50, device=DEVICE)
    labels = torch.tensor([3, 50, -100, -7], device=DEVICE)  # in range, past V, ignored, negative
    ref = torch.nn.functional.cross_entropy(logits[:1].double(), labels[:1], reduction="none")
    loss = tce.ce_rows_(logits.clone(), labels, -100, softcap, compute_grad=True)
    assert loss[1].isnan() and loss[3].isnan() and loss[2] == 0
    if softcap == 0.0:
        assert torch.allclose(loss[:1].double(), ref, rtol=1e-5)
    assert not loss[0].isnan()


def test_labels_checked_eagerly_only_off_gpu_or_when_debugging(monkeypatch):
    monkeypatch.delenv("LADDER_KERNELS_DEBUG", raising=False)
    cuda_labels = types.SimpleNamespace(device=torch.device("cuda"))
    assert labels_checked_eagerly(torch.zeros(3, dtype=torch.long))
    assert not labels_checked_eagerly(cuda_labels)
    monkeypatch.setenv("LADDER_KERNELS_DEBUG", "1")
    assert labels_checked_eagerly(cuda_labels)

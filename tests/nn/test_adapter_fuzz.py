"""Malformed adapter folders given to LadderModel.from_pretrained, fuzzed with hypothesis.

Each corruption of a valid `save_pretrained` folder must raise a clear error (its type and a message naming
the file or the config field), never load silently; a pickle in the folder is never unpickled.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import CONFIG_NAME, WEIGHTS_NAME, LadderModel
from tests.helpers import tiny_backbone

CONFIG = dict(backbone_quant="none", side_init="random", reduction_factor=8)
TRIED: collections.Counter = collections.Counter()
MARKER_DIR = tempfile.mkdtemp(prefix="adapter-fuzz-marker-")
MARKER = os.path.join(MARKER_DIR, "pwned")


class _Malicious:
    """Unpickling this creates MARKER: the proof that a loader executed code from the folder."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The base backbone, a valid adapter folder for it, and adapters saved from other backbones."""
    root = tmp_path_factory.mktemp("adapters")
    backbone = tiny_backbone("llama", num_layers=2)
    LadderModel(copy.deepcopy(backbone), LadderConfig(**CONFIG)).save_pretrained(root / "good")
    others = {}
    for name, kwargs in {
        "wider": dict(num_layers=2, hidden_size=96, num_heads=4),
        "deeper": dict(num_layers=3),
    }.items():
        LadderModel(tiny_backbone("llama", **kwargs), LadderConfig(**CONFIG)).save_pretrained(root / name)
        others[name] = root / name
    yield backbone, root / "good", others
    print(
        f"\nadapter fuzz: {sum(TRIED.values())} malformed folders tried, all rejected with a clear error: {dict(TRIED)}"
    )
    assert not os.path.exists(MARKER)


def test_valid_adapter_loads(adapters):
    backbone, good, _ = adapters
    model = LadderModel.from_pretrained(copy.deepcopy(backbone), good)
    saved = load_file(str(good / WEIGHTS_NAME))
    assert all(torch.equal(v, saved[k]) for k, v in model.side.state_dict().items())


# --- the corruptions: each edits `folder` and returns (expected exception types, a substring of the message) ----
def _wrong_config_values():
    """(field, a value of the wrong type or outside its domain)."""
    not_int = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),  # JSON 3.0 is a float: rejected too
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.booleans(),
    )
    not_number = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans(), st.none())
    not_choice = st.one_of(
        st.integers(),
        st.text(max_size=8).filter(
            lambda s: (
                s
                not in {
                    "scalar",
                    "vector",
                    "none",
                    "pruned",
                    "random",
                    "side_only",
                    "bf16",
                    "int8",
                    "nf4",
                    "auto",
                    "float32",
                    "bfloat16",
                    "float16",
                    "triton",
                    "cpu",
                    "torch",
                }
            )
        ),
        st.lists(st.text(max_size=3), max_size=2),
    )
    fields = {
        "reduction_factor": st.one_of(not_int, st.none(), st.integers(max_value=0)),
        "xladder_depth": st.one_of(not_int, st.none(), st.integers(max_value=-1)),
        "loss_chunk_size": st.one_of(not_int, st.integers(max_value=0)),
        "side_num_heads": st.one_of(not_int, st.integers(max_value=0)),
        "side_intermediate_size": st.one_of(not_int, st.integers(max_value=0)),
        "ladder_layers": st.one_of(
            st.text(min_size=1, max_size=4),
            st.integers(),
            st.just([]),
            st.lists(st.text(max_size=2), min_size=1, max_size=2),
            st.just([1, 0]),
        ),
        "gate": not_choice,
        "side_init": not_choice,
        "output_mix": not_choice,
        "ladder_storage": not_choice,
        "backbone_quant": not_choice,
        "compute_dtype": not_choice,
        "side_checkpointing": st.one_of(st.integers(), st.text(max_size=3), st.none()),
        "gate_temperature": st.one_of(not_number, st.floats(max_value=0.0, allow_nan=False)),
        "init_std": st.one_of(not_number, st.floats(max_value=0.0, allow_nan=False)),
        "dropout": st.one_of(
            not_number, st.floats(min_value=1.0, allow_nan=False), st.floats(max_value=-1e-6, allow_nan=False)
        ),
        "gate_init": not_number,
    }
    return st.sampled_from(sorted(fields)).flatmap(lambda name: st.tuples(st.just(name), fields[name]))


def _edit_config(folder: Path, edit) -> None:
    path = folder / CONFIG_NAME
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    edit(state)
    path.write_bytes(save(state, metadata=metadata))


@st.composite
def corruptions(draw):
    kind = draw(
        st.sampled_from(
            [
                "missing_config",
                "config_not_json",
                "config_not_a_dict",
                "unknown_config_key",
                "wrong_config_value",
                "config_for_other_side",
                "missing_weights",
                "truncated_weights",
                "garbage_weights",
                "wrong_shape",
                "missing_tensor",
                "extra_tensor",
                "other_backbone",
                "other_backbone_no_metadata",
                "pickle_as_weights",
                "pickle_instead_of_weights",
            ]
        )
    )
    config_file, weights_file = CONFIG_NAME, WEIGHTS_NAME
    if kind == "missing_config":
        return kind, lambda d, o: (d / CONFIG_NAME).unlink(), (FileNotFoundError,), config_file
    if kind == "config_not_json":
        text_cut = draw(st.integers(min_value=1, max_value=400))  # keeps the opening "{" ...
        junk = draw(st.binary(max_size=16).filter(lambda b: b"}" not in b))  # ... and never closes it

        def edit(d, o):
            text = (d / CONFIG_NAME).read_bytes().rstrip()
            (d / CONFIG_NAME).write_bytes(text[: min(text_cut, len(text) - 1)] + junk)

        return kind, edit, (ValueError,), config_file
    if kind == "config_not_a_dict":
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none()))
        return kind, lambda d, o: (d / CONFIG_NAME).write_text(json.dumps(value)), (TypeError,), "expected a dict"
    if kind == "unknown_config_key":
        known = {f.name for f in dataclasses.fields(LadderConfig)}
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in known))
        value = draw(st.one_of(st.integers(), st.text(max_size=4), st.none()))
        return kind, lambda d, o: _edit_config(d, lambda c: c.__setitem__(key, value)), (ValueError,), repr(key)
    if kind == "wrong_config_value":
        name, value = draw(_wrong_config_values())
        return kind, lambda d, o: _edit_config(d, lambda c: c.__setitem__(name, value)), (TypeError, ValueError), name
    if kind == "config_for_other_side":  # valid values, but not the ones these weights were trained with
        change = draw(
            st.sampled_from(
                [
                    dict(reduction_factor=4),
                    dict(reduction_factor=16),
                    dict(xladder_depth=1),
                    dict(ladder_layers=[1]),
                    dict(gate="vector"),
                    dict(output_mix="side_only"),
                    dict(side_num_heads=2),
                    dict(side_intermediate_size=5),
                ]
            )
        )
        return kind, lambda d, o: _edit_config(d, lambda c: c.update(change)), (ValueError,), weights_file
    if kind == "missing_weights":
        return kind, lambda d, o: (d / WEIGHTS_NAME).unlink(), (FileNotFoundError,), weights_file
    if kind == "truncated_weights":
        fraction = draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))

        def edit(d, o):
            data = (d / WEIGHTS_NAME).read_bytes()
            (d / WEIGHTS_NAME).write_bytes(data[: int(fraction * len(data))])

        return kind, edit, (ValueError,), weights_file
    if kind == "garbage_weights":
        junk = draw(st.binary(max_size=64))
        return kind, lambda d, o: (d / WEIGHTS_NAME).write_bytes(junk), (ValueError,), weights_file
    if kind in ("wrong_shape", "missing_tensor", "extra_tensor"):
        index = draw(st.integers(min_value=0, max_value=10_000))
        extra_name = draw(
            st.sampled_from(["side.extra", "blocks.9.attn.q_proj.weight", "lora_A", "ladders.7", "ladders.0.bias"])
        )
        delta = draw(st.sampled_from([(1, 0), (0, 1), (-1, 0), (0, -1), "flat", "unsqueeze"]))

        def edit(d, o):
            def change(state):
                key = sorted(state)[index % len(state)]
                if kind == "missing_tensor":
                    del state[key]
                elif kind == "extra_tensor":
                    state[extra_name] = torch.zeros(3)
                else:
                    t = state[key]
                    if t.dim() == 0:  # not [1]: torch loads a [1] tensor into a 0-dim parameter (0.3 compatibility)
                        state[key] = torch.zeros(2) if delta != "unsqueeze" else torch.zeros(1, 1)
                    elif delta == "flat" or (t.dim() == 1 and delta != "unsqueeze"):
                        state[key] = torch.zeros(t.numel() + 1) if t.dim() == 1 else t.reshape(-1).clone()
                    elif delta == "unsqueeze":
                        state[key] = t.unsqueeze(0).clone()
                    else:
                        state[key] = torch.zeros(
                            max(1, t.shape[0] + delta[0]), max(1, t.shape[1] + delta[1]), *t.shape[2:]
                        )
                        if state[key].shape == t.shape:
                            state[key] = torch.zeros(t.shape[0] + 1, *t.shape[1:])

            _edit_tensors(d, change)

        return kind, edit, (ValueError,), weights_file
    if kind in ("other_backbone", "other_backbone_no_metadata"):
        which = draw(st.sampled_from(["wider", "deeper"]))

        def edit(d, o):
            shutil.rmtree(d)
            shutil.copytree(o[which], d)
            if kind == "other_backbone_no_metadata":
                state = load_file(str(d / WEIGHTS_NAME))
                (d / WEIGHTS_NAME).write_bytes(save(state))  # no signature: only shapes/keys can tell

        return kind, edit, (ValueError,), weights_file
    # A pickle with a malicious __reduce__, in place of or beside the safetensors file.
    payload = pickle.dumps({"side.norm.weight": _Malicious()})
    if kind == "pickle_as_weights":
        return kind, lambda d, o: (d / WEIGHTS_NAME).write_bytes(payload), (ValueError,), weights_file

    def edit(d, o):
        (d / WEIGHTS_NAME).unlink()
        for name in ("pytorch_model.bin", "adapter_model.bin", "ladder_model.bin", "ladder_model.pt"):
            (d / name).write_bytes(payload)

    return kind, edit, (FileNotFoundError,), weights_file


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=corruptions())
def test_malformed_adapter_is_rejected(adapters, case):
    backbone, good, others = adapters
    kind, edit, errors, named = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(good, folder)
        edit(folder, others)
        with pytest.raises(errors) as info:
            LadderModel.from_pretrained(copy.deepcopy(backbone), folder)
    assert named in str(info.value), (kind, str(info.value))
    assert not os.path.exists(MARKER), f"{kind}: a pickle from the adapter folder was executed"
    TRIED[kind] += 1


def test_pickle_beside_valid_adapter_is_never_loaded(adapters):
    """A valid adapter plus pickles: it loads from the safetensors, and no pickle runs."""
    backbone, good, _ = adapters
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(good, folder)
        payload = pickle.dumps(_Malicious())
        for name in ("pytorch_model.bin", "adapter_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
            (folder / name).write_bytes(payload)
        model = LadderModel.from_pretrained(copy.deepcopy(backbone), folder)
    saved = load_file(str(good / WEIGHTS_NAME))
    assert all(torch.equal(v, saved[k]) for k, v in model.side.state_dict().items())
    assert not os.path.exists(MARKER)
    # The payload is live: unpickling it here does create the marker (so its absence above means something).
    pickle.loads(payload)
    assert os.path.exists(MARKER)
    os.unlink(MARKER)

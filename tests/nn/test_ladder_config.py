"""LadderConfig: help strings, JSON round-trip, validation with clear errors, atomic writes."""

import dataclasses
import json
import os

import pytest

from ladder_kernels.nn.config import LadderConfig


def test_every_field_has_a_help_string():
    for f in dataclasses.fields(LadderConfig):
        assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 10, f.name
    assert set(LadderConfig.help()) == {f.name for f in dataclasses.fields(LadderConfig)}


def test_defaults_follow_the_method():
    c = LadderConfig()
    assert (c.reduction_factor, c.ladder_layers, c.xladder_depth) == (8, None, 0)
    assert (c.gate, c.gate_temperature, c.gate_init) == ("scalar", 0.1, 0.0)
    assert (c.ladder_storage, c.backbone_quant, c.output_mix) == ("bf16", "nf4", "vector")


def test_json_round_trip_through_a_file(tmp_path):
    c = LadderConfig(
        reduction_factor=4,
        ladder_layers=[0, 3, 5],
        gate="vector",
        side_init="random",
        ladder_storage="int8",
        loss_chunk_size=256,
        side_num_heads=4,
        side_num_kv_heads=2,
        side_head_dim=6,
        dropout=0.1,
        compute_dtype="bfloat16",
        backend="torch",
        output_mix="scalar",
    )
    path = tmp_path / "ladder_config.json"
    c.to_json_file(path)
    assert json.loads(path.read_text())["ladder_layers"] == [0, 3, 5]
    back = LadderConfig.from_json_file(path)
    assert back == c
    assert LadderConfig.from_dict(c.to_dict()) == c
    assert os.listdir(tmp_path) == ["ladder_config.json"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ladder_config.json"
    LadderConfig(reduction_factor=4).to_json_file(path)
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        LadderConfig(reduction_factor=16).to_json_file(path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["ladder_config.json"]


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"unknown keys \['reduction'\]"):
        LadderConfig.from_dict({"reduction": 4})
    with pytest.raises(TypeError, match="expected a dict"):
        LadderConfig.from_dict([("reduction_factor", 4)])


def test_invalid_json_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LadderConfig.from_json_file(path)


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(reduction_factor=0), ValueError, "reduction_factor"),
        (dict(reduction_factor=2.0), TypeError, "reduction_factor"),
        (dict(reduction_factor=True), TypeError, "reduction_factor"),
        (dict(xladder_depth=-1), ValueError, "xladder_depth"),
        (dict(gate="sigmoid"), ValueError, "gate"),
        (dict(side_init="zeros"), ValueError, "side_init"),
        (dict(output_mix="add"), ValueError, "output_mix"),
        (dict(ladder_storage="fp8"), ValueError, "ladder_storage"),
        (dict(backbone_quant="int4"), ValueError, "backbone_quant"),
        (dict(compute_dtype="half"), ValueError, "compute_dtype"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(gate_temperature=0.0), ValueError, "gate_temperature"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(loss_chunk_size=0), ValueError, "loss_chunk_size"),
        (dict(side_head_dim=5), ValueError, "side_head_dim"),
        (dict(side_num_heads=4, side_num_kv_heads=3), ValueError, "side_num_kv_heads"),
        (dict(ladder_layers=[3, 1]), ValueError, "ladder_layers"),
        (dict(ladder_layers=[]), ValueError, "ladder_layers"),
        (dict(ladder_layers="0,1"), TypeError, "ladder_layers"),
        (dict(ladder_layers=[0, -1]), ValueError, "ladder_layers"),
        (dict(ladder_layers=[0, 1], xladder_depth=1), ValueError, "ladder_layers"),
    ],
)
def test_bad_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        LadderConfig(**kwargs)

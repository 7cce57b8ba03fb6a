"""Gate specifications (``--gate``) and JSON gate files."""

import json

import pytest
import torch

from dylora_moe.errors import ConfigError
from dylora_moe.model.gates import GateSpec, expert_gates, fixed_gates, parse_gate_spec, read_gates_file, uniform_gates
from tests.export.conftest import mixture


def test_specs_parse():
    assert parse_gate_spec("expert:2") == GateSpec("expert:2", "expert", 2)
    assert parse_gate_spec("uniform") == GateSpec("uniform", "uniform")
    assert parse_gate_spec("dataset:mbpp") == GateSpec("dataset:mbpp", "dataset", "mbpp")
    assert parse_gate_spec("dataset:all").value == "all"
    assert parse_gate_spec("gates.json").kind == "file"


@pytest.mark.parametrize("text, message", [
    ("expert:two", "the expert index 'two' is not an integer"),
    ("dataset:", "names no dataset"),
    ("mixture", "'mixture' is not a gate; accepted: expert:N"),
])
def test_bad_specs_say_what_is_accepted(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_gate_spec(text)
    assert "uniform, dataset:NAME" in str(err.value)


def test_fixed_gates():
    model = mixture("llama")  # 6 adapted layers, 3 experts
    assert expert_gates(model, 1).tolist() == [[0.0, 1.0, 0.0]] * 6
    with pytest.raises(ConfigError,
                       match=r"expert index 3 is out of range: the mixture has 3 experts \(expert:0 to expert:2\)"):
        fixed_gates(model, parse_gate_spec("expert:3"))
    torch.testing.assert_close(uniform_gates(model), torch.full((6, 3), 1 / 3))
    grown = model.add_expert()  # admission 0: the uniform gate leaves it out, as the router would
    assert uniform_gates(model)[:, grown].eq(0).all() and uniform_gates(model).shape == (6, 4)


def test_gates_files_in_every_form_and_an_exports_record_round_trips(tmp_path):
    model = mixture("llama")
    names = model.adapted_names
    per_layer = torch.softmax(torch.randn(6, 3), -1)
    forms = {"one.json": [0.5, 0.25, 0.25], "list.json": {"gates": per_layer.tolist()},
             "named.json": {n: row for n, row in zip(names, per_layer.tolist())}}
    for name, value in forms.items():
        (tmp_path / name).write_text(json.dumps(value))
    assert read_gates_file(model, tmp_path / "one.json").tolist() == [[0.5, 0.25, 0.25]] * 6
    assert read_gates_file(model, tmp_path / "list.json").equal(per_layer)
    assert read_gates_file(model, tmp_path / "named.json").equal(per_layer)
    model.export_gated(per_layer, tmp_path / "adapter")
    assert fixed_gates(model, parse_gate_spec(str(tmp_path / "adapter" / "dylora_gate.json"))).equal(per_layer)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a readable JSON gates file"),
    ("[[0.5, 0.5], [0.5, 0.5]]", r"has gates of the wrong shape for this mixture \(6 adapted layers x 3 experts\)"),
    ('{"gates": {"model.layers.0.mlp.gate_proj": [1, 0, 0]}}', "does not name this mixture's adapted layers"),
    ("[1, -1, 0]", "must be a finite number >= 0"),
    ('"uniform"', "wrong shape"),
])
def test_malformed_gates_files_are_refused(tmp_path, content, message):
    (tmp_path / "g.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_gates_file(mixture("llama"), tmp_path / "g.json")


def test_a_missing_gates_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such gates file"):
        fixed_gates(mixture("llama"), parse_gate_spec(str(tmp_path / "missing.json")))

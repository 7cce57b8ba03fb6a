"""``ArchitectureFingerprint``: every architecture field forbids a resume when it differs."""

from __future__ import annotations

import dataclasses

import pytest

from dylora_moe.checkpoint.fingerprint import ArchitectureFingerprint, FingerprintMismatch
from dylora_moe.model import DyLoRAConfig, DyLoRAMoE
from tests.model.helpers import tiny_llama

# Recorded for information or naming only: they never forbid a resume.
NOT_COMPARED = {"maturity", "base_model"}


def fingerprint(base=None, **config) -> ArchitectureFingerprint:
    # alpha is given: derived (2 x num_experts x r), it would change with r and num_experts as well
    config = {"num_experts": 3, "r": 4, "dropout": 0.0, "alpha": 32.0, **config}
    return ArchitectureFingerprint.of(DyLoRAMoE(base if base is not None else tiny_llama(), DyLoRAConfig(**config)))


def other_value(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, other_value(value[0]) if value else "extra"]
    if isinstance(value, dict):
        return {**value, "other": 1}
    if value is None:
        return "other"
    raise TypeError(f"no other value for {value!r}")


@pytest.fixture(scope="module")
def saved():
    return fingerprint()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ArchitectureFingerprint)])
def test_each_field_alone(saved, name):
    """Changing one field: a compared field is the only difference reported, with both values."""
    changed = dataclasses.replace(saved, **{name: other_value(getattr(saved, name))})
    diffs = saved.differences(changed)
    if name in NOT_COMPARED:
        assert diffs == []
    else:
        assert diffs == [(name, getattr(saved, name), getattr(changed, name))]


def test_identical_fingerprints_have_no_differences(saved):
    assert saved.differences(fingerprint()) == []
    assert saved.differences(ArchitectureFingerprint.from_dict(saved.to_dict())) == []


@pytest.mark.parametrize("option, field, value", [
    ("alpha", "alpha", 8.0),
    ("top_k", "top_k", 2),
    ("router_temperature", "router_temperature", 0.5),
    ("r", "r", 8),
    ("num_experts", "num_experts", 2),
])
def test_a_changed_mixture_option_is_named(saved, option, field, value):
    requested = fingerprint(**{option: value})
    assert [d[0] for d in saved.differences(requested)] == [field]


def test_other_adapted_modules_are_named(saved):
    requested = fingerprint(target_modules="q_proj,k_proj,v_proj")
    assert "target_modules" in [d[0] for d in saved.differences(requested)]


def test_a_base_with_another_config_but_the_same_shapes_is_refused(saved):
    """Same weight shapes, another config (RMSNorm epsilon, RoPE base): the tensors mean other things."""
    requested = fingerprint(tiny_llama(rms_norm_eps=1e-5, rope_theta=500000.0))
    assert requested.base_weight_shapes_sha == saved.base_weight_shapes_sha
    assert "base_config_sha" in [d[0] for d in saved.differences(requested)]


def test_a_base_with_other_shapes_is_refused(saved):
    requested = fingerprint(tiny_llama(intermediate_size=96))
    assert "base_weight_shapes_sha" in [d[0] for d in saved.differences(requested)]


def test_more_experts_only_with_grow_experts(saved):
    grown = fingerprint(num_experts=5)
    assert [d[0] for d in saved.differences(grown)] == ["num_experts"]
    assert saved.differences(grown, grow_experts=True) == []
    fewer = fingerprint(num_experts=2)
    assert [d[0] for d in saved.differences(fewer, grow_experts=True)] == ["num_experts"]


def test_maturity_is_informational(saved):
    model = DyLoRAMoE(tiny_llama(), DyLoRAConfig(num_experts=3, r=4, dropout=0.0, alpha=32.0))
    model.set_maturity()
    mature = ArchitectureFingerprint.of(model)
    assert mature.maturity == [True] * 3 and saved.maturity == [False] * 3
    assert saved.differences(mature) == []


def test_mismatch_table_names_every_field_with_both_values(saved):
    requested = fingerprint(alpha=8.0, top_k=2)
    error = FingerprintMismatch("ckpt", saved.differences(requested))
    rows = [line.split() for line in error.table.splitlines()]
    assert rows[0] == ["field", "checkpoint", "requested"]
    assert rows[1:] == [["alpha", "32.0", "8.0"], ["top_k", "1", "2"]]
    assert error.exit_code == 2 and "2 architecture field(s) differ" in str(error)


def test_a_changed_gate_floor_is_named_and_older_checkpoints_read_as_none(saved):
    assert [d[0] for d in saved.differences(fingerprint(gate_floor=0.5))] == ["gate_floor"]
    older = {k: v for k, v in saved.to_dict().items() if k != "gate_floor"}
    assert ArchitectureFingerprint.from_dict(older).differences(saved) == []


def test_a_changed_number_of_shared_experts_is_named_and_older_checkpoints_read_as_none(saved):
    diffs = saved.differences(fingerprint(shared_experts=1))
    assert [d[0] for d in diffs] == ["shared_experts"] and diffs[0][1:] == (0, 1)
    older = {k: v for k, v in saved.to_dict().items() if k != "shared_experts"}
    assert ArchitectureFingerprint.from_dict(older).differences(saved) == []

"""The pattern library: every rule checked against a direct implementation, the sparsity table, errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from sparsebert.model.masks import (
    available_patterns,
    build_mask,
    code_reference,
    parse_spec,
    register_pattern,
    sparsity,
)

# The paper's baseline table: sparsity at L=128 with the defaults (ours).
SPARSITY_AT_128 = {
    "dense": 0.0,
    "no_diagonal": 0.008,
    "strided": 0.718,
    "fixed": 0.727,
    "longformer": 0.886,
    "logsparse": 0.898,
    "bigbird": 0.93,
    "star": 0.961,
}


def _rule(name: str, i: int, j: int, **p) -> bool:
    """The patterns' rules (docs/model.md's table), written out one pair at a time."""
    d = abs(i - j)
    if name == "dense":
        return True
    if name == "no_diagonal":
        return i != j
    if name == "strided":
        return d < p["stride"] or (i - j) % p["stride"] == 0
    if name == "fixed":
        return i // p["block"] == j // p["block"] or j % p["block"] >= p["block"] - p["summary"]
    if name == "longformer":
        return d <= p["window"] or i < p["global_tokens"] or j < p["global_tokens"]
    if name == "logsparse":
        return d == 0 or (d & (d - 1)) == 0
    if name == "star":
        return d <= 1 or i == 0 or j == 0
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dense", {}),
        ("no_diagonal", {}),
        ("strided", {"stride": 16}),
        ("strided", {"stride": 5}),
        ("fixed", {"block": 32, "summary": 1}),
        ("fixed", {"block": 7, "summary": 3}),
        ("longformer", {"window": 6, "global_tokens": 1}),
        ("longformer", {"window": 2, "global_tokens": 3}),
        ("logsparse", {}),
        ("star", {}),
    ],
)
def test_pattern_matches_its_rule(name, params):
    seq_len, heads = 45, 3
    mask = build_mask({"name": name, **params}, seq_len, heads)
    expected = torch.tensor([[_rule(name, i, j, **params) for j in range(seq_len)] for i in range(seq_len)])
    assert mask.dtype == torch.bool and mask.shape == (heads, seq_len, seq_len)
    assert torch.equal(mask, expected.expand(heads, -1, -1))


def test_bigbird_rule_and_seeded_random_keys():
    seq_len, w, g, r = 50, 1, 2, 2
    mask = build_mask(
        {"name": "bigbird", "window": w, "global_tokens": g, "random_keys": r, "seed": 3}, seq_len, 2
    )
    base = torch.tensor(
        [[abs(i - j) <= w or i < g or j < g for j in range(seq_len)] for i in range(seq_len)]
    )  # the structured part
    extra = mask[0] & ~base
    assert torch.all(mask[0] | ~base)  # every structured position is kept
    assert torch.all(extra.sum(-1) <= r)  # at most r random keys per row on top
    assert extra.sum() > 0.5 * r * seq_len  # and they are really there
    again = build_mask({"name": "bigbird", "seed": 3}, seq_len, 2)
    assert torch.equal(mask, again)  # seeded: deterministic
    assert not torch.equal(mask, build_mask({"name": "bigbird", "seed": 4}, seq_len, 2))


@pytest.mark.parametrize(("name", "expected"), SPARSITY_AT_128.items())
def test_sparsity_table_at_128(name, expected):
    assert sparsity(build_mask(name, 128, 12)) == pytest.approx(expected, abs=0.003)


@pytest.mark.parametrize("name", ["strided", "fixed", "longformer", "logsparse", "bigbird", "star"])
def test_any_pattern_combines_with_no_diagonal(name):
    plain = build_mask(name, 32, 2)
    cut = build_mask({"name": name, "no_diagonal": True}, 32, 2)
    eye = torch.eye(32, dtype=torch.bool)
    assert not cut[:, eye].any()
    assert torch.equal(cut[:, ~eye], plain[:, ~eye])


def test_available_patterns_lists_builtins_and_learned():
    assert {
        "dense",
        "no_diagonal",
        "strided",
        "fixed",
        "longformer",
        "logsparse",
        "bigbird",
        "star",
        "dam_u",
        "dam_s",
    } <= set(available_patterns())


def test_user_pattern_registered_outside_the_package(tmp_path, monkeypatch):
    module = tmp_path / "my_user_masks.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch
            from sparsebert import register_pattern

            @register_pattern("even_keys")
            def even_keys(seq_len, num_heads, offset=0):
                j = torch.arange(seq_len)
                return ((j + offset) % 2 == 0).expand(seq_len, seq_len).clone()

            def per_head(seq_len, num_heads):
                return torch.stack([torch.eye(seq_len, dtype=torch.bool).roll(h, 1) for h in range(num_heads)])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # By dotted path: importing it also runs the decorator.
    per_head = build_mask("my_user_masks:per_head", 6, 3)
    assert per_head.shape == (3, 6, 6) and per_head[1, 0, 1] and not per_head[0, 0, 1]
    assert "even_keys" in available_patterns()
    mask = build_mask({"name": "even_keys", "offset": 1, "no_diagonal": True}, 6, 2)
    assert mask[0, 0].tolist() == [False, True, False, True, False, True]
    with pytest.raises(ValueError, match="'offst'"):
        build_mask({"name": "even_keys", "offst": 1}, 6, 2)
    sys.modules.pop("my_user_masks", None)


def test_code_reference_names_dotted_paths_without_importing_them():
    name = "not_imported_masks_xyz:fn"
    assert code_reference(name) == name
    assert code_reference({"name": name, "window": 3}) == name
    assert "not_imported_masks_xyz" not in sys.modules
    for spec in ("star", {"name": "longformer"}, "dam_s", parse_spec("bigbird"), ["star"], {"window": 3}):
        assert code_reference(spec) is None


def test_register_pattern_decorator_in_process():
    @register_pattern("test_first_key_only")
    def first_key_only(seq_len, num_heads):
        mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    assert sparsity(build_mask("test_first_key_only", 4, 1)) == pytest.approx(0.75)


def test_unknown_name_lists_known_patterns():
    with pytest.raises(ValueError, match=r"unknown attention pattern 'lonformer'.*longformer.*star"):
        build_mask("lonformer", 8, 1)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "longformer", "widow": 3}, "unknown parameter 'widow'.*global_tokens, no_diagonal, window"),
        ({"name": "strided", "stride": 0}, "'stride' must be >= 1"),
        ({"name": "strided", "stride": 2.5}, "'stride' must be an integer"),
        ({"name": "star", "no_diagonal": "yes"}, "'no_diagonal'"),
        ({"window": 3}, "no 'name'"),
        (["star"], "must be a name or a dict"),
        ({"name": "dam_s", "tau": 0}, "'tau' must be > 0"),
        ({"name": "dam_u", "lambda": "big"}, "'lambda' must be a number"),
        ({"name": "dam_u", "temperature": 1.0}, "unknown parameter 'temperature'"),
        ("nomodule_xyz:fn", "cannot load attention pattern"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec) if isinstance(spec, dict) and spec.get("name", "").startswith("dam") else build_mask(
            spec, 8, 1
        )


def test_user_pattern_with_wrong_output_is_rejected():
    @register_pattern("test_bad_shape")
    def bad_shape(seq_len, num_heads):
        return torch.ones(seq_len, seq_len + 1, dtype=torch.bool)

    @register_pattern("test_bad_dtype")
    def bad_dtype(seq_len, num_heads):
        return torch.ones(seq_len, seq_len)

    with pytest.raises(ValueError, match=r"'test_bad_shape' returned shape \(5, 6\)"):
        build_mask("test_bad_shape", 5, 2)
    with pytest.raises(ValueError, match="'test_bad_dtype' must return a bool tensor"):
        build_mask("test_bad_dtype", 5, 2)


def test_learned_patterns_need_alpha_and_dam_s_is_symmetric_toeplitz():
    with pytest.raises(ValueError, match="learned pattern"):
        build_mask("dam_s", 8, 2)
    alpha = torch.tensor([[1.0, -1.0, 2.0, -3.0, 0.5, 0.2, -0.1, 1.0], [-1.0] * 8])
    mask = build_mask({"name": "dam_s", "alpha": alpha}, 8, 2)
    distance = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs()
    assert torch.equal(mask, (alpha > 0)[:, distance])
    assert torch.equal(mask, mask.transpose(-1, -2))
    assert not mask[1].any()

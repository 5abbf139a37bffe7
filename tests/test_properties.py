"""Property-based tests (hypothesis) of the inputs users type: alpha values, adapter names, subfolders and repo ids.

The HH-RLHF dialogue parser's properties (arbitrary strings parse or count as malformed) are in tests/test_data.py.
"""

import math
import os

import numpy as np
import pytest
import torch
from huggingface_hub.utils import validate_repo_id
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import randomize_heads, reference_alignment

from iav_trl import AlignmentHeadConfig, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.utils.hub import check_adapter_name, check_subfolder, is_repo_id

BATCH = 4
FAST = settings(max_examples=60, deadline=None)
finite = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, allow_infinity=False)


@pytest.fixture(scope="module")
def setup():
    """A model with a random head, a batch, and the plain-PyTorch z_base and a_t of every row."""
    base = tiny_causal_lm("llama", vocab_size=400).eval()
    model = get_iav_model(base, AlignmentHeadConfig(num_interventions=3, intervention_dim=8))
    randomize_heads(model, std=0.3)
    input_ids = torch.randint(7, 400, (BATCH, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = base(input_ids, output_hidden_states=True)
        a_t = reference_alignment(model.alignment_heads["default"], out.hidden_states[-1], base.lm_head.weight)
    return model, input_ids, out.logits, a_t


def as_container(values: list[float], kind: str):
    return {
        "list": list(values),
        "tuple": tuple(values),
        "numpy": np.array(values, dtype=np.float64),
        "tensor": torch.tensor(values),
        "dict": {"default": list(values)},
    }[kind]


KINDS = st.sampled_from(["list", "tuple", "numpy", "tensor", "dict"])


@FAST
@given(st.integers(1, BATCH).flatmap(lambda n: st.lists(finite, min_size=n, max_size=n)), KINDS)
def test_any_finite_per_row_alpha_shifts_each_row_by_its_own_alpha_times_a_t(setup, alphas, kind):
    model, input_ids, z_base, a_t = setup
    rows = len(alphas)
    with torch.no_grad():
        logits = model(input_ids[:rows], alpha=as_container(alphas, kind)).logits
    expected = z_base[:rows] + torch.tensor(alphas).view(rows, 1, 1) * a_t[:rows]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@FAST
@given(st.lists(finite, min_size=0, max_size=8).filter(lambda values: len(values) != BATCH), KINDS)
def test_per_row_alpha_of_the_wrong_length_is_refused(setup, alphas, kind):
    model, input_ids, _, _ = setup
    with pytest.raises(ValueError, match=rf"has {len(alphas)} values but the batch has {BATCH} rows"):
        model(input_ids, alpha=as_container(alphas, kind))


@FAST
@given(
    st.lists(finite, min_size=BATCH, max_size=BATCH),
    st.integers(0, BATCH - 1),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    KINDS,
)
def test_non_finite_per_row_alpha_is_refused(setup, alphas, position, bad, kind):
    model, input_ids, _, _ = setup
    alphas[position] = bad
    with pytest.raises(ValueError, match="finite"):
        model(input_ids, alpha=as_container(alphas, kind))


anything = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.integers(-(10**30), 10**30)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=BATCH + 1) | st.dictionaries(st.text(max_size=8), inner, max_size=2),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(anything)
def test_any_alpha_object_works_or_raises_value_error(setup, alpha):
    model, input_ids, _, _ = setup
    try:
        logits = model(input_ids, alpha=alpha).logits
    except ValueError:
        return
    assert logits.shape == (BATCH, 9, 400)  # (a huge finite alpha may overflow the logits to inf: not an error)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab1_-./\\~: \0"), max_size=12) | st.text(max_size=12))
def test_adapter_names_are_refused_or_stay_one_level_inside_the_save_directory(name):
    root = os.path.realpath("/srv/adapters")
    try:
        check_adapter_name(name)
    except ValueError:
        return
    assert os.path.dirname(os.path.realpath(os.path.join(root, name))) == root


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab1_-./\\~: \0"), max_size=16) | st.text(max_size=12))
def test_subfolders_are_refused_or_stay_inside_the_adapter_directory(subfolder):
    root = os.path.realpath("/srv/adapter")
    try:
        check_subfolder(subfolder)
    except ValueError:
        return
    assert os.path.realpath(os.path.join(root, subfolder)).startswith(root + os.sep)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("aZ9_-./\\ ~:"), max_size=14) | st.text(max_size=14))
def test_strings_taken_as_repo_ids_are_never_paths_out_of_a_directory(name):
    if not is_repo_id(name):
        return
    parts = name.split("/")
    assert len(parts) <= 2 and "\\" not in name and not os.path.isabs(name)
    assert not any(part in ("", ".", "..") for part in parts)
    validate_repo_id(name)  # and the Hub accepts it


def test_repo_ids_are_recognised():
    assert is_repo_id("org/model-1.5") and is_repo_id("gpt2") and is_repo_id("a/b.c_d")
    for name in ("../x", "a/b/c", "a..b", "/abs", "", "9.", "a--b", "org/", "~/x"):
        assert not is_repo_id(name)

"""Sequence parallelism without launching: what is refused before any model loads, the batch plan and JSON it implies,
the gradient divisor, and the mask that keeps packed examples apart. Exactness is tested through the launcher in
tests/integration/test_sequence_parallel.py."""

import pytest
import torch
from transformers import AutoConfig

from dtrain.config import compose_job
from dtrain.config.batch import BatchPlan
from dtrain.config.checks import check_job
from dtrain.data.chat import TokenizedExample
from dtrain.data.dataset import PreparedData
from dtrain.ds_config import build_ds_config
from dtrain.engine import read_model_shape
from dtrain.errors import ConfigError
from dtrain.sequence_parallel import _sdpa_by_documents, check_model, document_causal_mask, gradient_divisor

from tests.architectures import FAMILIES, tiny_config
from tests.conftest import TINY_DIR


def job(*overrides: str):
    return compose_job(["+exp=tiny_cpu", "precision=fp32", *overrides])


# ------------------------------------------------------------------ errors before any model loads


def test_sequence_parallelism_is_off_by_default_and_needs_no_check():
    j = job()
    assert j.parallel.sp_size == 1
    check_job(j, cuda_available=False, world_size=3)


def test_a_world_size_the_groups_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.sp_size=2 with 3 ranks.*multiple of 2"):
        check_job(job("parallel.sp_size=2"), cuda_available=False, world_size=3)
    check_job(job("parallel.sp_size=2"), cuda_available=False, world_size=4)


def test_a_size_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.sp_size=0: must be >= 1"):
        check_job(job("parallel.sp_size=0"), cuda_available=False, world_size=2)


@pytest.mark.parametrize(
    "attention, why",
    [
        ("eager", "4-D mask"),
        ("flex_attention", "packed examples would attend to each other"),
        ("paged|sdpa", "does not check it"),
    ],
)
def test_attention_ulysses_cannot_wrap_exactly_is_refused_with_the_reason(attention, why):
    with pytest.raises(ConfigError, match=rf"attention '{attention}' \(model.attn_implementation\).*{why}.*sdpa"):
        check_job(job("parallel.sp_size=2", f"model.attn_implementation={attention}"), cuda_available=False, world_size=2)


@pytest.mark.parametrize("attention", ["auto", "sdpa", "flash_attention_2"])
def test_attention_ulysses_wraps_is_accepted(attention):
    check_job(job("parallel.sp_size=2", f"model.attn_implementation={attention}"), cuda_available=False, world_size=2)


def _config(heads: int, kv_heads: int):
    config = AutoConfig.from_pretrained(TINY_DIR)
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
    return config


@pytest.mark.parametrize("heads, kv_heads, sp_size", [(4, 4, 2), (4, 4, 4), (8, 2, 4), (8, 2, 8), (8, 1, 8), (12, 4, 2)])
def test_heads_that_split_or_repeat_over_the_group_are_accepted(heads, kv_heads, sp_size):
    check_model(_config(heads, kv_heads), sp_size, "sdpa")


def test_attention_heads_that_do_not_split_are_refused():
    with pytest.raises(ConfigError, match=r"4 attention heads, which do not split evenly over 3 ranks"):
        check_model(_config(4, 4), 3, "sdpa")


def test_key_value_heads_that_neither_split_nor_repeat_are_refused():
    # 12 query heads split over 3 ranks, but 4 key/value heads neither split over 3 nor does 3 repeat them evenly.
    with pytest.raises(ConfigError, match=r"4 key/value heads.*divisor of 4 or a multiple of it"):
        check_model(_config(12, 4), 3, "sdpa")


def test_the_kernel_chosen_for_the_model_is_checked_too():
    """``auto`` passes the config check; a model class that falls back to eager is refused once its config is read."""
    with pytest.raises(ConfigError, match=r"attention 'eager' \(chosen for this model\)"):
        check_model(_config(4, 4), 2, "eager")


def test_reading_the_model_config_refuses_heads_before_any_weight_loads():
    j = job(f"model.path={TINY_DIR}", "parallel.sp_size=8")  # the tiny model has 4 heads
    data = PreparedData(train=[TokenizedExample("x", [1, 2, 3], [-100, 2, 3])], eval=[], prompts=[])
    with pytest.raises(ConfigError, match="4 attention heads"):
        read_model_shape(j, data)
    assert read_model_shape(job(f"model.path={TINY_DIR}", "parallel.sp_size=2"), data).num_parameters > 0


# ------------------------------------------------------------------ batch plan, JSON, gradient scale


def test_the_batch_plan_counts_data_parallel_ranks_and_places_each_rank():
    plan = BatchPlan.from_config(job("train.micro_batch_size=3", "train.grad_accum_steps=2").train, world_size=8, sp_size=4)
    assert (plan.data_parallel_size, plan.sp_size, plan.global_batch_size) == (2, 4, 3 * 2 * 2)
    # Consecutive ranks form a group (DeepSpeed's parallel_state_sp): ranks 0-3 train data-parallel rank 0's examples.
    assert [plan.place(r) for r in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        BatchPlan.from_config(job().train, world_size=6, sp_size=4)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_the_json_says_sequence_parallel_size_and_the_data_parallel_batch(zero):
    j = job(f"zero={zero}", "parallel.sp_size=2", "train.micro_batch_size=2", "train.grad_accum_steps=3")
    ds = build_ds_config(j, BatchPlan.from_config(j.train, world_size=4, sp_size=2))
    assert ds["sequence_parallel_size"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 2 * 3 * 2)
    # ZeRO-3: the reduce-scatter path whose averaging gradient_divisor corrects, pinned for every bucket.
    assert ds["zero_optimization"]["reduce_scatter"] is True
    plain = build_ds_config(job(f"zero={zero}"), BatchPlan.from_config(job().train, world_size=4))
    assert "sequence_parallel_size" not in plain
    assert zero == "zero2" or "reduce_scatter" not in plain["zero_optimization"]  # the ZeRO-3 template leaves it


def test_the_gradient_divisor_is_the_data_parallel_size_except_for_zero3_reduce_scatter():
    assert [gradient_divisor(stage, 4, 1) for stage in (1, 2, 3)] == [4, 4, 4]
    assert [gradient_divisor(stage, 4, 2) for stage in (1, 2)] == [2, 2]
    assert gradient_divisor(3, 4, 2) == 4  # DeepSpeed 0.19.8's reduce_scatter_coalesced averages over every rank


# ------------------------------------------------------------------ packed rows under Ulysses' sdpa


def test_rows_of_one_run_of_positions_need_no_mask():
    assert document_causal_mask(torch.arange(10).expand(3, 10)) is None
    assert document_causal_mask(torch.arange(5, 15).expand(1, 10)) is None  # a piece of a longer row


def test_packed_rows_get_a_block_diagonal_causal_mask_per_row():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = document_causal_mask(positions)
    assert mask.shape == (2, 1, 6, 6)  # broadcast over the heads
    document = [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(mask[b, 0, i, j]) == (j <= i and document[b][i] == document[b][j]), (b, i, j)


def test_a_sliding_window_keeps_the_last_keys_of_the_same_example():
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    mask = document_causal_mask(positions, sliding_window=3)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]  # keys 2..4: itself and the 2 before
    assert mask[6].tolist() == [False] * 5 + [True, True]
    assert document_causal_mask(torch.arange(6).expand(1, 6), sliding_window=6) is None  # wider than the row


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])  # gemma2 has no sdpa: refused above
def test_ulysses_sdpa_without_the_model_mask_gives_the_model_s_own_logits_on_packed_rows(family):
    """What DeepSpeed's wrapper hands the kernel after the all-to-all (the whole sequence, no mask, the gathered
    positions) gives the logits of the model's own masked sdpa: packed examples apart, sliding windows (8) kept."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 250, (2, 30))
    positions = torch.stack([torch.cat([torch.arange(12), torch.arange(13), torch.arange(5)]), torch.arange(30)])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
        core = _sdpa_by_documents(plain)
        ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda module, q, k, v, mask, *args, **kwargs: core(module, q, k, v, None, *args, **kwargs)
        try:
            got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        finally:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = plain
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""Packed attention: the boundaries computed once, every kernel choice equal to the per-example
path, no mask built for packed rows, unavailable choices refused in one line.

The varlen and flash kernels run on CUDA only; here they are replaced by a CPU reference with
the same signature, so what is tested is everything of ours around them (layouts, cumulative
lengths, causality, GQA, scale) against the loop path.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, run_env
from trainer import attention
from trainer.batching import collate, collate_packed, pack_bfd
from trainer.config import ASSETS_DIR
from trainer.loss import install, summed_loss
from trainer.model import load_tokenizer
from trainer.records import load_records
from trainer.tokenized import tokenize_records


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    return tokenize_records(load_records(ASSETS_DIR / "q_sft_train.jsonl"), tok, 512), tok


@pytest.fixture
def impl():
    """Restores the process-wide kernel choice after a test changes it."""
    before = attention._impl
    yield
    attention._impl = before


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, causal=True, gqa=False):
    """What flash varlen computes, on CPU: causal attention inside each [cu[i], cu[i+1]).

    It also checks what the CUDA kernels require of their inputs: [T, H, D] with a contiguous
    last dimension, int32 cumulative lengths on the inputs' device, a host int max length.
    """
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and causal
    assert cu_q.device == q.device and isinstance(max_q, int)
    assert q.dim() == k.dim() == v.dim() == 3 and all(x.stride(-1) == 1 for x in (q, k, v))
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None],
            k[s:e].transpose(0, 1)[None],
            v[s:e].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out


def varlen_213(
    q,
    k,
    v,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch 2.13's signature: causal is window_size (-1, 0)."""
    return _reference_varlen(
        q,
        k,
        v,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        causal=tuple(window_size) == (-1, 0),
        gqa=enable_gqa,
    )


def varlen_210(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None
):
    """The first public signature: is_causal; no scale (1/sqrt(head_dim)) and no GQA (key/value
    must have the query's heads)."""
    assert query.shape[1] == key.shape[1]
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def flash_attn_varlen_func(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    assert dropout_p == 0.0
    return _reference_varlen(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale=softmax_scale,
        causal=causal,
        gqa=q.shape[1] != k.shape[1],
    )


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS_DIR / "tiny_model")
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attention.register("loop")
    )
    assert config.num_attention_heads != config.num_key_value_heads  # GQA, as Qwen2.5
    return install(model)


def _packed_batch(data, rows=3):
    ts, tok = data
    bins = pack_bfd([len(x) for x in ts.input_ids], list(range(30)), capacity=512)
    return collate_packed(bins[:rows], ts, tok.pad_token_id)


def test_boundaries_are_the_per_example_spans_end_to_end(data):
    mb = _packed_batch(data)
    packed = attention.Packed.from_position_ids(mb["position_ids"])
    width = mb["position_ids"].shape[1]
    flat = [(r * width + s, r * width + e) for r, spans in enumerate(packed.rows) for s, e in spans]
    assert packed.rows == attention.packed_segments(mb["position_ids"])
    assert packed.cu_seqlens.tolist() == [s for s, _ in flat] + [flat[-1][1]]
    assert packed.max_len == max(e - s for s, e in flat)
    assert packed.cu_seqlens.dtype == torch.int32


@pytest.mark.parametrize("kernel", ["varlen-2.13", "varlen-2.10", "flash"])
def test_varlen_kernels_equal_the_loop(data, kernel, monkeypatch, impl):
    if kernel == "flash":
        monkeypatch.setitem(
            sys.modules,
            "flash_attn",
            types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func),
        )
    else:
        fake = varlen_213 if kernel == "varlen-2.13" else varlen_210
        monkeypatch.setattr(attention, "_varlen_fn", lambda: fake)
    mb = _packed_batch(data)
    losses, grads = {}, {}
    calls = []
    original = attention._varlen
    monkeypatch.setattr(attention, "_varlen", lambda *a: calls.append(a[-1]) or original(*a))
    for name in ("loop", kernel.split("-")[0]):
        model = _model()  # registers the loop kernel
        attention._impl = name
        loss = summed_loss(model, mb, "cpu")
        loss.backward()
        losses[name], grads[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert calls and set(calls) == {kernel.split("-")[0]}  # 4 layers forward
    ref, got = losses.pop("loop"), losses.popitem()[1]
    assert abs(float(got - ref)) <= 1e-5 * float(ref)
    ref_g, got_g = grads.pop("loop"), grads.popitem()[1]
    for n in ref_g:
        assert float((got_g[n] - ref_g[n]).norm() / ref_g[n].norm()) < 1e-5, n


def test_no_mask_is_built_for_packed_rows_but_one_is_for_padding(data):
    from transformers.masking_utils import create_causal_mask

    ts, tok = data
    config = _model().config
    assert config._attn_implementation == attention.NAME
    mb = _packed_batch(data, rows=2)
    embeds = torch.zeros(*mb["input_ids"].shape, config.hidden_size)
    packed = create_causal_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=None,
        cache=None,
        position_ids=mb["position_ids"],
    )
    assert packed is None  # transformers' sdpa would build [2, 1, 512, 512] here
    padded = collate(ts.input_ids[:2], ts.labels[:2], tok.pad_token_id)
    embeds = torch.zeros(*padded["input_ids"].shape, config.hidden_size)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=padded["attention_mask"],
        cache=None,
        position_ids=None,
    )
    assert mask is not None and mask.shape[-1] == padded["input_ids"].shape[1]


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only rank says")


@CPU_ONLY
def test_choices_on_a_cpu():
    assert attention.resolve("auto") == "loop"
    assert attention.register("masked") == "sdpa"  # transformers' own, with the block mask
    for choice in ("varlen", "flash"):
        assert "runs on CUDA GPUs only" in attention.available(choice)


@CPU_ONLY
def test_train_refuses_an_unavailable_kernel_in_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--model_size",
            "tiny",
            "--output_dir",
            str(tmp_path / "o"),
            "--attention",
            "varlen",
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("qsft: error:")]
    assert errors == [
        "qsft: error: --attention varlen: runs on CUDA GPUs only, and this rank has none"
    ], res.stderr[-2000:]

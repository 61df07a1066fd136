"""The chunked linear cross-entropy equals the old full-logits loss, in value and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer import attention
from trainer.batching import Sampler, collate
from trainer.config import ASSETS_DIR
from trainer.loss import LinearWithLoss, install, summed_loss
from trainer.model import load_tokenizer
from trainer.records import load_records
from trainer.tokenized import tokenize_records


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    return tokenize_records(load_records(ASSETS_DIR / "q_sft_train.jsonl"), tok, 512), tok


def _model(tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS_DIR / "tiny_model")
    config.use_cache = False
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attention.register("loop")
    )


def _old_loss(model, mb):
    """The loss before chunking (trainer.loop.summed_loss up to 2026-12): logits for every
    target position at once through the model's own head, then fp32 cross-entropy."""
    extra = {}
    if "attention_mask" not in mb:
        mb = {k: v.reshape(1, -1) for k, v in mb.items()}
        extra["packed"] = attention.Packed.from_position_ids(mb["position_ids"])
    targets = mb["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    batch = {k: v for k, v in mb.items() if k != "labels"}
    logits = model(**batch, **extra, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100, reduction="sum"
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_rel(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk_rows", [None, 16], ids=["one-chunk", "chunks-of-16"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(data, tied, chunk_rows, packed):
    ts, tok = data
    sampler = Sampler(ts, 2, 1, 1, 0, 3, tok.pad_token_id, pack_to=512 if packed else None)
    mb = sampler.step(0).micro_batches[0]
    assert int((mb["labels"] != -100).sum()) > 3 * 16  # several chunks of 16 targets
    ref = _model(tied)
    new = install(copy.deepcopy(ref))
    new.get_output_embeddings().chunk_rows = chunk_rows
    old = _old_loss(ref, mb)
    loss = summed_loss(new, mb, "cpu")
    assert abs(float(loss.detach() - old.detach())) <= 1e-6 * float(old.detach())
    old.backward()
    (loss * 0.5).backward()  # the upstream scale reaches both gradients
    grads = {k: 2 * g for k, g in _grads(new).items()}
    assert _max_rel(grads, _grads(ref)) < 1e-6
    if tied:
        assert new.lm_head.weight is new.model.embed_tokens.weight


def test_full_logits_option_and_evaluation_give_the_same_loss(data):
    ts, tok = data
    mb = collate(ts.input_ids[:4], ts.labels[:4], tok.pad_token_id)
    model = install(_model(True))
    chunked = summed_loss(model, mb, "cpu").detach()
    with torch.no_grad():  # evaluation: the same function, no gradients computed
        evaluated = summed_loss(model, mb, "cpu")
    model.get_output_embeddings().loss_impl = "full"
    full = summed_loss(model, mb, "cpu").detach()
    assert not evaluated.requires_grad
    assert abs(float(chunked) - float(evaluated)) == 0.0
    assert abs(float(chunked) - float(full)) <= 1e-6 * float(full)


def test_without_targets_the_head_is_the_plain_linear(data):
    """Probe logits, generation and anyone else calling the model are unaffected."""
    ts, tok = data
    ref = _model(False)
    new = install(copy.deepcopy(ref))
    assert isinstance(new.lm_head, LinearWithLoss)
    ids = torch.tensor([ts.input_ids[0][:40]])
    with torch.no_grad():
        assert torch.equal(new(input_ids=ids).logits, ref(input_ids=ids).logits)
    out = new.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))


def test_bf16_chunked_loss_close_to_full(data):
    ts, tok = data
    mb = collate(ts.input_ids[:2], ts.labels[:2], tok.pad_token_id)
    model = install(_model(True).to(torch.bfloat16))
    model.get_output_embeddings().chunk_rows = 64
    chunked = summed_loss(model, mb, "cpu")
    chunked.backward()
    g_chunked = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.get_output_embeddings().loss_impl = "full"
    full = summed_loss(model, mb, "cpu")
    full.backward()
    assert chunked.dtype == torch.float32
    assert abs(float(chunked.detach() - full.detach())) <= 1e-3 * float(full.detach())
    rel = float(
        (g_chunked.float() - model.lm_head.weight.grad.float()).norm()
        / model.lm_head.weight.grad.float().norm()
    )
    assert rel < 2e-2, rel


def test_evaluation_projects_once_and_training_recomputes_in_backward(data, monkeypatch):
    """Forward makes each chunk's logits once and keeps none; backward makes them again."""
    from trainer import loss as loss_module

    ts, tok = data
    mb = collate(ts.input_ids[:2], ts.labels[:2], tok.pad_token_id)
    chunks = -(-int((mb["labels"][:, 1:] != -100).sum()) // 16)
    model = install(_model(True))
    model.get_output_embeddings().chunk_rows = 16
    calls = []
    original = loss_module._logits
    monkeypatch.setattr(loss_module, "_logits", lambda h, w: calls.append(1) or original(h, w))
    with torch.no_grad():
        summed_loss(model, mb, "cpu")
    assert len(calls) == chunks
    summed_loss(model, mb, "cpu").backward()
    assert len(calls) == 3 * chunks


@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_packed_equals_padded_through_the_trainer_loss(data, chunk_rows):
    """The same examples, packed into one row or padded two per micro-batch, through
    summed_loss: equal summed loss and gradients."""
    from trainer.batching import collate_packed

    ts, tok = data
    examples = list(range(6))
    runs = {}
    for name in ("packed", "padded"):
        model = install(_model(True))
        model.get_output_embeddings().chunk_rows = chunk_rows
        if name == "packed":
            batches = [collate_packed([examples], ts, tok.pad_token_id)]
        else:
            batches = [
                collate(
                    [ts.input_ids[i] for i in examples[k : k + 2]],
                    [ts.labels[i] for i in examples[k : k + 2]],
                    tok.pad_token_id,
                )
                for k in range(0, 6, 2)
            ]
        total = sum(summed_loss(model, mb, "cpu") for mb in batches)
        total.backward()
        runs[name] = (total.detach(), _grads(model))
    (lp, gp), (lu, gu) = runs["packed"], runs["padded"]
    assert abs(float(lp - lu)) <= 1e-5 * float(lu)
    assert _max_rel(gp, gu) < 1e-5

"""Packing is exactly equivalent to training on the examples one by one."""

from __future__ import annotations

import pytest
import torch

from trainer import attention
from trainer.batching import Sampler, collate, collate_packed, pack_bfd
from trainer.config import ASSETS_DIR
from trainer.data import IGNORE_INDEX
from trainer.model import load_tokenizer
from trainer.records import load_records
from trainer.tokenized import tokenize_records


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer(ASSETS_DIR / "tiny_model")
    return tokenize_records(load_records(ASSETS_DIR / "q_sft_train.jsonl"), tok, 512), tok


def _model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ASSETS_DIR / "tiny_model")
    # As in training (trainer.model): with a KV cache transformers does not look for packed
    # sequences in position_ids, and attention would cross example boundaries.
    config.use_cache = False
    attention.register()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)


def _extra(mb: dict, attn: str) -> dict:
    """What the trainer adds to a packed micro-batch for its own attention (trainer.loss)."""
    if attn == attention.NAME and "attention_mask" not in mb:
        return {"packed": attention.Packed.from_position_ids(mb["position_ids"])}
    return {}


ATTNS = ["sdpa", "eager", attention.NAME]


def test_bfd_places_every_example_once_within_capacity():
    lengths = [300, 200, 200, 120, 90, 60, 50, 40, 500, 12]
    order = list(range(len(lengths)))[::-1]
    bins = pack_bfd(lengths, order, capacity=512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) == 4  # ceil(1572 / 512) = 4: best-fit-decreasing is optimal here
    assert bins == pack_bfd(lengths, order, capacity=512)


def test_collate_packed_restarts_positions_and_cuts_label_boundaries(data):
    ts, tok = data
    mb = collate_packed([[0, 1, 2]], ts, tok.pad_token_id)
    lens = [len(ts.input_ids[i]) for i in (0, 1, 2)]
    pos = mb["position_ids"][0].tolist()
    assert pos[: sum(lens)] == [p for n in lens for p in range(n)]
    at = 0
    for i, n in zip((0, 1, 2), lens, strict=True):
        assert mb["input_ids"][0, at : at + n].tolist() == ts.input_ids[i]
        assert mb["labels"][0, at] == IGNORE_INDEX  # never predict across a boundary
        assert mb["labels"][0, at + 1 : at + n].tolist() == ts.labels[i][1:]
        at += n
    assert "attention_mask" not in mb


def test_eos_is_trained_where_pad_is_eos(tmp_path):
    """Qwen2.5 base releases pad with their EOS (<|endoftext|>). Padding must never mask the EOS
    that ends each raw-format answer: labels come from the examples, not from the pad id."""
    from tests.conftest import qwen_layout_model

    tok = load_tokenizer(qwen_layout_model(tmp_path / "m"))
    assert tok.pad_token_id == tok.eos_token_id
    recs = [{"prompt": f"Task {i}.\n", "completion": "x" * (i + 1)} for i in range(3)]
    ts = tokenize_records(recs, tok, 64, prompt_format="raw")
    for mb in (
        collate_packed([[0, 1, 2]], ts, tok.pad_token_id),
        collate(ts.input_ids, ts.labels, tok.pad_token_id),
    ):
        labels, ids = mb["labels"], mb["input_ids"]
        trained_eos = int(((labels == tok.eos_token_id) & (ids == tok.eos_token_id)).sum())
        assert trained_eos == 3  # one per answer
        pad = (ids == tok.pad_token_id) & (labels == IGNORE_INDEX)
        assert int(pad.sum()) == ids.numel() - sum(map(len, ts.input_ids))  # the tail padding


@pytest.mark.parametrize("attn", ATTNS)
def test_packed_step_equals_unpacked_loss_and_gradients(data, attn):
    ts, tok = data
    examples = list(range(8))  # different lengths (37 to 240 tokens here)
    assert len({len(ts.input_ids[i]) for i in examples}) > 4
    n_items = sum(ts.label_tokens(i) for i in examples)

    def run(batches):
        model = _model(attn)
        loss = sum(
            model(**mb, **_extra(mb, attn), num_items_in_batch=n_items).loss for mb in batches
        )
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    unpacked = [
        collate(
            [ts.input_ids[i] for i in examples[k : k + 2]],
            [ts.labels[i] for i in examples[k : k + 2]],
            tok.pad_token_id,
        )
        for k in range(0, 8, 2)
    ]
    bins = pack_bfd([len(x) for x in ts.input_ids], examples, capacity=512)
    assert len(bins) < 8  # really packed
    packed = [collate_packed([b], ts, tok.pad_token_id) for b in bins]
    loss_u, grads_u = run(unpacked)
    loss_p, grads_p = run(packed)
    assert torch.allclose(loss_p, loss_u, rtol=1e-5, atol=0)
    for k in grads_u:
        rel = float((grads_p[k] - grads_u[k]).norm() / grads_u[k].norm())
        assert rel < 1e-5, (k, rel)


@pytest.mark.parametrize("attn", ATTNS)
def test_no_attention_between_packed_examples(data, attn):
    ts, tok = data
    model = _model(attn).eval()
    mb = collate_packed([[3, 4, 5]], ts, tok.pad_token_id)
    a, b = len(ts.input_ids[3]), len(ts.input_ids[4])
    changed = {k: v.clone() for k, v in mb.items()}
    changed["input_ids"][0, a : a + b] = torch.randint(10, 400, (b,))  # another middle example
    with torch.no_grad():
        before = model(**mb, **_extra(mb, attn)).logits
        after = model(**changed, **_extra(changed, attn)).logits
    assert torch.equal(before[0, :a], after[0, :a])  # earlier example: untouched
    assert torch.allclose(before[0, a + b :], after[0, a + b :], rtol=0, atol=1e-5)  # later one
    assert not torch.allclose(before[0, a : a + b], after[0, a : a + b])  # the changed one did


def test_packed_attention_matches_the_masked_sdpa_path(data):
    """Our per-example attention equals transformers' block-diagonal mask, several rows at once."""
    ts, tok = data
    bins = pack_bfd([len(x) for x in ts.input_ids], list(range(24)), capacity=512)
    mb = collate_packed(bins[:3], ts, tok.pad_token_id)  # rows of unequal fill: tail padding
    spans = attention.packed_segments(mb["position_ids"])
    fills = [sum(len(ts.input_ids[i]) for i in b) for b in bins[:3]]
    assert len(set(fills)) > 1  # so some row has tail padding: one more span
    assert [len(r) for r in spans] == [
        len(b) + (f < max(fills)) for b, f in zip(bins[:3], fills, strict=True)
    ]
    ours, theirs = _model(attention.NAME), _model("sdpa")
    theirs.load_state_dict(ours.state_dict())
    out_ours = ours(**mb, **_extra(mb, attention.NAME), num_items_in_batch=1)
    out_theirs = theirs(**mb, num_items_in_batch=1)
    assert torch.allclose(out_ours.logits, out_theirs.logits, rtol=0, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5, name
    # Called directly, without the boundaries: derived from the position_ids, same result.
    assert torch.allclose(ours(**mb).logits, out_theirs.logits, rtol=0, atol=1e-5)


def test_trainer_loss_on_packed_rows_equals_the_models_loss(data):
    """trainer.loss.summed_loss (rows laid end to end, chunked loss at the target positions, our
    attention) against transformers' own loss and masked sdpa on the same 3-row batch."""
    from trainer.loss import summed_loss

    ts, tok = data
    bins = pack_bfd([len(x) for x in ts.input_ids], list(range(30)), capacity=512)
    mb = collate_packed(bins[:3], ts, tok.pad_token_id)
    ours, theirs = _model(attention.NAME), _model("sdpa")
    theirs.load_state_dict(ours.state_dict())
    loss = summed_loss(ours, mb, "cpu")
    ref = theirs(**mb, num_items_in_batch=1).loss  # sum of target-token CE
    assert torch.allclose(loss, ref, rtol=1e-5, atol=0), (float(loss), float(ref))
    loss.backward()
    ref.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5, name


def test_packed_sampler_visits_each_example_once_per_epoch_on_any_split(data):
    ts, tok = data
    one = Sampler(ts, micro=1, accum=4, world=1, rank=0, seed=5, pad_id=0, pack_to=512)
    two = [
        Sampler(ts, micro=1, accum=2, world=2, rank=r, seed=5, pad_id=0, pack_to=512)
        for r in (0, 1)
    ]
    n_bins = len(one.units(0))
    assert n_bins < len(ts) / 2  # ~4 examples per 512-token sequence
    seen = []
    for start in range(0, n_bins - n_bins % 4, 4):
        a, b0, b1 = one.step(start), two[0].step(start), two[1].step(start)
        assert a.sample_ids == b0.sample_ids == b1.sample_ids
        assert a.num_label_tokens == b0.num_label_tokens
        assert b0.tokens + b1.tokens == a.tokens
        seen += a.sample_ids
    assert len(seen) == len(set(seen))
    assert one.units(1) != one.units(0)  # new bins each epoch
    whole_epoch = [i for u in one.units(0) for i in u]
    assert sorted(whole_epoch) == list(range(len(ts)))

"""Logging sinks, the curves, the LR schedule and wandb's offline fallback."""

from __future__ import annotations

import json
import math
import re
import struct

import torch

from trainer import plots
from trainer.metrics import MetricsSink, format_summary
from trainer.startup import lr_lambda


def test_warmup_then_cosine_to_zero():
    f = lr_lambda(warmup_steps=10, max_steps=110)
    assert f(0) == 0.1 and f(9) == 1.0
    assert math.isclose(f(60), 0.5) and f(110) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_sink_writes_logs_and_eval_results(tmp_path, monkeypatch):
    monkeypatch.setenv("QSFT_NO_PROGRESS", "1")
    sink = MetricsSink(tmp_path, total_steps=10, start_step=0)
    sink.log_step(
        dict(step=5, loss=1.5, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0, consumed_units=40)
    )
    hist = [
        dict(step=0, eval_loss=3.0, perplexity=math.exp(3.0)),
        dict(step=5, eval_loss=2.0, perplexity=math.exp(2.0)),
    ]
    sink.log_eval(hist)
    assert _png_size(tmp_path / "logs" / plots.CURVES) == (800, 800)  # redrawn at each eval
    summary = dict(steps=5, wall_s=1.0, tokens_per_s=100.0, consolidated=None, eval=hist)
    sink.write_summary(summary)
    sink.close()
    assert summary["curves"] == str(tmp_path / "logs" / plots.CURVES)
    assert json.loads((tmp_path / "logs" / "summary.json").read_text())["curves"] == str(
        tmp_path / "logs" / plots.CURVES
    )
    assert f"curves (loss, eval loss, learning rate, tokens/s): {summary['curves']}" in (
        format_summary(summary)
    )
    assert json.loads((tmp_path / "logs" / "metrics.jsonl").read_text())["loss"] == 1.5
    ev = json.loads((tmp_path / "logs" / "eval_results.json").read_text())
    assert ev["best_step"] == 5 and ev["best_eval_loss"] == 2.0 and len(ev["history"]) == 2
    text = (tmp_path / "logs" / "training_log.txt").read_text()
    assert "step 5 loss 1.5000" in text and "eval step 5: loss 2.0000" in text


def test_wandb_without_api_key_goes_offline_and_says_so_once(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wb_cache"))
    monkeypatch.setenv("QSFT_NO_PROGRESS", "1")
    cfg = dict(project="qsft-test", name="t", config={"a": 1}, dir=str(tmp_path))
    sink = MetricsSink(tmp_path, total_steps=1, start_step=0, wandb_cfg=cfg)
    assert sink.wandb is not None and sink.wandb.settings.mode == "offline"
    sink.log_step(
        dict(step=1, loss=1.0, lr=1e-3, grad_norm=0.1, tokens_per_s=1.0, consumed_units=1)
    )
    sink.close()
    log = (tmp_path / "logs" / "training_log.txt").read_text()
    assert log.count("wandb: no API key found; logging offline") == 1
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_summary_names_consolidated_dir_and_losses():
    text = format_summary(
        dict(
            steps=10,
            wall_s=60,
            tokens_per_s=1234.0,
            consolidated="/x/c",
            eval=[dict(step=0, eval_loss=7.0), dict(step=10, eval_loss=3.0)],
        )
    )
    assert "eval loss 7.0000 (step 0) -> 3.0000 (step 10)" in text
    assert "from_pretrained('/x/c')" in text and "1234 tokens/s" in text


def test_flops_per_token_counts_matmul_params_and_causal_attention():
    from types import SimpleNamespace

    from trainer.flops import flops_per_token

    cfg = SimpleNamespace(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, tie_word_embeddings=True
    )
    # tied: the 64k embedding is also the output projection, so every parameter multiplies
    assert flops_per_token(cfg, 200_000, 100) == 6 * 200_000 + 6 * 2 * 64 * 100
    cfg.tie_word_embeddings = False  # untied: the input lookup is not a matmul
    assert flops_per_token(cfg, 264_000, 100) == 6 * 200_000 + 6 * 2 * 64 * 100
    # logits only at loss positions (a quarter of the tokens): the projection counts a quarter
    assert flops_per_token(cfg, 264_000, 100, target_fraction=0.25) == (
        6 * 136_000 + 6 * 64_000 * 0.25 + 6 * 2 * 64 * 100
    )


def test_peak_flops_datasheet_on_known_gpus_measured_elsewhere(monkeypatch):
    from trainer.flops import device_peak_flops

    if not torch.cuda.is_available():  # this machine: a measured CPU matmul rate
        peak, source = device_peak_flops(torch.float32)
        assert peak > 1e9 and source == "measured CPU fp32 matmul"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert device_peak_flops(torch.bfloat16) == (989e12, "H200 datasheet bf16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert device_peak_flops(torch.bfloat16) == (312e12, "A100 datasheet bf16")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_curves_take_the_resumed_record_of_a_step_logged_twice(tmp_path):
    """A crash after step 3's log and a resume from step 2 log step 3 again: the curve follows
    the run that continued (the later record), and a line cut by the kill is skipped."""
    lines = [
        dict(step=2, loss=2.0, lr=1e-3, tokens_per_s=10.0),
        dict(step=3, loss=9.0, lr=1e-3, tokens_per_s=10.0),
        dict(event="resume", step=2),
        dict(step=3, loss=1.5, lr=1e-3, tokens_per_s=10.0),
    ]
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in plots.read_steps(f)] == [(2, 2.0), (3, 1.5)]
    # A crashed run had logged to step 5; the resumed one logs every 2 steps from step 2.
    crashed = [dict(step=s, loss=9.0, lr=1e-3, tokens_per_s=1.0) for s in (3, 4, 5)]
    resumed = [dict(event="resume", step=2), dict(step=4, loss=1.0, lr=1e-3, tokens_per_s=1.0)]
    f.write_text("".join(json.dumps(r) + "\n" for r in lines[:1] + crashed + resumed))
    assert [(r["step"], r["loss"]) for r in plots.read_steps(f)] == [(2, 2.0), (4, 1.0)]
    assert plots.draw_curves(tmp_path, []) == tmp_path / plots.CURVES
    assert not (tmp_path / "empty").exists() and plots.draw_curves(tmp_path / "empty", []) is None


def test_messages_are_written_above_the_progress_bar(tmp_path, monkeypatch, capsys):
    """Each message clears the bar's line, is written whole on its own line of the bar's stream,
    and the bar is drawn again below it (never a message glued to the bar's text)."""
    monkeypatch.delenv("QSFT_NO_PROGRESS", raising=False)
    sink = MetricsSink(tmp_path, total_steps=10, start_step=0)
    sink.bar.mininterval = 0  # draw at every update
    sink.progress(1, {"loss": "1.000"})
    sink.message("saved checkpoint-1")
    sink.progress(2, {"loss": "0.900"})
    sink.end_progress()
    sink.message("== summary ==")  # after the bar is done: plain, and no bar drawn after it
    sink.close()
    out = capsys.readouterr().out
    assert out.endswith("\n== summary ==\n")
    before, after = out.split("saved checkpoint-1", 1)
    assert before.rstrip(" ").endswith("\r")  # the bar's line was blanked first
    assert after.startswith("\n")  # the message ends its own line...
    assert re.search(r"2/10", after)  # ...and the bar continues below it
    assert "saved checkpoint-1" in (tmp_path / "logs" / "training_log.txt").read_text()


def test_a_picture_that_cannot_be_drawn_never_stops_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSFT_NO_PROGRESS", "1")

    def broken(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "draw_curves", broken)
    sink = MetricsSink(tmp_path, total_steps=10, start_step=0)
    hist = [dict(step=0, eval_loss=3.0, perplexity=math.exp(3.0))]
    sink.log_eval(hist)
    sink.log_eval(hist)  # said once
    summary = dict(steps=0, wall_s=1.0, tokens_per_s=1.0, consolidated=None, eval=hist)
    sink.write_summary(summary)
    sink.close()
    assert summary["curves"] is None and (tmp_path / "logs" / "summary.json").is_file()
    assert capsys.readouterr().out.count("curves.png not drawn (ImportError") == 1

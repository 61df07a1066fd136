"""Test probe, launched with the real deepspeed launcher: exposes engine internals to tests.

    probe.py grads  OUT.pt  TRAIN_FLAGS...   one step's micro-batches; dump full gradients
    probe.py logits OUT.pt  TRAIN_FLAGS...   train as launch/train.py does; dump live logits

It drives the trainer's own code: startup.setup(), then for `grads` the loop's
accumulate_gradients() (every micro-batch of the first optimizer step, stopped before the
boundary's engine.step() updates the weights), for `logits` loop.fit() and loop.finish().
"""

from __future__ import annotations

import sys

import torch
from deepspeed.utils import safe_get_full_grad

from trainer import dist
from trainer.batching import collate
from trainer.config import parse_run_config
from trainer.loop import accumulate_gradients, finish, fit
from trainer.startup import setup


def main() -> None:
    # The launcher puts --local_rank=N first; the trainer's parser accepts it anywhere.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    mode, out, argv = args[0], args[1], args[2:]
    run = setup(parse_run_config(argv))
    engine = run.engine
    if mode == "grads":
        init = engine._zero3_consolidated_16bit_state_dict()  # collective
        accumulate_gradients(run, run.sampler.step(0))
        # At the boundary the gradients are reduced; gathering them is a collective.
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        if dist.is_main():
            torch.save({"init": init, "grads": grads}, out)
    else:
        fit(run)
        finish(run)
        data = run.eval_sets[0]
        batch = collate(data.input_ids[:4], data.labels[:4], run.tokenizer.pad_token_id)
        engine.eval()
        with torch.no_grad():
            logits = engine(**{k: v.to(engine.device) for k, v in batch.items()}).logits
        if dist.is_main():
            torch.save({"batch": batch, "logits": logits.cpu()}, out)
    dist.barrier()
    dist.teardown()


if __name__ == "__main__":
    main()

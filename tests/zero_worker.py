"""One rank of tests/test_zero_exact.py: every case in sequence in one process group;
rank 0 saves the resulting weights.

    python tests/zero_worker.py OUT.pt   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test)
"""
from __future__ import annotations

import os
import sys

import deepspeed
import torch

from lbllm.optim import create_optimizer
from lbllm.optim.zero import attach_zero_layout
from lbllm.train.engine import use_gloo_collectives_on_cpu
from test_zero_exact import MICRO, OPTS, build_model, case_key, case_steps, cases_for, global_batch


def run_cases(out: str) -> None:
    use_gloo_collectives_on_cpu()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    xs, ys = global_batch(world)
    results = {}
    for case in cases_for(world):
        opt_name, stage, attach, extra = case
        model = build_model()
        opt = create_optimizer(OPTS[opt_name][0], model, **OPTS[opt_name][1])
        # gradient_clipping 0: DeepSpeed's default (1.0) would clip before the optimizer.
        config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
                  "zero_optimization": {"stage": stage, **{k: v for k, v in extra.items() if k != "bf16"}},
                  "bf16": {"enabled": bool(extra.get("bf16"))}, "communication_data_type": "fp32",
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
                  "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        if attach:
            assert attach_zero_layout(engine) is not None
        for step in range(case_steps(case)):
            x = xs[step, rank * MICRO:(rank + 1) * MICRO]
            y = ys[step, rank * MICRO:(rank + 1) * MICRO]
            if extra.get("bf16"):
                x, y = x.bfloat16(), y.bfloat16()
            loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
            engine.backward(loss)
            engine.step()
        # ZeRO 3 holds only partitions: gather the full parameters to compare them.
        # bf16 compares the fp32 master weights: the bf16 copy would turn 1e-7 differences
        # into whole-ulp flips.
        if extra.get("bf16"):
            from deepspeed.utils import safe_get_full_fp32_param
            results[case_key(case)] = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        else:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
                results[case_key(case)] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        engine.destroy()
    if rank == 0:
        torch.save(results, out)
    # Left to interpreter teardown, gloo's threads can abort a finished rank ("terminate
    # called without an active exception"), failing the test on its exit code.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cases(sys.argv[1])

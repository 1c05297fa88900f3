"""lbllm.train.prefetch: reading one step ahead on a thread gives exactly the batches, masks
and sampler states of reading each step when it is needed, also across a batch ramp."""
import numpy as np

from lbllm.data import GlobalBatchSampler, PretrainingDataset
from lbllm.train.prefetch import StepLoader


def _loader(data, prefetch: bool, ramp):
    ds = PretrainingDataset(data / "shards_64", tokenizer_dir=data / "tokenizer")
    sampler = GlobalBatchSampler(num_samples=len(ds), global_batch_size=8, micro_batch_size=4, world_size=2,
                                 rank=1, seed=5)
    return StepLoader(ds, sampler, ramp, first_step=1, last_step=70, prefetch=prefetch)


def test_prefetch_equals_synchronous_reading(tiny_data):
    ramp = lambda step: 8 if step <= 10 else 16  # noqa: E731  (accumulation 1 -> 2 on 2 ranks)
    a, b = _loader(tiny_data, True, ramp), _loader(tiny_data, False, ramp)
    epochs = set()
    try:
        for step in range(1, 71):  # 80 + 60 x 16 samples: past the 950 of tiny_data
            x, y = a.next_step(), b.next_step()
            assert (x.step, x.global_batch_size, x.epoch, len(x.micro)) == (y.step, y.global_batch_size, y.epoch,
                                                                            len(y.micro))
            assert len(x.micro) == (1 if step <= 10 else 2)
            assert x.sampler_state == y.sampler_state
            for mx, my in zip(x.micro, y.micro):
                assert mx.keys() == my.keys()
                for k in mx:
                    assert np.array_equal(mx[k].numpy(), my[k].numpy()), (step, k)
            epochs.add(x.epoch)
    finally:
        a.close()
        b.close()
    assert len(epochs) > 1  # the run crossed an epoch boundary (a new permutation and new masks)


def test_state_of_each_step_is_the_sampler_after_that_step(tiny_data):
    """What a checkpoint after step k saves resumes at step k + 1, although the live sampler
    has already moved on to k + 2."""
    ramp = lambda step: 8  # noqa: E731
    a = _loader(tiny_data, True, ramp)
    try:
        first = [a.next_step() for _ in range(3)]
        resumed = _loader(tiny_data, False, ramp)
        resumed.sampler.load_state_dict(first[1].sampler_state)
        resumed._next = 3
        third = resumed.next_step()
        for mx, my in zip(first[2].micro, third.micro):
            assert all(np.array_equal(mx[k].numpy(), my[k].numpy()) for k in mx)
        resumed.close()
    finally:
        a.close()

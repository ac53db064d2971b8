"""Checkpoints written by sparsetrain 0.2 keep loading: each resumes bit-exactly to the 0.2 straight run.

The fixtures in ``tests/fixtures/v0_2`` were written with sparsetrain 0.2.0 by ``python -m tests.fixtures.make_v0_2``:
``last.ckpt`` after 16 of 32 optimizer steps, ``final.pt`` the masks and weights of the same run straight to 32.
"""

import pytest
import torch

from tests.fixtures.make_v0_2 import HERE, METHODS, run


@pytest.mark.parametrize("name", list(METHODS))
def test_a_0_2_checkpoint_resumes_exactly(name, tmp_path):
    method, args, optimizer = METHODS[name]
    final = torch.load(HERE / name / "final.pt", weights_only=True)
    last = tmp_path / "last.ckpt"  # a copy: the resumed Trainer must not write into the fixture folder
    last.write_bytes((HERE / name / "last.ckpt").read_bytes())
    model, cb = run(name, 4, resume=last)
    assert list(cb.masks) == list(final["masks"])
    for n, m in final["masks"].items():
        assert torch.equal(cb.masks[n].cpu(), m), n
    for k, v in final["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    for n, m in final["masks"].items():  # the weights the model computes with hold the masks
        assert int((model.get_parameter(n)[~m] != 0).sum()) == 0, n

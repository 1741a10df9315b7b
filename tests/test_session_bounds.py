"""The operator, not the client, bounds memory: a request's own key steps cannot widen the decoder
batch beyond what the default key steps use for the same request (``Session(bound_parallel=True)``,
as the service and batch jobs run)."""

from __future__ import annotations

import numpy as np
import pytest

from distfd.request import ImageRequest
from distfd.runtime import DistContext
from distfd.session import Session

from . import tiny

BASE = dict(prompt="a red circle", steps=12, height=16, width=16, seed=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.sd().save_pretrained(path)
    return str(path)


def _widest(session: Session, req: ImageRequest) -> tuple[int, np.ndarray]:
    """The most rows one decoder call saw (the last up block's input batch), and the image."""
    rows: list[int] = []
    block = session.pipe.unet.up_blocks[-1]

    def record(module, args, kwargs) -> None:
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        image = session.run(req).image
    finally:
        handle.remove()
    return max(rows), np.asarray(image, dtype=np.int16)


def test_a_clients_key_steps_cannot_widen_the_decoder_batch(model_dir):
    bounded = Session(DistContext.single(), model=model_dir, bound_parallel=True)
    default_rows, _ = _widest(bounded, ImageRequest(**BASE))
    assert default_rows == 2 * bounded.default_parallel_steps(12)  # CFG: two rows per step
    for keys in ((0,), "uniform-12", "uniform-5"):
        rows, image = _widest(bounded, ImageRequest(**BASE, key_steps=keys))
        assert rows <= default_rows, (keys, rows, default_rows)
    # Without the bound the same request decodes the whole loop at once; the images agree.
    free = Session(DistContext.single(), model=model_dir)
    free_rows, free_image = _widest(free, ImageRequest(**BASE, key_steps=(0,)))
    assert free_rows == 2 * 12 > default_rows
    _, capped_image = _widest(bounded, ImageRequest(**BASE, key_steps=(0,)))
    assert np.abs(capped_image - free_image).max() <= 1  # chunked decoding: the same image


def test_the_operators_cap_wins(model_dir):
    session = Session(DistContext.single(), model=model_dir, bound_parallel=True, max_parallel_steps=2)
    rows, _ = _widest(session, ImageRequest(**BASE, key_steps=(0,)))
    assert rows == 2 * 2

"""``distfd generate --compile``: the same image as without, the passes compiled before the timed call."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distfd.cli import main
from distfd.compiling import graphs_compiled

from . import cli_helpers
from .cli_helpers import TINY_RUN
from .test_compile import _fresh_dynamo  # noqa: F401  (autouse: dynamo reset around every test)

model_dir = cli_helpers.model_dir  # the shared fixture

pytestmark = pytest.mark.timeout(300)


def test_generate_compile_gives_the_eager_image(model_dir, tmp_path, capsys):
    eager, compiled = tmp_path / "eager.png", tmp_path / "compiled.png"
    run = ["generate", "--model", str(model_dir), *TINY_RUN]
    assert main([*run, "--out", str(eager)]) == 0
    assert graphs_compiled() == 0
    capsys.readouterr()
    assert main([*run, "--compile", "--compile-backend", "eager", "--out", str(compiled)]) == 0
    out = capsys.readouterr().out
    # key steps 0, 2 of 6: the encoder and two decoder batches (groups of 2 and 4 steps: 4 and 8 rows)
    assert graphs_compiled() == 1 + 2 + 1  # + the vanilla warm-up's whole-model graph
    assert "encoder passes 2, decoder passes 2" in out  # one call's share on the kept handle
    np.testing.assert_array_equal(np.asarray(Image.open(compiled)), np.asarray(Image.open(eager)))


def test_compile_flag_refusals(model_dir, capsys):
    run = ["generate", "--model", str(model_dir), *TINY_RUN]
    assert main([*run, "--compile", "--compare"]) == 2
    assert "--compile with --compare is not supported" in capsys.readouterr().err
    assert main([*run, "--compile-mode", "reduce-overhead"]) == 2
    assert "--compile-mode needs --compile" in capsys.readouterr().err

"""Compiled denoisers: distfd compiles its encoder and decoder passes with the user's options.

``backend="eager"`` runs dynamo's graph capture (guards, graph breaks, recompiles: everything this
file checks) without a code generator, so the tests stay fast on CPU; ``aot_eager`` adds AOTAutograd's
functionalisation once. Graph counts come from ``torch._dynamo.utils.counters``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import distfd
from distfd.compiling import graph_breaks, graphs_compiled, unwrap, warm_up
from distfd.embedded import calibrated_key_steps
from distfd.keysteps import resolve_key_steps
from distfd.passes import CompiledPasses, planned_graphs

from . import tiny
from .test_models_dit import KEYS as PIXART_KEYS
from .test_models_dit import STEPS as PIXART_STEPS
from .test_models_dit import pixart_call
from .tiny_models import dit, pixart, run_dit

STEPS, KEYS = 10, [0, 1, 3, 6]  # groups of 1, 2, 3 and 4 steps
FEW = [0, 4, 8]  # groups of 4, 4 and 2 steps: decoder batches of 8 and 4 rows
CFG_ROWS = 2


def _compile(pipe, style: str, attr: str = "unet", **options) -> None:
    if style == "module":
        setattr(pipe, attr, torch.compile(getattr(pipe, attr), **options))
    else:
        getattr(pipe, attr).compile(**options)


def _distfd(pipe, run, **config):
    with_config = dict(key_steps=KEYS, mode="parallel") | config
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(**with_config))
    try:
        return run(pipe), handle.stats()
    finally:
        handle.remove()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("style", ["module", "inplace"])
def test_compiled_unet_gives_the_eager_image_with_the_planned_graphs(style):
    pipe = tiny.sd()
    eager, _ = _distfd(pipe, tiny.run, key_steps=FEW)
    vanilla = tiny.run(pipe)
    outer = pipe.unet
    _compile(pipe, style, backend="eager")
    compiled_outer = pipe.unet
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=FEW, mode="parallel"))
    assert handle.engine.passes.compiled
    report = warm_up(pipe, calls=1, prompt="a red circle", num_inference_steps=STEPS, height=32, width=32)
    plan = planned_graphs(FEW, STEPS, CFG_ROWS)
    assert plan.decoder_shapes == (("gather", 4), ("gather", 8))
    assert report.graphs == [plan.graphs] == [3]  # the encoder, and one graph per decoder batch size
    got = tiny.run(pipe)
    assert graphs_compiled() == plan.graphs, "a second identical call compiled again"
    assert graph_breaks() == {}, f"graph breaks: {graph_breaks()}"
    tiny.assert_close(got, eager)
    handle.remove()
    # remove() restores the user's compiled denoiser: the pipeline calls the whole compiled model again.
    assert pipe.unet is compiled_outer and (style == "module" or pipe.unet is outer)
    if style == "inplace":
        assert pipe.unet._compiled_call_impl is not None
    before = graphs_compiled()
    torch.testing.assert_close(tiny.run(pipe), vanilla, rtol=0, atol=1e-6)
    assert graphs_compiled() == before + 1  # the whole-model graph, compiled only now


def test_one_graph_per_decoder_batch_shape():
    pipe = tiny.sd()
    eager, _ = _distfd(pipe, tiny.run)
    _compile(pipe, "module", backend="eager")
    got, _ = _distfd(pipe, tiny.run)
    plan = planned_graphs(KEYS, STEPS, CFG_ROWS)
    # The one-step group (the pipeline's own two rows), then groups of 2, 3 and 4 steps.
    assert plan.decoder_shapes == (("direct", 2), ("gather", 4), ("gather", 6), ("gather", 8))
    assert graphs_compiled() == plan.graphs == 5
    assert not counters["recompiles"]
    tiny.assert_close(got, eager)


def test_dynamic_shapes_compile_one_decoder_graph_for_all_group_sizes():
    pipe = tiny.sd()
    eager, _ = _distfd(pipe, tiny.run)
    _compile(pipe, "module", backend="eager", dynamic=True)
    got, _ = _distfd(pipe, tiny.run)
    plan = planned_graphs(KEYS, STEPS, CFG_ROWS, dynamic=True)
    assert graphs_compiled() == plan.graphs == 3  # encoder, direct, one gather graph for 4, 6, 8 rows
    assert graph_breaks() == {}
    tiny.assert_close(got, eager)


def test_aot_eager_and_propagate_mode():
    pipe = tiny.sd()
    eager, _ = _distfd(pipe, tiny.run, mode="propagate")
    _compile(pipe, "inplace", backend="aot_eager")
    got, stats = _distfd(pipe, tiny.run, mode="propagate")
    assert stats["decoder_passes"] == STEPS
    assert graphs_compiled() == planned_graphs(KEYS, STEPS, CFG_ROWS, mode="propagate").graphs == 2
    assert graph_breaks() == {}
    tiny.assert_close(got, eager)


@pytest.mark.parametrize("model", ["dit", "pixart"])
def test_compiled_transformer(model):
    pipe, run = (dit(), lambda p: run_dit(p, steps=STEPS)) if model == "dit" else (pixart(), pixart_call)
    steps = STEPS if model == "dit" else PIXART_STEPS
    keys = KEYS if model == "dit" else PIXART_KEYS
    eager, _ = _distfd(pipe, run, key_steps=keys)
    _compile(pipe, "inplace" if model == "dit" else "module", attr="transformer", backend="eager")
    got, _ = _distfd(pipe, run, key_steps=keys)
    assert graphs_compiled() == planned_graphs(keys, steps, CFG_ROWS).graphs
    assert graph_breaks() == {}
    tiny.assert_close(got, eager)


def test_fifty_steps_with_the_paper_key_steps_compile_six_graphs_once():
    """The count docs/performance.md gives for a 50-step call: the paper's DDIM-50 set, CFG, one rank."""
    pipe = tiny.sd()
    _compile(pipe, "module", backend="eager")
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps="sd-ddim-50", mode="parallel"))
    report = warm_up(pipe, calls=2, prompt="a red circle", num_inference_steps=50, height=32, width=32)
    handle.remove()
    assert report.graphs == [6, 0]
    assert graph_breaks() == {}
    assert (
        not counters["recompiles"]
        or max(counters["recompiles"].values()) < torch._dynamo.config.recompile_limit
    )


def test_planned_graphs_for_fifty_steps():
    """Graph counts stated in docs/performance.md (50 steps, CFG, one rank)."""
    paper = resolve_key_steps("sd-ddim-50", 50)
    calibrated = (0, 6, 10, 15, 20, 25, 30, 36, 42)
    # Static (default): the encoder and one graph per decoder batch size; 2 rows (the one-step
    # groups 0, 1, 2), then 4, 10, 20, 30 rows (groups of 2, 5, 10, 15 steps).
    assert planned_graphs(paper, 50, CFG_ROWS).graphs == 6
    assert planned_graphs(paper, 50, CFG_ROWS, dynamic=True).graphs == 3
    assert planned_graphs(paper, 50, CFG_ROWS).captures == 6  # CUDA graphs: one per pass shape
    # The drift-calibrated set: groups of 4, 5, 6, 8 steps -> 8, 10, 12, 16 rows.
    assert planned_graphs(calibrated, 50, CFG_ROWS).graphs == 5
    assert planned_graphs(calibrated, 50, CFG_ROWS, dynamic=True).graphs == 2
    assert planned_graphs(calibrated, 50, CFG_ROWS).captures == 5
    # The set shipped for the embedded model (docs/performance.md's table says 5 / 2 / 5: update it with it).
    shipped = resolve_key_steps(str(calibrated_key_steps("ddim", 50)), 50)
    assert shipped == (0, 7, 10, 13, 20, 26, 33, 39, 46), (
        "the shipped key steps changed: update docs/performance.md"
    )
    assert planned_graphs(shipped, 50, CFG_ROWS).graphs == 5
    assert planned_graphs(shipped, 50, CFG_ROWS, dynamic=True).graphs == 2
    # Two ranks (rank 0 encodes): each rank's share of a group is its own batch size.
    # (a 2-step group's second half is one step's rows in order: the pipeline's own tensors.)
    two = planned_graphs(paper, 50, CFG_ROWS, world_size=2, rank=1, encodes=False)
    assert two.encoder_graphs == 0
    assert two.decoder_shapes == (("direct", 2), ("gather", 1), ("gather", 5), ("gather", 10), ("gather", 15))
    assert two.graphs == 5
    # Dynamic rows: direct, gather, and dynamo's own graph for a single row.
    assert planned_graphs(paper, 50, CFG_ROWS, world_size=2, rank=1, encodes=False, dynamic=True).graphs == 3


def test_compiling_after_apply_is_a_clear_error():
    pipe = tiny.sd()
    handle = distfd.apply(pipe, distfd.FasterDiffusionConfig(key_steps=FEW))
    unet = pipe.unet
    unet.compile(backend="eager")
    with pytest.raises(RuntimeError, match="compiled or replaced after distfd.apply"):
        tiny.run(pipe, steps=STEPS)
    unet._compiled_call_impl = None
    pipe.unet = torch.compile(unet, backend="eager")
    with pytest.raises(RuntimeError, match="compiled or replaced after distfd.apply"):
        tiny.run(pipe, steps=STEPS)
    pipe.unet = unet
    handle.remove()


def test_kept_outputs_leave_the_cuda_graph_pool():
    """On CUDA the engine keeps copies of what a pass returns (the next CUDA-graph replay reuses it)."""
    feats = [torch.ones(2, 3), (torch.zeros(2), None)]
    kept = CompiledPasses(torch._dynamo.optimize("eager"), clone_outputs=True).keep(feats)
    assert kept[0] is not feats[0] and kept[1][0] is not feats[1][0] and kept[1][1] is None
    torch.testing.assert_close(kept, feats)
    assert CompiledPasses(torch._dynamo.optimize("eager"), clone_outputs=False).keep(feats) is feats


def test_unwrap_reads_the_users_options():
    model = torch.nn.Linear(2, 2)
    den = unwrap(torch.compile(model, backend="eager", dynamic=False))
    assert den.style == "module" and den.model is model and den.context._dynamic is False
    model.compile(backend="eager")
    den = unwrap(model)
    assert den.style == "inplace" and den.model is model and den.context is not None
    den.suspend()
    assert model._compiled_call_impl is None
    den.restore()
    assert model._compiled_call_impl is not None
    assert not unwrap(torch.nn.Linear(2, 2)).compiled
    with pytest.raises(ValueError, match="compiled twice"):
        unwrap(torch.compile(model, backend="eager"))


def test_nccl_backend_on_cpu_is_refused_before_joining(monkeypatch):
    """``--backend``: gloo works anywhere (several ranks may share one GPU); nccl needs CUDA devices."""
    for var, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="nccl.*needs CUDA"):
        distfd.DistContext.from_env(backend="nccl", device="cpu")

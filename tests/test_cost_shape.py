"""The probe's cost has a fixed shape on a real scheduler: counted in calls, not in time.

``benchmarks/instructions.py`` measures what those calls cost; these tests fail if a change
adds work per running request per step, work that grows with the pool, or leaves anything
behind after ``uninstrument()`` on a live scheduler.
"""

from __future__ import annotations

import gc
import inspect
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

import otel_vllm_kv
from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.demo.sampling import read_engines
from otel_vllm_kv.engine import admission, prefix_cache, probe
from otel_vllm_kv.patching import hook_methods
from tests.support.schedulers import Stepper, build_scheduler, make_request
from tests.support.telemetry import new_reader

PACKAGE = os.path.dirname(otel_vllm_kv.__file__)


def our_calls(function) -> Counter:
    """Calls of this package's Python functions while ``function`` runs."""
    counts: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            counts[frame.f_code.co_qualname] += 1

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return counts


def decoding(tiny_model_dir, running: int, num_blocks: int) -> Stepper:
    """``running`` requests past their prefill, decoding inside their first block (no allocation per step)."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=num_blocks, block_size=16, max_num_seqs=64)
    for index in range(running):
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=2, max_tokens=40, first_token=100 * index))
    stepper = Stepper(scheduler)
    stepper.step()
    return stepper


def test_a_decode_step_calls_the_same_few_functions_whatever_the_batch_and_the_pool(tiny_model_dir):
    reader, provider = new_reader()
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    try:
        shapes = {}
        for running, num_blocks in ((2, 64), (40, 64), (40, 4096)):
            stepper = decoding(tiny_model_dir, running, num_blocks)
            calls = our_calls(lambda: [stepper.step() for _ in range(5)])  # noqa: B023 - called at once
            shapes[running, num_blocks] = {name: count / 5 for name, count in calls.items()}
            stepper.scheduler.shutdown()
        assert shapes[2, 64] == shapes[40, 64] == shapes[40, 4096], shapes
        # make_stats' hook and the probe's publish: the free-block count did not change.
        assert sum(shapes[2, 64].values()) == 2, shapes[2, 64]
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_uninstrumenting_a_live_scheduler_leaves_nothing_on_it_and_instrumenting_again_hooks_once(tiny_model_dir):
    reader, provider = new_reader()
    instrumentor = VLLMKVCacheInstrumentor()
    stepper = decoding(tiny_model_dir, 4, 64)  # built before instrument(): attached at its next step
    scheduler = stepper.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    objects = (scheduler, scheduler.kv_cache_manager, pool, pool.free_block_queue)
    before = [set(vars(target)) for target in objects]
    for _ in range(2):
        instrumentor.instrument(meter_provider=provider)
        stepper.step()
        assert read_engines(reader), "the live scheduler is observed"
        wrapped = vars(scheduler)["make_stats"]
        assert not hasattr(wrapped.__wrapped__, "__wrapped__"), "one hook, around vLLM's own method"
        for target, names in ((pool, prefix_cache.POOL_METHODS), (pool.free_block_queue, prefix_cache.QUEUE_METHODS)):
            for name in names:
                assert not hasattr(vars(target)[name].__wrapped__, "__wrapped__"), name
        instrumentor.uninstrument()
        assert [set(vars(target)) for target in objects] == before, "no attribute of ours is left"
        calls = our_calls(stepper.step)
        assert not calls, f"an uninstrumented step runs none of our code: {calls}"
    assert probe.registry.attach(scheduler) is None, "nothing attaches once uninstrumented"
    scheduler.shutdown()
    provider.shutdown()


def test_the_hot_hooks_take_exactly_the_parameters_they_declare(tiny_model_dir):
    """What ``compat`` checks against vLLM (``HOOKED_PARAMETERS``) is what each hook takes."""
    reader, provider = new_reader()
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    try:
        scheduler = build_scheduler(tiny_model_dir, num_blocks=16, block_size=16)
        manager = scheduler.kv_cache_manager
        checked = []
        for target, declared in (
            (manager, admission.HOOKED_PARAMETERS),
            (manager.block_pool.free_block_queue, prefix_cache.QUEUE_PARAMETERS),
        ):
            for name, names in declared.items():
                hook = vars(target).get(name)  # get_blocks is hooked only with a KV connector
                if hook is not None:
                    assert tuple(inspect.signature(hook, follow_wrapped=False).parameters) == names, name
                    checked.append(name)
        assert checked == ["record_prefix_cache_stats", "append_n", "popleft_n", "remove", "append", "popleft"]
        scheduler.shutdown()
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_a_hook_whose_parameters_differ_from_the_method_is_refused():
    class Pool:
        def get_new_blocks(self, num_blocks):
            return [None] * num_blocks

    pool = Pool()
    with pytest.raises(TypeError, match=r"Pool.get_new_blocks\(num_blocks\)"):
        hook_methods(pool, {"get_new_blocks": lambda original: lambda count: original(count)})
    assert "get_new_blocks" not in vars(pool)
    hook_methods(pool, {"get_new_blocks": lambda original: lambda *args, **kwargs: original(*args, **kwargs)})
    assert pool.get_new_blocks(2) == [None, None] and "get_new_blocks" in vars(pool)


def _dict_built(target: object, attribute: str) -> bool:
    """Whether CPython built ``target``'s ``__dict__`` (which slows every attribute read on it).

    Without reading ``__dict__`` (that would build it): a built one is among the object's
    referents, holding ``attribute``; inline values are referents one by one instead.
    """
    value = getattr(target, attribute)
    return any(
        type(referent) is dict and referent.get(attribute, referent) is value for referent in gc.get_referents(target)
    )


def test_the_probe_never_builds_the_dict_of_vllms_objects(tiny_model_dir):
    """Found by instruction counts: ``vars(pool)`` once made every later read on it slower.

    Plain vLLM already builds the scheduler's and each request's; the KV-cache manager's, the
    block pool's and its free queue's it does not, and the package must leave them so. Run in a
    fresh interpreter: CPython shares instance-attribute keys per class, so objects that earlier
    tests built (with another scheduler class, say) decide whether a new attribute fits inline.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        plain, ours = fresh.submit(_dicts_built_plain_and_instrumented, tiny_model_dir).result(timeout=300)
    if plain is None:
        pytest.skip("this Python lays out instance attributes differently")
    assert ours == plain, f"dicts built with the package: {ours}, without: {plain}"


def _dicts_built_plain_and_instrumented(tiny_model_dir: str) -> tuple[dict | None, dict | None]:
    class Calibration:
        def __init__(self) -> None:
            self.field = object()

    fresh, built = Calibration(), Calibration()
    vars(built)
    if _dict_built(fresh, "field") or not _dict_built(built, "field"):
        return None, None

    def run(instrumented: bool) -> dict[str, bool]:
        reader, provider = new_reader()
        instrumentor = VLLMKVCacheInstrumentor()
        if instrumented:
            instrumentor.instrument(meter_provider=provider)
        try:
            scheduler = build_scheduler(tiny_model_dir, num_blocks=64, block_size=16)
            requests = [
                make_request(scheduler, num_prompt_tokens=40, max_tokens=6, first_token=100 * i) for i in range(4)
            ]
            for request in requests:
                scheduler.add_request(request)
            stepper = Stepper(scheduler)
            stepper.step()
            stepper.step()
            objects = {
                "scheduler": (scheduler, "kv_cache_manager"),
                "manager": (scheduler.kv_cache_manager, "block_pool"),
                "pool": (scheduler.kv_cache_manager.block_pool, "free_block_queue"),
                "free queue": (scheduler.kv_cache_manager.block_pool.free_block_queue, "num_free_blocks"),
                "request": (requests[0], "request_id"),
            }
            built = {name: _dict_built(target, attribute) for name, (target, attribute) in objects.items()}
            stepper.run_until_idle()
            scheduler.shutdown()
            return built
        finally:
            if instrumented:
                instrumentor.uninstrument()
            provider.shutdown()

    return run(False), run(True)

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# every graph pass checks its contracts (requires / ensures) in the tests (`fxlora.passes.base`)
os.environ.setdefault("FXLORA_CHECK_PASSES", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        max_examples=int(os.environ.get("FXLORA_HYPOTHESIS_EXAMPLES", "30")),
        # the same examples on every run (a CI run decides whether a change lands); set
        # FXLORA_HYPOTHESIS_RANDOM=1 to draw new ones
        derandomize=not os.environ.get("FXLORA_HYPOTHESIS_RANDOM"),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        yield


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test (frame counts start at zero)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cond_kept(monkeypatch):
    """fxlora's ``torch.cond`` code (base-only inference code, ``guard_idle``) switched on as on a
    torch whose dynamo keeps a frame's state updates across a cond (this one does not:
    `fxlora.runtime.cond_support`, checked in tests/runtime/test_cond_support.py). For tests of
    that code in frames that update no Python state."""
    from fxlora.runtime import cond_support

    monkeypatch.setattr(cond_support, "KEEPS_STATE_FROM", (0, 0))


@pytest.fixture
def eager_fallbacks(monkeypatch):
    """Roots (class names) whose graph code could not serve a call (filled as calls run)."""
    from fxlora.runtime.forwards import GraphForward

    calls = []
    original = GraphForward._run_eagerly

    def spy(self, args, kwargs):
        calls.append(type(self.root).__name__)
        return original(self, args, kwargs)

    monkeypatch.setattr(GraphForward, "_run_eagerly", spy)
    return calls

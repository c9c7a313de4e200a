"""`make test` builds DeepSpeed's JIT ops once; a missing compiler is reported, never fails the install."""

import deepspeed.accelerator

from dtrain.ds_ops import prebuild_ops


class FakeBuilder:
    def __init__(self, compatible=True, error=None):
        self.compatible, self.error, self.loads = compatible, error, 0

    def is_compatible(self, verbose=True):
        return self.compatible

    def load(self, verbose=True):
        self.loads += 1
        if self.error:
            raise self.error


class FakeAccelerator:
    def __init__(self, builders):
        self.builders = builders

    def device_name(self):
        return "fake"

    def create_op_builder(self, name):
        return self.builders.get(name)


def test_each_offered_op_is_built_and_failures_are_reported(monkeypatch):
    builders = {
        "Good": FakeBuilder(),
        "Broken": FakeBuilder(error=RuntimeError("no c++ compiler")),
        "Incompatible": FakeBuilder(compatible=False),
    }
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator(builders))
    results = prebuild_ops(("Good", "Broken", "Incompatible", "Missing"))
    assert results["Good"].startswith("built") and builders["Good"].loads == 1
    assert results["Broken"] == "failed: no c++ compiler"
    assert results["Incompatible"] == results["Missing"] == "not offered on fake" and builders["Incompatible"].loads == 0


def test_the_real_cpu_shared_memory_op_loads():
    assert prebuild_ops(("ShareMemCommBuilder",))["ShareMemCommBuilder"].startswith("built")

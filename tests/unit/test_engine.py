"""dtrain.engine's start-up pieces that need no engine."""

import sys

import pytest

from dtrain.engine import DEEPSPEED_MUON_MODULES, NeverBuiltMuon, stand_in_for_deepspeed_muon
from dtrain.errors import ConfigError


@pytest.fixture
def muon_modules_absent():
    """This process's DeepSpeed Muon modules (real, stand-ins or none) are put back after the test."""
    before = {name: sys.modules.pop(name, None) for name in DEEPSPEED_MUON_MODULES}
    yield
    for name, module in before.items():
        sys.modules.pop(name, None)
        if module is not None:
            sys.modules[name] = module


def test_deepspeed_imports_muon_stand_ins_which_no_optimizer_is_and_nothing_can_run(muon_modules_absent):
    import torch

    assert stand_in_for_deepspeed_muon() is True
    # The imports DeepSpeed's ZeRO optimizers make on every path (0.19.8: stage_1_and_2, stage3, bf16_optimizer).
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    assert issubclass(MuonWithAuxAdam, NeverBuiltMuon) and MuonWithAuxAdam.__name__ == "MuonWithAuxAdam"
    assert sys.modules[DEEPSPEED_MUON_MODULES[0]].MuonWithAuxAdam is MuonWithAuxAdam  # one class per name
    assert not isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), MuonWithAuxAdam)
    with pytest.raises(ConfigError, match="optim.name=adamw"):
        MuonWithAuxAdam([])
    with pytest.raises(ConfigError, match="optim.name=adamw"):
        muon_update(torch.ones(2, 2), torch.zeros(2, 2))
    assert not hasattr(sys.modules[DEEPSPEED_MUON_MODULES[0]], "__path__")  # a module, not a package
    assert stand_in_for_deepspeed_muon() is False  # installed once


def test_the_real_muon_modules_on_request(muon_modules_absent, monkeypatch):
    monkeypatch.setenv("DTRAIN_REAL_DEEPSPEED_MUON", "1")
    assert stand_in_for_deepspeed_muon() is False
    assert not any(name in sys.modules for name in DEEPSPEED_MUON_MODULES)


def test_a_real_muon_module_already_imported_is_left_alone(muon_modules_absent):
    real = type(sys)("real_muon")
    sys.modules[DEEPSPEED_MUON_MODULES[1]] = real
    assert stand_in_for_deepspeed_muon() is False
    assert sys.modules[DEEPSPEED_MUON_MODULES[1]] is real and DEEPSPEED_MUON_MODULES[0] not in sys.modules

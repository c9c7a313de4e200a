"""Build DeepSpeed's just-in-time compiled ops ahead of the first test (``make test`` calls this once; the demo needs none).

DeepSpeed compiles some ops the first time a run needs them: on CPU the Adam kernels (optimizer offload) and the
shared-memory collectives, 2-3 minutes on a 2-core machine. Built inside a run, every rank of the first launch
waits on one compile lock under ``~/.cache/torch_extensions``; built here, no run pays for it.

    python -m dtrain.ds_ops
"""

from __future__ import annotations

import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder", "FusedAdamBuilder")


def prebuild_ops(names: tuple[str, ...] = OPS) -> dict[str, str]:
    """Build (or find already built) each DeepSpeed op this accelerator offers; a failure is reported, not raised.

    Returns:
        Op name -> ``built``, ``not offered on <device>`` or ``failed: <error>`` (it will then build on first use).
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    results = {}
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            results[name] = f"not offered on {accelerator.device_name()}"
            continue
        started = time.monotonic()
        try:
            builder.load(verbose=False)
            results[name] = f"built ({time.monotonic() - started:.0f} s)"
        except Exception as error:  # a missing compiler must not fail the install: the op builds on first use
            results[name] = f"failed: {error}"
    return results


if __name__ == "__main__":
    for op, result in prebuild_ops().items():
        print(f"DeepSpeed op {op}: {result}")

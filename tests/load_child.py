"""What the adversarial load tests run in a fresh process: load a file, run it forward and
backward, and report what happened (``from load_child import load_and_run``)."""

import os


def load_and_run(path: str, sentinel: str, shape: tuple[int, ...], trust_pickle: bool = False) -> dict:
    import torch

    from qcd_fx import io
    from qcd_fx.errors import QcdFxError

    report: dict = {"loaded": False, "error": None, "message": "", "unexpected": False, "ran": False}
    try:
        model = io.load(path, trust_pickle=trust_pickle)
        report["loaded"] = True
    except QcdFxError as e:
        report.update(error=type(e).__name__, message=str(e))
    except BaseException as e:  # noqa: BLE001 - anything but a qcd-fx error is a finding
        report.update(error=type(e).__name__, message=str(e), unexpected=True)
    if report["loaded"]:
        try:
            x = torch.randn(shape, requires_grad=True)
            out = model(x)
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if leaves:
                sum(t.float().sum() for t in leaves).backward()
            report["ran"] = True
        except BaseException as e:  # noqa: BLE001
            report["run_error"] = f"{type(e).__name__}: {e}"
    report["sentinel"] = os.path.exists(sentinel)
    return report

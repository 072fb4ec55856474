"""The README's code is run as written: the plain-PyTorch StableLRScheduler block is extracted verbatim."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(heading: str) -> str:
    """The first ```python block after the Markdown heading ``heading`` (and before the next heading)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    section = text[start + 1:]
    following = re.search(r"^## ", section[3:], flags=re.MULTILINE)
    section = section[: following.start() + 3] if following else section
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, f"README section {heading!r} has no python block"
    return match.group(1)


def test_readme_scheduler_snippet_runs_the_guard() -> None:
    code = _python_block_after("## StableLRScheduler (plain PyTorch, Fabric)")
    # The order the docstring prescribes: snapshot, optimizer.step, check_step, observe, step.
    calls = [call for call in ("scheduler.snapshot()", "optimizer.step()", "scheduler.check_step(",
                               "scheduler.observe(train_loss", "scheduler.step()")]
    positions = [code.index(call) for call in calls]
    assert positions == sorted(positions), dict(zip(calls, positions))

    namespace: dict = {"__name__": "readme_snippet"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    scheduler, loader = namespace["scheduler"], namespace["loader"]
    controller = scheduler.controller
    # 5 epochs of len(loader) == 8 steps, one guard check per step.
    assert len(loader) == 8
    assert controller.checks == 40
    assert scheduler.last_epoch == 40
    boost = controller.config.max_lr_boost  # the guard may raise a too-small lr up to this factor
    assert 1e-3 <= controller.stability_factor <= boost
    lr = scheduler.get_last_lr()[0]
    assert math.isfinite(lr) and 0.03 * 0.01 <= lr <= 0.03 * boost
    printed = re.fullmatch(r"lr (\S+)  guard checks (\d+)  C (\S+)  G (\S+)\n", out.getvalue())
    assert printed is not None, out.getvalue()
    assert int(printed.group(2)) == 40
    assert float(printed.group(1)) == float(f"{lr:.4g}")

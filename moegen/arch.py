"""CUDA target names: ``sm_<major><minor>`` with an optional ``a`` (arch-specific features).

Only ASCII spellings that NVRTC takes are accepted: two or three ASCII digits without a leading
zero, 70 or more (``sm_70`` ... ``sm_120a``).  ``str.isdigit`` is not used on purpose: it
accepts ``٩٠`` and ``²``, which ``int()`` then reads or refuses.
"""

from __future__ import annotations

import re

_ARCH = re.compile(r"sm_([1-9][0-9]{1,2})(a?)", re.ASCII)

MIN_COMPUTE_CAPABILITY = 70


def parse_arch(arch: object) -> tuple[int, bool] | None:
    """(compute capability as an int, e.g. 90; True for an ``a`` target) or None if ``arch`` is
    not a CUDA target name moegen accepts."""
    if not isinstance(arch, str):
        return None
    m = _ARCH.fullmatch(arch)
    if m is None or int(m.group(1)) < MIN_COMPUTE_CAPABILITY:
        return None
    return int(m.group(1)), bool(m.group(2))


def is_arch(arch: object) -> bool:
    """True for ``sm_90``, ``sm_90a``, ``sm_100``...; False for ``sm_0090``, ``sm_1000``,
    ``sm_٩٠``, ``sm_²``, ``sm_60`` or anything that is not a str."""
    return parse_arch(arch) is not None

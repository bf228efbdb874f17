"""Child process of tests/test_hostile_inputs.py: read every file of a folder under resource limits.

    python tests/hostile_child.py FOLDER EXTRA_MB CPU_SECONDS

After the imports, the address space is capped at its current size + EXTRA_MB (RLIMIT_AS) and the
CPU time at CPU_SECONDS (RLIMIT_CPU: SIGXCPU ends the process). Prints ``{file name: [outcomes,
CPU seconds, peak resident MB above the start]}`` as JSON (files read one after the other, so the
peak is the largest so far); an exception (MemoryError included) is an outcome ``failure:...``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path

from matbalora.data.dataset import Rejection
from matbalora.data.readers import read_structures


def main() -> None:
    folder, extra_mb, cpu = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    read_structures([])  # the lazy imports of the readers happen before the cap
    import pymatgen.core  # noqa: F401
    import pymatgen.io.cif  # noqa: F401

    pages = int(Path("/proc/self/statm").read_text().split()[0])
    cap = pages * resource.getpagesize() + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    used = int(resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (used + cpu, used + cpu + 5))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    results = {}
    for path in sorted(folder.iterdir()):
        start = time.process_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = read_structures(path)
            outcomes = [obj.reason if isinstance(obj, Rejection) else "accepted" for _, obj in found]
        except BaseException as exc:  # noqa: BLE001 - MemoryError included: reported, not raised
            outcomes = [f"failure:{type(exc).__name__}"]
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        results[path.name] = [outcomes, round(time.process_time() - start, 3), round(peak, 1)]
    print(json.dumps(results))


if __name__ == "__main__":
    main()

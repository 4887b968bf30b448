"""Coverage-guided fuzzing of one parser target with atheris (libFuzzer inside).

    python tests/fuzz/guided.py TARGET FINDINGS_DIR [libFuzzer flags] [CORPUS_DIR...]

grootfs_py is imported instrumented, so libFuzzer sees which branches each
input reaches and keeps the inputs that reach new ones. An input that makes
the target raise is a finding: it is written to FINDINGS_DIR (the input, and
its traceback beside it) and the run goes on, so one run counts them all.
tests/fuzz/fuzz.py runs every target and sums up.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["grootfs_py"]):
    import targets


def main() -> None:
    name, findings = sys.argv[1], sys.argv[2]
    target = targets.TARGETS[name]
    os.makedirs(findings, exist_ok=True)
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:
            # One file per distinct failure (kind and the line that raised it).
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__}:{tb.filename}:{tb.lineno}"
            if key in seen:
                return
            seen.add(key)
            stem = os.path.join(findings, hashlib.sha256(data).hexdigest()[:16])
            with open(stem + ".input", "wb") as f:
                f.write(data)
            with open(stem + ".txt", "w") as f:
                f.write(f"target {name}\n{traceback.format_exc()}")
            print(f"FINDING {key}", file=sys.stderr, flush=True)

    if name == "unpack":
        import sandbox

        corpora = [a for a in sys.argv[3:] if not a.startswith("-")]
        targets.SANDBOX = sandbox.enter([findings, *corpora[:1]])
    atheris.Setup([sys.argv[0], *sys.argv[3:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""The machine and arithmetic a run trained on, from its env.json (the start and every resume)."""

from __future__ import annotations

# the fingerprints of what the tiny step does not run (engine.arithmetic), by env.json key: (a short name for
# reports, what it names in a refused resume). Held by only some runs: compared on a resume and in reports where
# both records have one, never counted as missing (analysis.kinds.OPTIONAL_FIELDS)
PART_FINGERPRINTS = {"arithmetic_kernels": ("kernels", "its fused quantizer kernels"),
                     "arithmetic_residual": ("residual", "its integer residual stream"),
                     "arithmetic_quantizers": ("quantizers", "its non-LSQ quantizers")}  # fmt: skip
# final.json's machine fields and where env.json holds them
MACHINE_ENV_KEYS = {"device": "device_name", "cpu_capability": "cpu_capability", "precision": "precision",
                    "threads": "threads", "world_size": "world_size", "arithmetic": "arithmetic",
                    **{k: k for k in PART_FINGERPRINTS}}  # fmt: skip


# the host CPU's fields: no part of a GPU run's arithmetic (its kernels run on the GPU; the fingerprint says which),
# so a GPU part of a run holds NOT_APPLICABLE there and one GPU's runs pair whatever host threads they had
HOST_FIELDS = ("cpu_capability", "threads")
NOT_APPLICABLE = "n/a"


def run_machine(env: dict) -> dict:
    """The machine a run trained on, from its env.json: the start and every resume. A field that changed on a
    resume (a run resumed on another kind of machine) holds each value in order of first use joined by " + "
    (e.g. "Intel(R) Xeon(R) Processor + AMD EPYC"), so the run is of neither kind and pairs only with a run of
    the same sequence. A field env.json lacks (older records) is None; the host CPU's fields of a part that trained
    on a GPU are NOT_APPLICABLE."""
    out = {}
    for field, key in MACHINE_ENV_KEYS.items():
        seen = []
        for part in (env, *env.get("resumes", [])):
            gpu = str(part.get("device", "")).startswith("cuda")
            value = NOT_APPLICABLE if gpu and field in HOST_FIELDS else part.get(key)
            if value is not None and value not in seen:
                seen.append(value)
        out[field] = None if not seen else seen[0] if len(seen) == 1 else " + ".join(map(str, seen))
    return out

"""The environment variables fastar reads, each validated where it is read: a bad value is a
ValueError that names the variable, the value and what is accepted, never a crash deeper down
(FASTAR_SHM_CHUNK_MB=0 once divided by zero in C++)."""
from __future__ import annotations

import os

# name -> what it sets (for messages and docs/reliability.md)
VARIABLES = {
    "FASTAR_SHM_CHUNK_MB": "chunk size of the staged shared-memory path, MiB (default 4)",
    "FASTAR_LOCAL_SIZE": "ranks per node, overriding torchrun's LOCAL_WORLD_SIZE",
    "FASTAR_TRAIN_WRAP": "fastar.train's gradient averaging: fastar or ddp",
    "FASTAR_SINGLE_COPY": "one node's ranks read each other's buffers directly (process_vm_readv) for "
                          "allreduces from policy.Tuning.single_copy_min_bytes: 1 (default: where the kernel "
                          "allows it) or 0 (never: the shared-memory slots)",
    "FASTAR_BACKEND_VALIDATE": "the \"fastar\" torch.distributed backend's shape and dtype check (a header "
                               "exchanged before each native collective): 1 (default) or 0 (off); read when a "
                               "backend's process group is created",
}


def _bad(name: str, raw: str, expected: str) -> ValueError:
    return ValueError(f"fastar: environment variable {name}={raw!r} is not valid: expected {expected}. "
                      f"Fix or unset it ({name}: {VARIABLES.get(name, '')}).")


def env_number(name: str, default: float, low: float, high: float, integer: bool = False) -> float | int:
    """The variable as a number in [low, high] (an int if integer), or default when unset/empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    expected = f"{'an integer' if integer else 'a number'} from {low:g} to {high:g}"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise _bad(name, raw, expected) from None
    if not (low <= value <= high):  # also rejects nan
        raise _bad(name, raw, expected)
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        raise _bad(name, raw, " or ".join(repr(c) for c in choices))
    return raw


def shm_chunk_bytes() -> int:
    """FASTAR_SHM_CHUNK_MB in bytes: 64 KiB to 1 GiB, default 4 MiB."""
    return int(env_number("FASTAR_SHM_CHUNK_MB", 4.0, 1 / 16, 1024) * (1 << 20))


def local_size() -> int | None:
    return env_number("FASTAR_LOCAL_SIZE", None, 1, 1 << 16, integer=True)


def train_wrap() -> str | None:
    return env_choice("FASTAR_TRAIN_WRAP", ("fastar", "ddp"))


def backend_validate() -> bool:
    """FASTAR_BACKEND_VALIDATE: "1" (default) or "0"; read by each FastarBackend as it is created."""
    return env_choice("FASTAR_BACKEND_VALIDATE", ("0", "1"), "1") == "1"


def single_copy() -> bool:
    """FASTAR_SINGLE_COPY: "1" (default) or "0". Read when a communicator is made; a node uses the
    single-copy protocol only when every local rank wants it and the probe found it allowed."""
    return env_choice("FASTAR_SINGLE_COPY", ("0", "1"), "1") == "1"

"""Every test run sees 8 simulated CPU devices: the flag must be set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
ASSETS = SHARED / "assets"


def require_shared(*parts: str) -> pathlib.Path:
    """Path under ../shared, or skip with the reason (a user's fresh clone has no ../shared; CI has it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the test assets live in ../shared beside the checkout")
    return path

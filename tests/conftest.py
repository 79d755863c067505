"""Every test run sees 8 simulated CPU devices: the flag must be set before JAX is imported."""

import os

# A process that already chose its device count keeps it (the multi-host tests' workers import this file for
# mesh_of and run with 4 devices each).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
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


@pytest.fixture
def highest_precision():
    """Float32 parity tests run their matmuls at "highest": CPU matmuls are float32 anyway, and this also pins any
    backend that would use tf32/bf16 passes. Use with `pytestmark = pytest.mark.usefixtures("highest_precision")`."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def mesh_of(text: str):
    """The mesh `MeshConfig.parse(text)` describes, over the first devices it needs of the 8 simulated ones."""
    import math

    import jax

    from sharding.mesh import MeshConfig, make_mesh

    cfg = MeshConfig.parse(text)
    return make_mesh(cfg, jax.devices()[:math.prod(cfg.sizes.values())])

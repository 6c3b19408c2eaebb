"""podman for the image tests: its options on these machines, and the local base image, cached.

Public base images cannot be pulled here, so the tests build the shipped
Dockerfile with ``--build-arg BASE=`` a Debian bookworm root file system of
our own (``debootstrap --variant=minbase`` with python3 and python3-venv,
about a minute), imported into podman's storage once and found there by name
on later runs.

podman runs with ``--runtime=runc --cgroup-manager=cgroupfs`` (crun and
systemd's cgroups are not available in these machines' sandbox) and a
storage of the tests' own (``--root``), so that no other use of podman on the
machine meets a driver it did not choose. The driver is overlay where the
kernel lets podman mount it, else vfs: vfs copies the whole file system for
every layer, and on these machines it made the image's build 4-25 times
slower (a change of code: 10 s against 44-270 s; nothing changed: 3 s
against 20-35 s).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

TEST_STORAGE = Path("/var/lib/containers/candle-gateway-tests")
TEST_RUNROOT = Path("/run/containers/candle-gateway-tests")
BASE_IMAGE = "localhost/candle-gateway-test-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the public python:3.11-slim-bookworm base gives the Dockerfile: python3 with venv.
BASE_PACKAGES = "python3,python3-venv"


def podman_path() -> str | None:
    return shutil.which("podman")


def _options(driver: str) -> tuple[str, ...]:
    return (
        "--runtime=runc",
        "--cgroup-manager=cgroupfs",
        f"--storage-driver={driver}",
        f"--root={TEST_STORAGE / driver}",
        f"--runroot={TEST_RUNROOT / driver}",
    )


@functools.cache
def podman_options() -> tuple[str, ...]:
    """overlay if podman can build a layer on a layer with it here (an overlay mount), else vfs."""
    overlay = _options("overlay")
    with tempfile.TemporaryDirectory(prefix="candle-overlay-probe-") as context:
        Path(context, "probe").write_text("probe\n")
        Path(context, "Dockerfile").write_text("FROM scratch\nCOPY probe /probe\nCOPY probe /probe-again\n")
        probe = subprocess.run(
            ["podman", *overlay, "build", "--tag", "localhost/candle-gateway-overlay-probe", context],
            capture_output=True,
            check=False,
            timeout=120,
        )
    return overlay if probe.returncode == 0 else _options("vfs")


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    """One podman command with this machine's options; its output captured as text."""
    return subprocess.run(
        ["podman", *podman_options(), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        **kwargs,
    )


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base_image() -> str:
    """The local bookworm base's name, made with debootstrap and imported the first time only."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    with tempfile.TemporaryDirectory(prefix="candle-base-") as workdir:
        root = Path(workdir) / "root"
        subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root), DEBIAN_MIRROR],
            check=True,
            capture_output=True,
            timeout=900,
        )
        # apt's package lists and downloaded .debs are no part of a base image.
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE, stdin=tar.stdout)
        assert tar.wait() == 0
    return BASE_IMAGE


def build_mounts() -> list[str]:
    """The host's CA certificates (and pip's configuration, where there is one) for pip inside a build."""
    mounts = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    if os.path.exists("/etc/pip.conf"):
        mounts += ["-v", "/etc/pip.conf:/etc/pip.conf:ro"]
    return mounts

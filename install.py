"""Dependency installer, run by two hosts with different rules.

* Stable-Diffusion-WebUI (A1111 / Forge): ``launch.py`` runs this file at every start with ``launch``
  importable. Packages that are missing are installed with ``launch.run_pip`` (which is a no-op under
  ``--skip-install``). Packages that are present are never reinstalled, upgraded or downgraded, even when
  older than we would like: the WebUI pins its own versions (Forge pins diffusers 0.31) and changing them
  could break it, so we only warn. torch is never touched.
* ComfyUI-Manager (or anyone running ``python install.py``): ``import launch`` fails. The Manager has
  already installed ``requirements.txt``; this script then does nothing and exits 0.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys

# (distribution name, import name, minimum version) -- keep in step with requirements.txt (torch excluded).
REQUIREMENTS = (
    ("diffusers", "diffusers", "0.30"),
    ("peft", "peft", "0.12"),
    ("safetensors", "safetensors", "0.4"),
)


def _version_tuple(v: str):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _webui_launch():
    """The WebUI's ``launch`` module, or None when not running under the WebUI."""
    try:
        import launch  # noqa: F401  (the WebUI's launch.py; absent under ComfyUI / plain python)
    except Exception:
        return None
    if not (hasattr(launch, "is_installed") and hasattr(launch, "run_pip")):
        return None  # some other module called `launch`
    return launch


def install_with(launch) -> list:
    """Install what is missing through the WebUI's pip wrapper; returns the pip commands issued."""
    issued = []
    for dist, module, minimum in REQUIREMENTS:
        if launch.is_installed(dist) or launch.is_installed(module):
            try:
                have = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            if _version_tuple(have) < _version_tuple(minimum):
                print(f"LowBit: {dist} {have} is older than the tested minimum {minimum}; leaving the WebUI's "
                      f"version alone. If LowBit fails, run: {sys.executable} -m pip install \"{dist}>={minimum}\"")
            continue
        cmd = f'install "{dist}>={minimum}"'
        launch.run_pip(cmd, f"{dist} for LowBit")
        issued.append(cmd)
    return issued


def main() -> int:
    launch = _webui_launch()
    if launch is None:
        print("LowBit install.py: not running inside the Stable Diffusion WebUI; nothing to install here "
              "(ComfyUI-Manager installs requirements.txt).")
        return 0
    install_with(launch)
    return 0


if __name__ == "__main__":  # both hosts run this file as a subprocess; importing it does nothing
    sys.exit(main())

"""The ``lowbit`` command line (also ``python -m lowbit``).

  lowbit demo            quantize the embedded default model (W8A8, W4A8), compare with full precision
  lowbit quantize ...    quantize the default model (or a diffusers UNet folder) and save it
  lowbit ui              serve the gradio app on localhost
"""
from __future__ import annotations

import argparse
import os
import sys

# Spin-waiting OpenMP threads make 2-core machines up to 5x slower when shared (CPU_FACTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .quant.errors import ConfigError  # noqa: E402  (after the OpenMP setting: this imports torch)


def _cmd_demo(a):
    from .recipes import demo, format_table

    res = demo(a.out, n_eval=a.samples, steps=a.steps, bits_list=tuple(a.bits), methods=tuple(a.methods))
    print(format_table(res["rows"]))
    print(f"\nside-by-side grid (rows: full precision, then per format: quantized, |difference|): {res['grid']}")
    return 0


def _cmd_quantize(a):
    from .quant import QuantConfig, save, timestep_aware_subset
    from .recipes import METHODS, build, default_setup, record_calibration

    QuantConfig.preset(a.bits)  # cheap checks before any work
    if a.method not in METHODS:
        raise ConfigError(f"unknown method {a.method!r}; choose one of {sorted(METHODS)}")
    if os.path.exists(a.output) and not a.overwrite:
        raise FileExistsError(f"{a.output} already exists; choose another name or pass --overwrite")
    setup = default_setup()
    if a.unet:
        from diffusers import UNet2DModel

        setup.unet = UNet2DModel.from_pretrained(a.unet).eval()
    calls = timestep_aware_subset(record_calibration(setup, n_samples=a.calib_samples, progress="tqdm"), a.calib_steps)
    b = build(setup, a.method, a.bits, calls)
    save(b.model, a.output, overwrite=a.overwrite)
    print(f"saved {a.bits} ({a.method}) to {a.output} in {b.seconds:.1f} s")
    return 0


def _cmd_ui(a):
    from .ui.app import launch

    launch(host=a.host, port=a.port)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize the embedded default model and compare it with full precision")
    d.add_argument("--out", default="out", help="folder for the PNG grid (default: out)")
    d.add_argument("--samples", type=int, default=200, help="samples per model for FID/accuracy (default 200)")
    d.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    d.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"], help="formats (default: W8A8 W4A8)")
    d.add_argument("--methods", nargs="+", default=["naive"], help="methods (default: naive); see recipes.METHODS")
    d.set_defaults(fn=_cmd_demo)
    q = sub.add_parser("quantize", help="quantize the default model (or a diffusers UNet folder) and save it")
    q.add_argument("output", help="output .safetensors path")
    q.add_argument("--bits", default="W4A8")
    q.add_argument("--method", default="recon+ptqd+vsc")
    q.add_argument("--unet", default=None, help="diffusers UNet2DModel folder (default: the embedded model)")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--calib-steps", type=int, default=10)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=_cmd_quantize)
    u = sub.add_parser("ui", help="serve the gradio app on localhost")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7870)
    u.set_defaults(fn=_cmd_ui)
    a = p.parse_args(argv)
    from .quant.errors import LowBitError

    try:
        return a.fn(a)
    except (LowBitError, FileExistsError) as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

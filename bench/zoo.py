"""Quality on every zoo model, with the library's defaults: one table, one JSON file.

    python -m lowbit.bench.zoo [--models digits rgb latent_text dit_flow] [--samples 1000]
                               [--bits W8A8 W4A8 W4A4] [--out bench/results/zoo.json]
                               [--sampler euler euler_ancestral] [--eta 1.0]   (flow models: dit_flow)

For each zoo model (``lowbit.models.zoo``): full-precision samples (deterministic sampler, fixed seeds), then for
each bit-width the methods of the ladder, each built by ``lowbit.quant.pipeline.run`` with its defaults from the
same recorded calibration calls (full-precision sampling runs on other seeds). Per row: FID in the model's own
feature space and its ratio to full precision, class accuracy where the model has classes, the mean paired
PSNR of each sample against the full-precision sample from the same noise, and the quantization time.
Nothing is tuned per model: every row uses ``PipelineConfig.for_method(method, bits)`` unchanged.

``--sampler`` (rectified-flow models only): sample every row with each of the listed flow samplers
(``quant.sampling.sample_flow``: "euler", "euler_ancestral"), each against its own full-precision reference from
the same seed (the ancestral noise continues that seed's generator, so the pairing holds). A ``+vsc`` method
gives two rows from one quantized model: the method without VSC, then with it (PTQD variance calibration in
the sampler), so the VSC comparison is paired. With ``--sampler``, a +ptqd method also gives the rows of the same
quantized model with PTQD switched off and (for +vsc) without VSC: one quantization serves the paired rows
(PTQD only adds statistics and an output hook); VSC rows are skipped for euler, where VSC is a no-op. Rows of
+ptqd methods record, summed over steps, the per-element
variance the PTQD residual of the velocity adds to x and no smaller injected noise absorbs (``residual_var_left``;
each step's share before later steps rescale it) and the injected noise variance VSC removed
(``noise_var_removed``) (docs/FLOW_MATCHING.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch

LADDER = {
    "W8A8": ("naive", "lp", "lp+ptqd"),
    "W4A8": ("naive", "lp", "recon", "recon+ptqd"),
    "W4A4": ("naive", "recon+ptqd", "efficientdm", "efficientdm+ptqd"),
}
# the rows the targets are about: the default path at W8A8, PTQD at W4A8, PTQD and EfficientDM at W4A4
QUICK = {"W8A8": ("lp",), "W4A8": ("recon+ptqd",), "W4A4": ("recon+ptqd", "efficientdm", "efficientdm+ptqd")}
TARGETS = {"W8A8": 1.05, "W4A8": 1.15, "W4A4": 1.30}  # FID ratio to full precision (README, issue 12)
PSNR_TARGET_W8A8 = 45.0


def paired_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the PSNR of ``a`` against ``b`` (images in [-1, 1], data range 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def record_calls(m, n: int, seed: int, steps: int):
    from ..quant import CallRecorder

    with CallRecorder(m.denoiser) as rec:
        m.sample(m.denoiser, n, seed, steps=steps)
    return rec.calls


def calibration(m, a, steps: int):
    """The calibration calls every zoo row is built from: ``a.calib_samples`` full-precision sampling runs on seeds
    other than the rows' (``a.seed + 1000``), ``a.calib_steps`` timesteps kept (timestep-aware)."""
    from ..quant import timestep_aware_subset

    return timestep_aware_subset(record_calls(m, a.calib_samples, a.seed + 1000, steps), a.calib_steps)


def build(m, calib, method: str, bits: str, a, **over):
    """One row's quantized model: ``PipelineConfig.for_method(method, bits)`` with the library's defaults, except
    the run-wide ``--recon-iters`` (the same for every model) and the given overrides."""
    from ..quant import PipelineConfig, ReconConfig, pipeline

    if a.recon_iters is not None:
        over["recon"] = ReconConfig(weight_iters=a.recon_iters)
    return pipeline.run(m.denoiser, calib, PipelineConfig.for_method(method, bits, **over), progress=None)


def _table_key(model):
    """The map from the timestep a model call carries to its PTQD table key (the profile's ``table_key``)."""
    from ..quant.context import get_context
    from ..quant.profiles import get_profile

    ctx = get_context(model)
    return float if ctx is None else get_profile(ctx.profile).table_key


def _report_sums(report) -> dict:
    return dict(residual_var_left=sum(r["residual_var_left"] for r in report),
                noise_var_removed=sum(r["noise_before"] ** 2 - r["noise_after"] ** 2 for r in report))


def guided_residual(m, qmodel, calls, guidance: float, every: int = 3) -> list:
    """Per recorded call (every ``every``-th): variance of the quantized (PTQD-corrected) output's error against
    full precision for the rows (``raw``) and for the guided combination e_u + g(e_c - e_u) (``guided``), and the
    correlation of the branches' errors. Calls must hold [cond; uncond] in one batch (the zoo's samplers)."""
    from ..models.zoo.common import unwrap
    from ..quant.ptqd import get_stats

    st, out = get_stats(qmodel), []
    with torch.no_grad():
        for c in calls[::every]:
            args, kw = c.to("cpu", torch.float32)
            e = unwrap(qmodel(*args, **kw)).float() - unwrap(m.denoiser(*args, **kw)).float()
            ec, eu = e.chunk(2)
            out.append(dict(t=c.t, fitted=None if st is None else st.residual_var_at(c.t), raw=float(e.var()),
                            guided=float((eu + guidance * (ec - eu)).var()),
                            corr=float(torch.corrcoef(torch.stack([ec.flatten(), eu.flatten()]))[0, 1])))
    return out


def run_model(name: str, a, log=print) -> list:
    from ..models.zoo import load
    from ..quant import pipeline
    from ..quant.context import get_context
    from ..quant.ptqd import get_stats

    m = load(name)
    steps = a.steps or m.default_steps
    samplers = a.sampler or [None]
    if a.sampler and getattr(m, "prediction", None) != "flow":
        raise SystemExit(f"--sampler is for rectified-flow zoo models; {name} samples with its own sampler")

    def skw(sampler, var_fn=None, report=None, vsc=True):
        return {} if sampler is None else dict(sampler=sampler, eta=a.eta, var_fn=var_fn, report=report, vsc=vsc)

    def tag(sampler):
        return "" if sampler is None else f" [{sampler}]"

    rows = []
    fp = {}
    for sampler in samplers:
        t0 = time.perf_counter()
        fp_img, labels = m.sample(m.denoiser, a.samples, a.seed, steps=steps, **skw(sampler))
        fp_s = time.perf_counter() - t0
        fp_met = m.metrics(fp_img, labels)
        fp[sampler] = (fp_img, labels, fp_met)
        rows.append(dict(model=name, bits="fp32", method="full precision", sampler=sampler, fid=fp_met["fid"],
                         fid_x=1.0, acc=fp_met.get("acc"), psnr=math.inf, quant_s=0.0, sample_s=fp_s))
        log(f"[{name}]{tag(sampler)} full precision: FID {fp_met['fid']:.3f} acc {fp_met.get('acc')} ({fp_s:.0f} s)")
    calib = calibration(m, a, steps)
    g = getattr(m, "default_guidance", 1.0)
    check_calls = record_calls(m, a.guided_residual, a.seed + 5000, steps) if a.guided_residual and g != 1.0 else None
    for bits in a.bits:
        for method in (a.methods or (QUICK if a.quick else LADDER)[bits]):
            t0 = time.perf_counter()
            try:
                over = dict(precision=a.precision) if a.precision else {}
                res = build(m, calib, method, bits, a, deploy=a.deployed, **over)
            except Exception as exc:  # a failing method is a row, not the end of the table
                rows.append(dict(model=name, bits=bits, method=method, error=f"{type(exc).__name__}: {exc}"))
                log(f"[{name}] {bits} {method}: FAILED {type(exc).__name__}: {exc}")
                continue
            qs = time.perf_counter() - t0
            kept = [dict(name=r["name"], mode=r["mode"], reason=r["reason"]) for r in res.info.get("precision", [])]
            # the PTQD residual variance (any +ptqd method) feeds the per-step report; only +vsc applies VSC
            key, rv = _table_key(res.model), pipeline.get_stats_var(res.model)
            var_fn = None if rv is None else (lambda s, f=rv, k=key: f(k(s)))
            vsc_method = res.var_fn is not None
            ctx = get_context(res.model)
            ptqd_on = bool(ctx is not None and getattr(ctx, "ptqd_active", False))
            variants = [(method, vsc_method, ptqd_on)]
            if a.sampler and ptqd_on:  # paired rows from the same quantized model (docs/FLOW_MATCHING.md)
                base = method.replace("+vsc", "").replace("+ptqd", "")
                variants = [(base, False, False), (method.replace("+vsc", ""), False, True)] + \
                    ([(method, True, True)] if vsc_method else [])
            st = get_stats(res.model)
            ptqd_tables = None if st is None else dict(t=st.t.tolist(), k=st.k.tolist(), m=st.m.tolist(),
                                                       var=st.var.tolist(), bias_abs=st.bias.abs().mean(1).tolist())
            gres = guided_residual(m, res.model, check_calls, g) if check_calls and ptqd_on else None
            if gres:
                log(f"[{name}] {bits} {method}: guided/raw residual variance " +
                    " ".join(f"{r['t']:.0f}:{r['guided'] / max(r['raw'], 1e-30):.1f}" for r in gres))
            for sampler in samplers:
                fp_img, labels, fp_met = fp[sampler]
                for label, vsc, on in variants:
                    if vsc and sampler == "euler":  # deterministic: VSC is a no-op (tests/quant/test_ptqd_flow.py)
                        continue
                    if ctx is not None and ptqd_on:
                        ctx.ptqd_active = on
                    rep = [] if sampler is not None else None
                    t0 = time.perf_counter()
                    img, _ = m.sample(res.model, a.samples, a.seed, steps=steps, **skw(sampler, var_fn, rep, vsc))
                    ss = time.perf_counter() - t0
                    met = m.metrics(img, labels)
                    row = dict(model=name, bits=bits, method=label + (f" ({a.precision})" if a.precision else ""),
                               sampler=sampler, fid=met["fid"], fid_x=met["fid"] / fp_met["fid"],
                               acc=met.get("acc"), psnr=paired_psnr(img, fp_img), quant_s=qs, sample_s=ss, kept=kept)
                    if gres and on:
                        row["guided_residual"] = gres
                    if rep:
                        row.update(_report_sums(rep) if on else {}, vsc=vsc, ptqd_tables=ptqd_tables if on else None)
                    rows.append(row)
                    log(f"[{name}]{tag(sampler)} {bits} {label}: FID {row['fid']:.3f} (x{row['fid_x']:.2f}) PSNR "
                        f"{row['psnr']:.1f} dB acc {row['acc']} quantized in {qs:.0f} s"
                        + (f" residual var left {row['residual_var_left']:.2e}, noise var removed "
                           f"{row['noise_var_removed']:.2e}" if "residual_var_left" in row else ""))
            del res
    return rows


def format_table(rows) -> str:
    out = ["| model | bits | method | FID (x FP) | PSNR vs FP dB | class acc | quantize s |",
           "|---|---|---|---|---|---|---|"]
    if any(r.get("sampler") for r in rows):  # flow samplers: the sampler is part of the method column
        rows = [dict(r, method=f"{r['method']} [{r['sampler']}]") if r.get("sampler") else r for r in rows]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['bits']} | {r['method']} | failed: {r['error'][:60]} | | | |")
            continue
        acc = "-" if r.get("acc") is None else f"{r['acc']:.3f}"
        ps = "-" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        out.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['fid']:.3f} ({r['fid_x']:.2f}) | {ps} | {acc} | "
                   f"{r['quant_s']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    from ..models.zoo import ZOO_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ZOO_NAMES), choices=list(ZOO_NAMES))
    p.add_argument("--bits", nargs="+", default=list(LADDER), choices=list(LADDER))
    p.add_argument("--methods", nargs="+", default=None, help="override the ladder (pipeline method names)")
    p.add_argument("--quick", action="store_true", help="only the rows the targets are about: " +
                   "; ".join(f"{b}: {', '.join(m)}" for b, m in QUICK.items()))
    p.add_argument("--samples", type=int, default=1000, help="samples per row (FID and paired PSNR)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: each model's own)")
    p.add_argument("--calib-samples", type=int, default=32, help="full-precision calibration runs")
    p.add_argument("--calib-steps", type=int, default=10, help="timesteps kept from them (timestep-aware)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon-iters", type=int, default=None,
                   help="AdaRound steps per block (default: ReconConfig's, 2000; the same for every model)")
    p.add_argument("--precision", choices=["measured", "rules"], default=None,
                   help="per-layer precision (default: the library's, measured)")
    p.add_argument("--deployed", action="store_true", help="sample with the integer kernels (default: fake-quant, "
                   "the same function up to float summation order; faster for these tiny models on a CPU)")
    p.add_argument("--sampler", nargs="+", default=None, choices=["euler", "euler_ancestral"],
                   help="rectified-flow models: sample every row with each of these flow samplers (default: the "
                   "model's own, Euler); a +vsc method then also gives its row without VSC")
    p.add_argument("--eta", type=float, default=1.0, help="noise amount of euler_ancestral (1 = full ancestral)")
    p.add_argument("--guided-residual", type=int, default=0, metavar="N",
                   help="+ptqd rows of guided models: also measure the corrected output's residual variance per "
                   "call, raw and guided, on N more full-precision trajectories (docs/FLOW_MATCHING.md)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zoo.json"))
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the table of earlier runs' JSON files and exit (no sampling)")
    a = p.parse_args(argv)
    if a.table:
        rows = []
        for path in a.table:
            with open(path) as f:
                rows += json.load(f)["rows"]
        print(format_table(rows))
        return rows
    if a.samples < 1:
        p.error("--samples must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    rows = []
    for name in a.models:
        rows += run_model(name, a, log=lambda s: print(s, flush=True))
        with open(a.out, "w") as f:  # after every model: a long run leaves its finished part
            json.dump(dict(argv=argv if argv is not None else __import__("sys").argv[1:], samples=a.samples,
                           deployed=a.deployed, sampler=a.sampler, eta=a.eta, torch=torch.__version__,
                           machine=platform.machine(),
                           date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()

"""The LowBit gradio app: ``build_blocks(backend)`` for any host, ``launch(host, port)`` for ``lowbit ui``.

The same Blocks is the WebUI's "LowBit" tab (``scripts/lowbit_webui.py`` with a ``ui.webui.ForgeBackend``) and
the stand-alone app on the embedded default model (``DefaultModelBackend``). The app holds no model logic:
each button parses its inputs, calls one backend method and shows its status line; errors (settings out of
range, a file that exists, a stopped job) appear in the status box and as a toast, never only in the console.
Works with gradio 4.x (Forge pins 4.40) and 6.x; the differences live in ``compat.py``.
"""
from __future__ import annotations

import logging

import gradio as gr

from . import compat
from .backend import BITS_CHOICES, LIMITS, Backend, DefaultModelBackend, to_pil_row, user_message

log = logging.getLogger("lowbit.ui")

ELEM = "lowbit"  # elem_id prefix (the browser test and style.css use these ids)


def _gr_report(progress):
    """Backend progress ``report(fraction, text)`` -> gr.Progress."""
    if progress is None:
        return None

    def report(fraction, text):
        try:
            progress(fraction, desc=text)
        except Exception:  # a progress display must never break the job
            pass

    return report


def _fail(exc: BaseException) -> str:
    msg = user_message(exc)
    if not msg.startswith("Error: unexpected"):
        log.info("LowBit UI: %s", msg)
    else:
        log.exception("LowBit UI: unexpected error")
    compat.warn(msg)
    return msg


def _num(key, value, label=None, info=None):
    lab, lo, hi = LIMITS[key]
    return gr.Number(value=value, precision=0, label=label or f"{lab[0].upper()}{lab[1:]} ({lo}-{hi})", info=info,
                     elem_id=f"{ELEM}_{key}")


def build_blocks(backend: Backend) -> gr.Blocks:
    """The LowBit UI on ``backend``."""
    slider_cls = compat.image_slider_class()
    methods = backend.methods()
    default_method = backend.default_method if backend.default_method in methods else methods[0]
    dcs, dst = backend.default_calib()

    with gr.Blocks(title="LowBit", analytics_enabled=False) as demo:
        gr.Markdown(f"### {backend.title}\nQuantize the UNet to low bits (PTQD correction, EfficientDM "
                    "fine-tuning), compare it with full precision on the same seed, save and load it.")
        with gr.Row():
            status = gr.Textbox(value=backend.status(), label="Status", interactive=False, lines=2, scale=5,
                                elem_id=f"{ELEM}_status")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id=f"{ELEM}_stop")

        with gr.Tab("Quantize & compare", elem_id=f"{ELEM}_tab_quantize"):
            with gr.Row():
                bits = gr.Dropdown(list(BITS_CHOICES), value=backend.default_bits, label="Bits",
                                   info="W = weight bits, A = activation bits (A16: weights only)",
                                   elem_id=f"{ELEM}_bits")
                method = gr.Dropdown(methods, value=default_method, label="Method",
                                     info="naive = min/max PTQ; recon = block reconstruction; +ptqd = noise "
                                          "correction; +vsc = variance calibration; +mixed = per-step bits",
                                     elem_id=f"{ELEM}_method")
                calib_samples = _num("calib_samples", dcs, info="sampling runs recorded for calibration")
                calib_steps = _num("calib_steps", dst, info="sampling steps of each calibration run")
            quantize_btn = gr.Button("Quantize", variant="primary", elem_id=f"{ELEM}_quantize")
            gr.Markdown("#### Compare full precision with the quantized UNet (same seed)")
            with gr.Row():
                subject = gr.Textbox(value=backend.subject_default, label=backend.subject_label, scale=3,
                                     elem_id=f"{ELEM}_subject")
                seed = _num("seed", 1)
                steps = _num("steps", backend.default_compare_steps)
                count = _num("count", 4 if not backend.show_size else 1)
                size = _num("size", 64, label="Width and height (64-2048)") if backend.show_size else None
            compare_btn = gr.Button("Compare", variant="primary", elem_id=f"{ELEM}_compare")
            with gr.Row():
                if slider_cls is not None:
                    slider = slider_cls(label="full precision | quantized (drag)", type="pil",
                                        elem_id=f"{ELEM}_slider")
                    image_outputs = [slider]
                else:
                    fp_img = gr.Image(label="full precision", type="pil", interactive=False, elem_id=f"{ELEM}_fp")
                    q_img = gr.Image(label="quantized", type="pil", interactive=False, elem_id=f"{ELEM}_q")
                    image_outputs = [fp_img, q_img]
                diff_img = gr.Image(label="difference (white = largest)", type="pil", interactive=False,
                                    elem_id=f"{ELEM}_diff")
            metrics = gr.Textbox(label="PSNR / SSIM", interactive=False, lines=3, elem_id=f"{ELEM}_metrics")

        with gr.Tab("PTQD calibration", elem_id=f"{ELEM}_tab_ptqd"):
            gr.Markdown("Measure the quantization noise against full precision on the calibration calls and "
                        "correct it at every step (bias and correlation correction; variance calibration "
                        "where the sampler supports it).")
            with gr.Row():
                bc = gr.Checkbox(value=True, label="bias correction", elem_id=f"{ELEM}_bc")
                cc = gr.Checkbox(value=True, label="correlation correction", elem_id=f"{ELEM}_cc")
                vsc = gr.Checkbox(value=True, label="variance calibration", elem_id=f"{ELEM}_vsc")
            ptqd_btn = gr.Button("Run PTQD calibration", variant="primary", elem_id=f"{ELEM}_ptqd")

        with gr.Tab("EfficientDM fine-tune", elem_id=f"{ELEM}_tab_finetune"):
            gr.Markdown("Data-free distillation of the quantized UNet from the full-precision one (QALoRA + "
                        "per-step activation scales); the adapters are merged into the integer weights.")
            with gr.Row():
                ft_steps = _num("ft_steps", 50)
                ft_rank = _num("ft_rank", 8)
                ft_batch = _num("ft_batch", 4)
            ft_btn = gr.Button("Fine-tune", variant="primary", elem_id=f"{ELEM}_finetune")

        with gr.Tab("Save / load", elem_id=f"{ELEM}_tab_files"):
            gr.Markdown(f"Files live in `{backend.models_dir}`; existing files are never overwritten.")
            with gr.Row():
                save_name = gr.Textbox(label="File name", placeholder="my-unet-w4a8", elem_id=f"{ELEM}_save_name")
                save_btn = gr.Button("Save", elem_id=f"{ELEM}_save")
            with gr.Row():
                saved = gr.Dropdown(backend.list_saved(), value=None, label="Saved quantized UNets",
                                    elem_id=f"{ELEM}_saved")
                refresh_btn = gr.Button("Refresh", elem_id=f"{ELEM}_refresh")
                load_btn = gr.Button("Load", elem_id=f"{ELEM}_load")

        # ---- events ----------------------------------------------------------------------------------------
        def on_quantize(b, m, cs, cst, progress=gr.Progress()):
            try:
                return backend.quantize(b, m, cs, cst, progress=_gr_report(progress))
            except Exception as exc:
                return _fail(exc)

        def on_ptqd(b1, b2, b3, cs, cst, progress=gr.Progress()):
            try:
                return backend.ptqd(b1, b2, b3, cs, cst, progress=_gr_report(progress))
            except Exception as exc:
                return _fail(exc)

        def on_fine_tune(s, r, bs, cs, cst, progress=gr.Progress()):
            try:
                return backend.fine_tune(s, r, bs, cs, cst, progress=_gr_report(progress))
            except Exception as exc:
                return _fail(exc)

        n_img = len(image_outputs)

        def compare(subj, sd, st, n, sz, progress):
            try:
                c = backend.compare(subj, sd, st, n, sz, progress=_gr_report(progress))
            except Exception as exc:
                return [gr.update()] * (n_img + 2) + [_fail(exc)]
            fp, q = to_pil_row(c.fp), to_pil_row(c.q)
            imgs = [(fp, q)] if n_img == 1 else [fp, q]
            return imgs + [to_pil_row(c.diff), c.text, backend.status()]

        # gradio finds gr.Progress by parameter position, so no *args/optional inputs: one handler per layout.
        if size is None:
            def on_compare(subj, sd, st, n, progress=gr.Progress()):
                return compare(subj, sd, st, n, None, progress)
        else:
            def on_compare(subj, sd, st, n, sz, progress=gr.Progress()):
                return compare(subj, sd, st, n, sz, progress)

        def on_save(name):
            try:
                msg = backend.save(name)
            except Exception as exc:
                return _fail(exc), gr.update()
            return msg, compat.dropdown_update(backend.list_saved(), backend.info.get("file"))

        def on_refresh():
            files = backend.list_saved()
            return compat.dropdown_update(files, files[0] if files else None)

        def on_load(name):
            try:
                return backend.load(name)
            except Exception as exc:
                return _fail(exc)

        calib = [calib_samples, calib_steps]
        quantize_btn.click(on_quantize, [bits, method] + calib, [status])
        ptqd_btn.click(on_ptqd, [bc, cc, vsc] + calib, [status])
        ft_btn.click(on_fine_tune, [ft_steps, ft_rank, ft_batch] + calib, [status])
        cmp_inputs = [subject, seed, steps, count] + ([size] if size is not None else [])
        compare_btn.click(on_compare, cmp_inputs, image_outputs + [diff_img, metrics, status])
        save_btn.click(on_save, [save_name], [status, saved])
        refresh_btn.click(on_refresh, [], [saved])
        load_btn.click(on_load, [saved], [status])
        # Stop sets a flag the running job checks at its next step (works on every host; no queue cancel).
        stop_btn.click(backend.stop, [], [status], queue=False)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7870, models_dir=None, backend: Backend = None):
    """Serve the app for the embedded default model (``lowbit ui``); blocks until interrupted."""
    backend = backend or DefaultModelBackend(models_dir=models_dir)
    demo = build_blocks(backend)
    demo.queue()
    print(f"LowBit UI on http://{host}:{port} (quantized UNets are saved in {backend.models_dir})", flush=True)
    demo.launch(server_name=host, server_port=int(port), show_error=True, inbrowser=False)

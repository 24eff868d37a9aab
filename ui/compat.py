"""The few gradio differences between the versions LowBit runs under, in one place.

Forge pins gradio 4.40 (+ the ``gradio_imageslider`` 0.0.20 component); a plain install may have gradio 5/6,
which has ``gr.ImageSlider`` built in. Everything else the app uses (Blocks, Tab, Row, Column, Dropdown,
Slider, Number, Checkbox, Textbox, Image, Button, Markdown, Progress, Warning, ``.click``) has the same
signature in 4.x and 6.x.
"""
from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("lowbit.ui")

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def image_slider_class():
    """The before/after slider component class, or None (then the app shows the two images side by side)."""
    if hasattr(gr, "ImageSlider"):  # gradio >= 5.x
        return gr.ImageSlider
    try:
        from gradio_imageslider import ImageSlider  # gradio 4.x add-on (Forge ships 0.0.20)
    except Exception as exc:  # optional: a missing slider disables the slider only
        log.info("LowBit: gradio_imageslider not available (%s); showing images side by side", exc)
        return None
    return ImageSlider


def dropdown_update(choices, value=None):
    """A Dropdown update (new choices and value) returned from an event handler."""
    return gr.update(choices=list(choices), value=value)


def warn(message: str):
    """A toast in the browser, where the running gradio supports it (never raises)."""
    try:
        gr.Warning(message)
    except Exception:  # outside an event (tests) gradio may refuse; the status box carries the message anyway
        pass

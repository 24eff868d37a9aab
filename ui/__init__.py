"""The gradio UI shared by the WebUI's LowBit tab and ``lowbit ui``.

  app.py      build_blocks(backend) -> gr.Blocks; launch(host, port) for the embedded default model
  backend.py  the Backend adapter (settings checks, jobs, save/load) and DefaultModelBackend
  webui.py    Forge/A1111 glue (ForgeBackend, the per-generation UNet patch, A1111's SdUnet option)
  compat.py   the gradio 4.x / 6.x differences
Importing this package does not import gradio; ``app`` and ``compat`` do.
"""

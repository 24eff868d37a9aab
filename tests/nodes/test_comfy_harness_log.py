"""The ComfyUI test harness reads the server's console log; these checks need no ComfyUI.

ComfyUI 0.3.64 logged bare messages; newer ones (0.33.0, app/logger.py ColoredFormatter) put a coloured level
tag, "\\x1b[32m[INFO]\\x1b[0m ", before every logged line. The harness must read both.
"""
import comfy_harness


class _LogOnly(comfy_harness.ComfyServer):
    """A ComfyServer whose only state is a log file (no checkout, no process)."""

    def __init__(self, log_path):  # noqa: D107 - deliberately skips the real constructor
        self.log_path = log_path


GREEN, RESET = "\x1b[32m", "\x1b[0m"

LOG_0_3_64 = """Import times for custom nodes:
   0.0 seconds: /tmp/b/custom_nodes/websocket_image_save.py
   0.2 seconds: /tmp/b/custom_nodes/lowbit

Starting server
"""

LOG_0_33 = (f"{GREEN}[INFO]{RESET} Automatically register web folder web for lowbit\n"
            f"{GREEN}[INFO]{RESET} \n"
            "Import times for custom nodes:\n"
            f"{GREEN}[INFO]{RESET}    0.2 seconds: /tmp/b/custom_nodes/lowbit\n"
            f"{GREEN}[INFO]{RESET} \n"
            f"{GREEN}[INFO]{RESET} {GREEN}Prompt executed in 1.25 seconds{RESET}\n")

LOG_FAILED_0_33 = ("Import times for custom nodes:\n"
                   f"{GREEN}[INFO]{RESET}    0.1 seconds (IMPORT FAILED): /tmp/b/custom_nodes/lowbit\n")


def _server(tmp_path, text):
    p = tmp_path / "comfyui.log"
    p.write_text(text)
    return _LogOnly(p)


def test_import_status_old_plain_log(tmp_path):
    assert _server(tmp_path, LOG_0_3_64).pack_import_status() == "ok"


def test_import_status_coloured_level_tags(tmp_path):
    assert _server(tmp_path, LOG_0_33).pack_import_status() == "ok"
    assert _server(tmp_path, LOG_FAILED_0_33).pack_import_status() == "failed"
    assert _server(tmp_path, "Import times for custom nodes:\n").pack_import_status() is None


def test_log_text_has_no_ansi_codes(tmp_path):
    text = _server(tmp_path, LOG_0_33).log_text()
    assert "\x1b" not in text
    assert "[INFO] Prompt executed in 1.25 seconds\n" in text  # a line's end is the message's end again

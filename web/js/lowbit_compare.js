// LowBit: before/after slider for "Compare Images (LowBit)" (node id LowBitCompareImages).
//
// The node returns ui = {a_images, b_images, text}: the same a/b payload as ComfyUI's core Image Compare
// widget. Frontends without that widget still get a comparison: this extension draws image A on the node's
// canvas and, while the pointer is over the image, image B to the right of the pointer (a vertical divider
// follows the pointer). Several images per side: click the small "<" ">" labels to step through the pairs.
// The metrics text (PSNR / SSIM) is drawn under the image.
// Served at /extensions/<pack>/js/lowbit_compare.js (WEB_DIRECTORY = ./web), hence three levels up to /scripts.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "LowBitCompareImages";
const WIDGET_NAME = "lowbit_compare_view";
const TEXT_LINE = 14;

function viewUrl(rec) {
  const q = new URLSearchParams({
    filename: rec.filename,
    type: rec.type ?? "temp",
    subfolder: rec.subfolder ?? "",
  });
  return api.apiURL(`/view?${q.toString()}${app.getPreviewFormatParam?.() ?? ""}`);
}

function loadImage(rec) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = viewUrl(rec);
  });
}

function fitRect(img, x, y, w, h) {
  const s = Math.min(w / img.naturalWidth, h / img.naturalHeight);
  const dw = img.naturalWidth * s;
  const dh = img.naturalHeight * s;
  return [x + (w - dw) / 2, y + (h - dh) / 2, dw, dh];
}

function makeWidget(node) {
  const state = { a: [], b: [], index: 0, text: [], pointerX: null, hover: false, top: 0 };
  const widget = {
    name: WIDGET_NAME,
    type: "custom",
    value: "",
    serialize: false, // display only: nothing of this goes into the workflow or the prompt
    state,
    computeSize(width) {
      return [width, Math.max(160, width)];
    },
    draw(ctx, n, widgetWidth, y) {
      state.top = y;
      const margin = 8;
      const lines = state.text.length;
      const w = widgetWidth - 2 * margin;
      const h = Math.max(40, n.size[1] - y - margin - lines * TEXT_LINE);
      const a = state.a[state.index];
      const b = state.b[Math.min(state.index, state.b.length - 1)];
      ctx.save();
      if (!a && !b) {
        ctx.fillStyle = "#888";
        ctx.font = "12px sans-serif";
        ctx.fillText("run the graph to compare image_a and image_b", margin, y + 20);
        ctx.restore();
        return;
      }
      const base = a || b;
      const [dx, dy, dw, dh] = fitRect(base, margin, y, w, h);
      ctx.drawImage(base, dx, dy, dw, dh);
      if (a && b && state.hover && state.pointerX !== null) {
        const cut = Math.min(Math.max(state.pointerX, dx), dx + dw);
        ctx.beginPath();
        ctx.rect(cut, dy, dx + dw - cut, dh);
        ctx.clip();
        ctx.drawImage(b, dx, dy, dw, dh);
        ctx.restore();
        ctx.save();
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 1;
        ctx.beginPath();
        ctx.moveTo(cut + 0.5, dy);
        ctx.lineTo(cut + 0.5, dy + dh);
        ctx.stroke();
      }
      ctx.fillStyle = "rgba(0,0,0,0.55)";
      ctx.fillRect(dx, dy, 44, 16);
      ctx.fillRect(dx + dw - 44, dy, 44, 16);
      ctx.fillStyle = "#fff";
      ctx.font = "11px sans-serif";
      ctx.fillText("A (fp)", dx + 4, dy + 12);
      ctx.fillText("B (q)", dx + dw - 40, dy + 12);
      if (state.a.length > 1) {
        ctx.fillText(`< ${state.index + 1}/${state.a.length} >`, dx + dw / 2 - 24, dy + 12);
      }
      ctx.fillStyle = "#ddd";
      ctx.font = "12px monospace";
      state.text.forEach((line, i) => ctx.fillText(line, margin, dy + dh + TEXT_LINE * (i + 1)));
      ctx.restore();
    },
    mouse(event, pos, n) {
      const type = event.type;
      if (type === "pointermove" || type === "mousemove") {
        state.pointerX = pos[0];
        state.hover = pos[1] >= state.top;
        n.setDirtyCanvas(true, false);
        return false;
      }
      if ((type === "pointerdown" || type === "mousedown") && state.a.length > 1) {
        state.index = pos[0] < n.size[0] / 2
          ? (state.index + state.a.length - 1) % state.a.length
          : (state.index + 1) % state.a.length;
        n.setDirtyCanvas(true, false);
        return true;
      }
      return false;
    },
  };
  return widget;
}

app.registerExtension({
  name: "lowbit.CompareImages",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.lowbitCompare = this.addCustomWidget(makeWidget(this));
      if (this.size[0] < 320) this.setSize([320, 380]);
      return r;
    };

    const onMouseLeave = nodeType.prototype.onMouseLeave;
    nodeType.prototype.onMouseLeave = function () {
      const r = onMouseLeave?.apply(this, arguments);
      if (this.lowbitCompare) {
        this.lowbitCompare.state.hover = false;
        this.setDirtyCanvas(true, false);
      }
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = async function (output) {
      onExecuted?.apply(this, arguments);
      // The frontend would also show ui.images as a plain preview; we draw our own view instead.
      this.imgs = undefined;
      const w = this.lowbitCompare;
      if (!w || !output) return;
      const [a, b] = await Promise.all([
        Promise.all((output.a_images ?? []).map(loadImage)),
        Promise.all((output.b_images ?? []).map(loadImage)),
      ]);
      w.state.a = a.filter(Boolean);
      w.state.b = b.filter(Boolean);
      w.state.index = 0;
      w.state.text = (output.text ?? []).flatMap((t) => String(t).split("\n"));
      this.setDirtyCanvas(true, true);
    };
  },
});

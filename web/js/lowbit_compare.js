// LowBit: before/after slider for "Compare Images (LowBit)" (node id LowBitCompareImages).
//
// The node returns ui = {a_images, b_images, text}: the same a/b payload as ComfyUI's core Image Compare
// widget. This extension draws image A on the node with image B to the right of a vertical split; the split
// follows the pointer while it is over the image and stays where it was left (it starts in the middle).
// Pressing and dragging on the image moves the split, never the node. Several images per side: click the
// "<" / ">" halves of the label bar at the top of the image to step through the pairs. The metrics text
// (PSNR / SSIM) is drawn under the image.
//
// How the pointer reaches the widget (checked in ComfyUI frontend 1.27.10 and 1.58.1, headless Chromium, by
// tests/nodes/test_comfyui_browser.py):
//  - the widget's height comes from computeLayoutSize(): the frontend calls computeSize() WITHOUT a width when
//    it lays out widgets, so a computeSize(width) that depends on the width gives a NaN height, the widget is
//    never hit and a press on it drags the node instead;
//  - hover: LiteGraph only sends pointermove to a widget while it is pressed, so hover comes from the node's
//    onMouseMove(e, pos) (node-relative position), which the canvas calls for every move over the node;
//  - press/drag: widget.onPointerDown(pointer, node, canvas) returning true takes the gesture (the canvas does
//    not start a node drag); the split follows pointer.onDrag;
//  - "Nodes 2.0" (Vue nodes, an opt-in setting): the widget is drawn into its own small <canvas> (WidgetLegacy)
//    that gets pointerdown/move/up; hover is read from that canvas element directly.
// Served at /extensions/<pack>/js/lowbit_compare.js (WEB_DIRECTORY = ./web), hence three levels up to /scripts.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "LowBitCompareImages";
const WIDGET_NAME = "lowbit_compare_view";
const TEXT_LINE = 14;
const LABEL_H = 16;
const MARGIN = 8;
const MIN_IMAGE_H = 120;

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

function mainCanvasElement() {
  return app.canvas?.canvas ?? app.canvasEl ?? null;
}

function makeWidget(node) {
  // split: fraction of the image width where image B starts (0..1); rect: where the image was last drawn, in
  // the coordinates the pointer positions arrive in (node-relative on the graph canvas, element-relative on
  // a Vue node's own canvas).
  const state = {
    a: [], b: [], index: 0, text: [], split: 0.5, hover: false, dragging: false, rect: null, labelBar: null,
    ownCanvas: null, widget: null, drawWidth: null,
  };

  function redraw() {
    node.setDirtyCanvas?.(true, false);
    state.widget?.triggerDraw?.(); // Vue nodes: the widget's own canvas is redrawn on request only
  }

  function inImage(x, y) {
    const r = state.rect;
    return !!r && x >= r[0] && x <= r[0] + r[2] && y >= r[1] && y <= r[1] + r[3];
  }

  function setSplitAt(x) {
    const r = state.rect;
    if (!r || !(r[2] > 0)) return false;
    const split = Math.min(1, Math.max(0, (x - r[0]) / r[2]));
    if (split === state.split) return false;
    state.split = split;
    return true;
  }

  // Pointer position in the coordinates of state.rect.
  function localPos(e) {
    const target = e?.target;
    if (state.ownCanvas && target === state.ownCanvas) return [e.offsetX, e.offsetY];
    if (typeof e?.canvasX === "number") return [e.canvasX - node.pos[0], e.canvasY - node.pos[1]];
    return null;
  }

  // Nodes 2.0: the widget's height, the image fitted to the widget's width plus the metrics lines.
  function fittedHeight(n) {
    const text = MARGIN + state.text.length * TEXT_LINE;
    const img = state.a[state.index] ?? state.b[0];
    const width = Math.max(10, (state.drawWidth ?? n?.size?.[0] ?? 320) - 2 * MARGIN);
    const height = img ? Math.ceil(width * img.naturalHeight / img.naturalWidth) + text : 0;
    return Math.max(MIN_IMAGE_H + text, height);
  }

  function step(dir) {
    const n = state.a.length;
    if (n > 1) state.index = (state.index + dir + n) % n;
  }

  // Vue nodes draw the widget into its own <canvas>, which receives the pointer events itself.
  function adoptOwnCanvas(el) {
    if (!el || el === mainCanvasElement() || state.ownCanvas === el) return;
    state.ownCanvas = el;
    el.addEventListener("pointermove", (e) => {
      if (state.dragging) return;
      const hover = inImage(e.offsetX, e.offsetY);
      const moved = hover && setSplitAt(e.offsetX);
      if (moved || hover !== state.hover) {
        state.hover = hover;
        redraw();
      }
    });
    el.addEventListener("pointerleave", () => {
      state.hover = false;
      redraw();
    });
  }

  const widget = {
    name: WIDGET_NAME,
    type: "custom",
    value: "",
    serialize: false, // display only: nothing of this goes into the workflow or the prompt
    state,
    // Graph canvas: growable, the image takes the node's free height (at least MIN_IMAGE_H plus the metrics
    // lines). Nodes 2.0: a fixed height (the image fitted to the widget's width), because there the node's size
    // is measured from the DOM, and a widget that takes all free space grows the node on every measurement.
    computeLayoutSize(n) {
      const minHeight = MIN_IMAGE_H + MARGIN + state.text.length * TEXT_LINE;
      if (!(state.ownCanvas || globalThis.LiteGraph?.vueNodesMode)) return { minHeight, minWidth: 160 };
      const height = fittedHeight(n);
      return { minHeight: height, maxHeight: height, minWidth: 160 };
    },
    draw(ctx, n, widgetWidth, y, H) {
      state.widget = this;
      // Nodes 2.0 draws each legacy widget into its own <canvas> (node previews elsewhere use other canvases too:
      // only Nodes 2.0's is adopted for pointer events).
      const own = !!ctx.canvas && ctx.canvas !== mainCanvasElement() && (globalThis.LiteGraph?.vueNodesMode ?? true);
      if (own) adoptOwnCanvas(ctx.canvas);
      state.drawWidth = widgetWidth;
      if (own) {
        // Nodes 2.0 sizes the widget's canvas from computedHeight, which nothing recomputes there once the
        // images (and their aspect ratio) are known: set it, and draw again at that height.
        const want = fittedHeight(n);
        if (!(Math.abs((H ?? 0) - want) <= 1)) {
          this.computedHeight = want;
          requestAnimationFrame(() => this.triggerDraw?.());
        }
      }
      // Height available to this widget: its own canvas's height (Vue nodes pass it as H), the layout's
      // computed height on the graph canvas, or whatever is left of the node.
      const total = own && Number.isFinite(H) && H > 0 ? H
        : Number.isFinite(this.computedHeight) && this.computedHeight > 0 ? this.computedHeight
          : n.size[1] - y;
      const lines = state.text.length;
      const w = Math.max(10, widgetWidth - 2 * MARGIN);
      const h = Math.max(40, total - MARGIN - lines * TEXT_LINE);
      const a = state.a[state.index];
      const b = state.b[Math.min(state.index, state.b.length - 1)];
      ctx.save();
      if (!a && !b) {
        state.rect = null;
        ctx.fillStyle = "#888";
        ctx.font = "12px sans-serif";
        ctx.fillText("run the graph to compare image_a and image_b", MARGIN, y + 20);
        ctx.restore();
        return;
      }
      const base = a || b;
      const [dx, dy, dw, dh] = fitRect(base, MARGIN, y, w, h);
      state.rect = [dx, dy, dw, dh];
      ctx.drawImage(base, dx, dy, dw, dh);
      if (a && b) {
        const cut = dx + dw * state.split;
        ctx.save();
        ctx.beginPath();
        ctx.rect(cut, dy, dx + dw - cut, dh);
        ctx.clip();
        ctx.drawImage(b, dx, dy, dw, dh);
        ctx.restore();
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 1;
        ctx.beginPath();
        ctx.moveTo(Math.round(cut) + 0.5, dy);
        ctx.lineTo(Math.round(cut) + 0.5, dy + dh);
        ctx.stroke();
      }
      ctx.fillStyle = "rgba(0,0,0,0.55)";
      ctx.fillRect(dx, dy, 44, LABEL_H);
      ctx.fillRect(dx + dw - 44, dy, 44, LABEL_H);
      ctx.fillStyle = "#fff";
      ctx.font = "11px sans-serif";
      ctx.fillText("A (fp)", dx + 4, dy + 12);
      ctx.fillText("B (q)", dx + dw - 40, dy + 12);
      if (state.a.length > 1) {
        ctx.fillStyle = "rgba(0,0,0,0.55)";
        ctx.fillRect(dx + dw / 2 - 30, dy, 60, LABEL_H);
        ctx.fillStyle = "#fff";
        ctx.fillText(`< ${state.index + 1}/${state.a.length} >`, dx + dw / 2 - 24, dy + 12);
      }
      ctx.fillStyle = "#ddd";
      ctx.font = "12px monospace";
      const widest = Math.max(1, ...state.text.map((line) => ctx.measureText(line).width));
      if (widest > widgetWidth - 2 * MARGIN) {  // shrink the metrics to the node's width (not below 8 px)
        ctx.font = `${Math.max(8, Math.floor(12 * (widgetWidth - 2 * MARGIN) / widest))}px monospace`;
      }
      state.text.forEach((line, i) => ctx.fillText(line, MARGIN, dy + dh + TEXT_LINE * (i + 1)));
      ctx.restore();
    },
    // ComfyUI frontend (LiteGraph with CanvasPointer): returning true takes the whole gesture, so pressing on
    // the image never drags the node. A drag moves the split; a click on the label bar steps through pairs.
    onPointerDown(pointer, n, canvas) {
      const p = localPos(pointer.eDown);
      const r = state.rect;
      if (!p || !r) return false;
      // a press on the label bar with several pairs is a click on "<" (left half) or ">" (right half)
      const onLabels = state.a.length > 1 && inImage(p[0], p[1]) && p[1] <= r[1] + LABEL_H;
      if (!onLabels && inImage(p[0], p[1])) {
        state.dragging = true;
        setSplitAt(p[0]);
        redraw();
      }
      pointer.onDragStart = () => {};
      pointer.onDrag = (e) => {
        const q = state.dragging && localPos(e);
        if (q && setSplitAt(q[0])) redraw();
      };
      pointer.onClick = () => {
        if (onLabels) {
          step(p[0] < r[0] + r[2] / 2 ? -1 : 1);
          redraw();
        }
      };
      pointer.finally = () => {
        state.dragging = false;
        // The canvas records the pressed widget and only lets go of it in the finally it installs itself.
        if (canvas?.node_widget?.[0] === n) canvas.node_widget = null;
        redraw();
      };
      return true;
    },
    // Older LiteGraph without CanvasPointer: the legacy widget callback.
    mouse(event, pos) {
      const type = event.type;
      if (type === "pointerdown" || type === "mousedown") {
        state.dragging = true;
        setSplitAt(pos[0]);
        redraw();
        return true;
      }
      if ((type === "pointermove" || type === "mousemove") && state.dragging) {
        if (setSplitAt(pos[0])) redraw();
        return true;
      }
      if (type === "pointerup" || type === "mouseup") state.dragging = false;
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
      if (this.size[0] < 320 || this.size[1] < 380) {
        this.setSize([Math.max(320, this.size[0]), Math.max(380, this.size[1])]);
      }
      return r;
    };

    // Hover: the graph canvas calls onMouseMove(e, node-relative pos) for every move over the node (widgets
    // only get moves while pressed).
    const onMouseMove = nodeType.prototype.onMouseMove;
    nodeType.prototype.onMouseMove = function (e, pos) {
      const r = onMouseMove?.apply(this, arguments);
      const st = this.lowbitCompare?.state;
      if (st && pos && !st.dragging) {
        const rect = st.rect;
        const hover = !!rect && pos[0] >= rect[0] && pos[0] <= rect[0] + rect[2] && pos[1] >= rect[1] &&
          pos[1] <= rect[1] + rect[3];
        let moved = false;
        if (hover) {
          const split = Math.min(1, Math.max(0, (pos[0] - rect[0]) / rect[2]));
          moved = split !== st.split;
          st.split = split;
        }
        if (moved || hover !== st.hover) {
          st.hover = hover;
          this.setDirtyCanvas(true, false);
        }
      }
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
      w.state.widget?.triggerDraw?.();
    };
  },
});

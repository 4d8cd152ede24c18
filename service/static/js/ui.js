// Small DOM helpers shared by the panels.
import { ServiceError } from "./api.js";

// el("p", {class: "x"}, "text", child): an element with attributes and children (strings become text).
export function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "style") Object.assign(node.style, value); // CSSOM: the page's CSP refuses style attributes
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

// Every failure is said with its code and message: the service's own, or the browser's.
export function showError(box, err) {
  const e = err instanceof ServiceError ? err : new ServiceError(0, "console_error", String(err && err.message || err));
  box.replaceChildren(el("code", {}, e.code), ": ", e.message, e.status ? ` (HTTP ${e.status})` : "");
  box.hidden = false;
}

export function clearError(box) {
  box.hidden = true;
  box.replaceChildren();
}

// The panel's error box; `run(fn)` clears it, awaits fn and shows what it threw.
export function errorsOf(panel) {
  const box = panel.querySelector("[data-error]");
  return async (fn) => {
    clearError(box);
    try {
      return await fn();
    } catch (err) {
      showError(box, err);
      return undefined;
    }
  };
}

// A file input inside a label.drop: picking (keyboard or pointer) and dropping both call onFiles(File[]).
export function dropZone(input, onFiles) {
  const zone = input.closest(".drop");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // picking the same file again is a new choice
    if (files.length) onFiles(files);
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
    if (files.length) onFiles(input.multiple ? files : files.slice(0, 1));
  });
}

// A photo with an SVG overlay in the image's own pixel coordinates (boxes from the service are in the
// EXIF-upright image; the browser shows photos upright too), so it scales with the picture.
export async function photoWith(file, draw = () => {}) {
  const img = el("img", { src: URL.createObjectURL(file), alt: `Photo ${file.name || ""}` });
  try { await img.decode(); } catch { /* undecodable here: the service's answer says why */ }
  const w = img.naturalWidth || 1, h = img.naturalHeight || 1;
  const svg = el("svg:svg", { viewBox: `0 0 ${w} ${h}`, "aria-hidden": "true", preserveAspectRatio: "none" });
  draw(svg);
  return el("div", { class: "photo" }, img, svg);
}

export function box(svg, [x1, y1, x2, y2], cls = "") {
  const rect = el("svg:rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: cls });
  svg.append(rect);
  return rect;
}

// Each landmark a zero-length round-capped stroke: a dot of the same screen size whatever the photo's scale.
export function landmarks(svg, points) {
  for (const [x, y] of points) svg.append(el("svg:path", { d: `M${x} ${y}h0`, class: "lm" }));
}

// A [0, 1] value as a bar with its number (the number is the accessible text).
export function bar(value, poor = false) {
  const v = value == null ? 0 : Math.max(0, Math.min(1, value));
  return el("span", { class: `bar${poor ? " poor" : ""}`, role: "img", "aria-label": `quality ${fmt(value)}` },
            el("span", { style: { width: `${(v * 100).toFixed(1)}%` } }));
}

export const fmt = (x, digits = 3) => (x == null ? "n/a" : Number(x).toFixed(digits));

// "1e-3 (1 in 1,000)" for a rate
export function rate(x) {
  const exp = Math.log10(x);
  const label = Number.isInteger(Math.round(exp * 1000) / 1000) ? `1e${Math.round(exp)}` : String(x);
  return `${label} (1 in ${Math.round(1 / x).toLocaleString("en")})`;
}

export function figures(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

// Status: the model, readiness, and a few live figures read from the Prometheus text at /metrics.
import { call, model } from "./api.js";
import { el, figures, fmt, rate } from "./ui.js";

const POLL_MS = 5000;
const FACE_ROUTES = /^\/(embed|verify|templates|gallery)/; // the console's own polling is not counted

// Prometheus text -> [{name, labels, value}]
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const sum = (samples, name, keep = () => true) =>
  samples.filter((s) => s.name === name && keep(s.labels)).reduce((t, s) => t + s.value, 0);

// Cumulative histogram buckets {le: count} over the kept series.
function buckets(samples, name, keep = () => true) {
  const out = new Map();
  for (const s of samples) {
    if (s.name === `${name}_bucket` && keep(s.labels)) out.set(s.labels.le, (out.get(s.labels.le) || 0) + s.value);
  }
  return [...out].map(([le, n]) => [le === "+Inf" ? Infinity : Number(le), n]).sort((a, b) => a[0] - b[0]);
}

// The q-quantile of a histogram, interpolated within its bucket as Prometheus's histogram_quantile does.
export function quantile(q, cumulative) {
  const total = cumulative.length ? cumulative.at(-1)[1] : 0;
  if (!total) return null;
  let [prevLe, prevN] = [0, 0];
  for (const [le, n] of cumulative) {
    if (n >= q * total) {
      if (le === Infinity) return prevLe;
      return prevLe + (le - prevLe) * ((q * total - prevN) / Math.max(n - prevN, 1e-12));
    }
    [prevLe, prevN] = [le, n];
  }
  return prevLe;
}

const minus = (now, before) => now.map(([le, n], i) => [le, n - ((before && before[i] && before[i][1]) || 0)]);

export function init(panel, errors) {
  let last = null;
  let timer = null;
  const face = (labels) => FACE_ROUTES.test(labels.route || "");

  async function showModel() {
    const m = await model();
    figures(panel.querySelector("#status-model"), [
      ["Model", `${m.name} ${m.version}`], ["Architecture", m.architecture], ["Runtime", m.runtime],
      ["Embedding", `${m.embedding_size} values, ${m.input_size} px crops${m.flip_tta ? ", flip TTA" : ""}`],
      ["Calibrated FARs", m.fars.map(rate).join(", ") || "none"],
      ["FPIR range", m.fpir_range ? m.fpir_range.map(rate).join(" to ") : "no open-set calibration"],
      ["Quality floors", m.quality ? `probe ${fmt(m.probe_floor)}, enrolment ${fmt(m.enrolment_floor)}` : "quality gating off"],
      ["Templates", m.templates ? `off: ${m.templates}` : "on"],
      ["Calibrated on", m.calibration_data || "n/a"],
    ]);
  }

  async function showReadiness() {
    // /readyz answers 503 with its checks when not ready: read the body either way
    const response = await fetch("readyz");
    const body = await response.json();
    const checks = Object.entries(body.checks || {});
    panel.querySelector("#status-ready").replaceChildren(
      el("li", { class: body.ready ? "ok" : "failed" }, body.ready ? "ready" : `not ready: ${body.error?.message || ""}`),
      ...checks.map(([name, c]) => el("li", { class: c.ok ? "ok" : "failed" }, `${name}: ${c.detail}`)));
  }

  async function showMetrics() {
    const samples = parseMetrics(await call("GET", "metrics"));
    const now = { t: performance.now(), requests: sum(samples, "faceset_requests_total", face),
                  latency: buckets(samples, "faceset_request_duration_seconds", face) };
    const window = last && now.requests > last.requests;
    const perSecond = last ? (now.requests - last.requests) / ((now.t - last.t) / 1000) : null;
    const p99 = quantile(0.99, window ? minus(now.latency, last.latency) : now.latency);
    const batches = sum(samples, "faceset_batch_size_count");
    const batchMean = batches ? sum(samples, "faceset_batch_size_sum") / batches : null;
    const sizes = buckets(samples, "faceset_batch_size");
    const spread = sizes.filter(([le]) => le !== Infinity).map(([le, n], i) => [le, n - (i ? sizes[i - 1][1] : 0)])
      .filter(([, n]) => n > 0).map(([le, n]) => `≤${le}: ${n}`).join(", ");
    figures(panel.querySelector("#status-metrics"), [
      ["Face requests/s", perSecond == null ? "measuring…" : perSecond.toFixed(2)],
      ["p99 latency", p99 == null ? "no requests yet" : `${(p99 * 1000).toFixed(0)} ms ${window ? "(last 5 s)" : "(since start)"}`],
      ["Face requests", String(now.requests)],
      ["Batch size", batchMean == null ? "no batches yet" : `mean ${batchMean.toFixed(2)} over ${batches} batches`],
      ["Batch sizes", spread || "–"],
      ["Faces embedded", String(sum(samples, "faceset_faces_embedded_total"))],
      ["In flight", String(sum(samples, "faceset_requests_in_flight") - 1)], // less this poll's own request
    ]);
    last = now;
  }

  const refresh = () => errors(async () => {
    await showModel();
    await showReadiness();
    await showMetrics();
  });

  return {
    show() { refresh(); timer = setInterval(refresh, POLL_MS); },
    hide() { clearInterval(timer); },
  };
}

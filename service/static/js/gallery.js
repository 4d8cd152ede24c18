// Gallery: enrol identities from photos or a template, add photos, search with a photo (the decision, the
// FPIR used and the top matches), mark a wrong match "not this person", delete an identity.
import { call, formOf, model, path, ServiceError } from "./api.js";
import { dropZone, el, errorsOf, fmt, photoWith, rate } from "./ui.js";

const FPIRS = [0.001, 0.003, 0.01, 0.03, 0.1];
const DECISIONS = {
  identified: ["yes", (r) => `Identified: ${r.identified}`],
  unknown: ["no", () => "Unknown: nobody in the gallery reaches the threshold"],
  low_quality: ["meh", (r) => `Low quality: the probe's quality ${fmt(r.quality)} is below the floor `
    + `${fmt(r.probe_floor)}, so no one is identified`],
};

async function fillCriteria(select) {
  const served = await model();
  if (served.fpir_range) {
    const [low, high] = served.fpir_range;
    const offered = FPIRS.filter((f) => f >= low && f <= high);
    select.replaceChildren(...offered.map((f) => el("option", { value: `fpir=${f}`, selected: f === served.default_fpir },
                                                       `FPIR ${rate(f)}`)));
  } else { // a card without the open-set calibration decides searches by FAR
    select.previousElementSibling.textContent = "FAR";
    select.replaceChildren(...served.fars.map((f) => el("option", { value: `far=${f}`, selected: f === served.default_far },
                                                          `FAR ${rate(f)}`)));
  }
}

export function init(panel) {
  const run = errorsOf(panel);
  const $ = (id) => panel.querySelector(`#${id}`);
  let enrolPhotos = [];
  let probe = null;
  const headers = () => ({ "X-Gallery": $("gallery-name").value || "default" });
  const valid = (input, what) => {
    if (!input.value || !input.checkValidity()) {
      input.focus();
      throw new ServiceError(0, "invalid_input", `${what}: 1-128 letters, digits or . _ : @ -`);
    }
    return input.value;
  };
  const said = (text) => { $("enrol-result").textContent = text; };

  async function refreshInfo() {
    const info = await call("GET", "gallery", { headers: headers() });
    $("gallery-info").textContent = `${info.count} identit${info.count === 1 ? "y" : "ies"} (${info.index} index)`;
  }

  async function enrol(add) {
    const id = valid($("enrol-id"), "identity id");
    const template = $("enrol-template").value.trim();
    const query = new URLSearchParams({ force: $("enrol-force").checked, ...(add ? { mode: "add" } : {}) });
    let body;
    if (enrolPhotos.length) body = formOf(enrolPhotos);
    else if (template && !add) body = JSON.stringify({ template_id: template });
    else throw new ServiceError(0, "invalid_input", add ? "choose photos to add" : "choose photos or name a template");
    const json = typeof body === "string" ? { "Content-Type": "application/json" } : {};
    const out = await call("POST", `gallery/${path(id)}?${query}`, { body, headers: { ...headers(), ...json } });
    enrolPhotos = []; // the next enrolment chooses its own photos (or a template)
    $("enrol-chosen").textContent = "";
    await refreshInfo(); // first, so the figures agree once the result is said
    said(`${add ? "Added to" : "Enrolled"} ${out.id}: fused from ${out.photos} photo${out.photos === 1 ? "" : "s"} `
      + `(${out.fusion}), quality ${fmt(out.quality)}; the gallery holds ${out.count}.`);
  }

  function matchRow(match, result, onNotThis) {
    const above = match.similarity >= result.threshold;
    return el("tr", {},
      el("td", {}, match.id),
      el("td", {}, fmt(match.similarity)),
      el("td", { class: "wide-only" }, above ? "above threshold" : "below threshold"),
      el("td", {}, el("button", { type: "button", onclick: onNotThis,
                                  "aria-label": `Not this person: ${match.id}` }, "Not this person")));
  }

  function showResult(result) {
    const [cls, say] = DECISIONS[result.decision];
    const area = $("search-result");
    const fpir = result.fpir == null ? "no FPIR calibration" : `FPIR ${fmt(result.fpir, 4)} at this gallery's size`;
    const rows = result.matches.map((m) => matchRow(m, result, () => run(async () => {
      const out = await call("POST", `gallery/${path(m.id)}/negatives`, { body: formOf([probe]), headers: headers() });
      area.append(el("p", { role: "status" }, `Recorded: this probe is not ${out.id} (${out.negatives} negative`
        + `${out.negatives === 1 ? "" : "s"}); faces closer to it than to ${out.id} will not be identified as ${out.id}.`));
    })));
    area.replaceChildren(
      el("p", { class: `decision ${cls}` }, say(result)),
      el("p", {}, `Threshold ${fmt(result.threshold)} (${fpir}); ${result.gallery_size} identities searched; `
        + `probe quality ${fmt(result.quality)}.`),
      result.matches.length
        ? el("table", {}, el("caption", { class: "visually-hidden" }, "Top matches"),
             el("thead", {}, el("tr", {}, ["Identity", "Similarity", "Against threshold", "Correction"].map((h, i) =>
               el("th", { scope: "col", class: i === 2 ? "wide-only" : null }, h)))),
             el("tbody", {}, rows))
        : el("p", { class: "note bad" }, "No face found in the probe photo."));
  }

  async function search() {
    const criterion = $("search-fpir").value;
    const answer = await call("POST", `gallery/search?top_k=5${criterion ? `&${criterion}` : ""}`,
                              { body: formOf([probe]), headers: headers() });
    showResult(answer.results[0]);
  }

  run(() => fillCriteria($("search-fpir")));
  dropZone($("enrol-photos"), (files) => {
    enrolPhotos = files;
    $("enrol-chosen").textContent = `${files.length} photo${files.length === 1 ? "" : "s"}: ${files.map((f) => f.name).join(", ")}`;
  });
  dropZone($("search-photo"), (files) => run(async () => {
    [probe] = files;
    $("search-result").replaceChildren(el("p", { class: "muted" }, "Searching…"));
    $("search-view").replaceChildren(await photoWith(probe));
    try {
      await search();
    } catch (err) {
      $("search-result").replaceChildren();
      throw err;
    }
  }));
  $("search-fpir").addEventListener("change", () => probe && run(search));
  $("enrol-run").addEventListener("click", () => run(() => enrol(false)));
  $("enrol-add").addEventListener("click", () => run(() => enrol(true)));
  $("identity-show").addEventListener("click", () => run(async () => {
    const id = valid($("enrol-id"), "identity id");
    const out = await call("GET", `gallery/${path(id)}`, { headers: headers() });
    said(`${out.id}: ${out.photos} photo${out.photos === 1 ? "" : "s"} (${out.fusion}), quality ${fmt(out.quality)}, `
      + `${out.negatives} negative${out.negatives === 1 ? "" : "s"}.`);
  }));
  $("identity-delete").addEventListener("click", () => run(async () => {
    const id = valid($("enrol-id"), "identity id");
    await call("DELETE", `gallery/${path(id)}`, { headers: headers() });
    await refreshInfo();
    said(`Deleted ${id} from the gallery.`);
  }));
  $("gallery-name").addEventListener("change", () => run(refreshInfo));
  return { refresh: () => run(refreshInfo) };
}

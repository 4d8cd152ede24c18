// Faces: every face of each photo boxed, with its landmarks, quality bar and, on hover or focus, its
// magnitude and detection score. What makes a face unusable is said in words.
import { call, formOf, model } from "./api.js";
import { bar, box, el, errorsOf, fmt, landmarks, photoWith, dropZone } from "./ui.js";

// Why a face would not serve (null: it would), from the model's floors and the service's smallest face.
export function faceProblem(face, served) {
  const [x1, y1, x2, y2] = face.bbox;
  const side = Math.min(x2 - x1, y2 - y1);
  if (side < served.min_face_size) {
    return { cls: "small", text: `Too small: ${side.toFixed(0)} px across; the service leaves out faces under `
      + `${served.min_face_size} px unless asked.` };
  }
  if (face.quality != null && served.probe_floor != null && face.quality < served.probe_floor) {
    return { cls: "poor", text: `Too poor: quality ${fmt(face.quality)} is below the model's probe floor `
      + `${fmt(served.probe_floor)}; a search with it answers low_quality.` };
  }
  return null;
}

function faceItem(face, i, rect, problem) {
  const tip = `magnitude ${fmt(face.magnitude, 2)} · detection score ${fmt(face.detection_score)}`;
  const item = el("li", { tabindex: "0", "aria-label": `Face ${i + 1}: quality ${fmt(face.quality)}, ${tip}` },
    el("strong", {}, `Face ${i + 1} `), bar(face.quality, problem != null), ` quality ${fmt(face.quality)}`,
    el("span", { class: "tip", role: "tooltip" }, tip),
    problem && el("p", { class: `note ${problem.cls === "small" ? "bad" : "warn"}` }, problem.text));
  const hot = (on) => rect.classList.toggle("hot", on);
  for (const [ev, on] of [["mouseenter", true], ["mouseleave", false], ["focus", true], ["blur", false]]) {
    item.addEventListener(ev, () => hot(on));
  }
  rect.append(el("svg:title", {}, `Face ${i + 1}: ${tip}`));
  return item;
}

async function showPhoto(file, served, results) {
  const card = el("article", { class: "card", "aria-busy": "true" }, el("h3", {}, file.name));
  results.append(card);
  try {
    // min_face_size=0: small faces come back too, so the page can say they are too small instead of nothing
    const answer = await call("POST", "embed?min_face_size=0", { body: formOf([file]) });
    const faces = answer.results[0].faces;
    const problems = faces.map((f) => faceProblem(f, served));
    const rects = [];
    const photo = await photoWith(file, (svg) => faces.forEach((f, i) => {
      rects.push(box(svg, f.bbox, problems[i] ? problems[i].cls : ""));
      landmarks(svg, f.landmarks);
    }));
    const list = faces.length
      ? el("ul", { class: "faces" }, faces.map((f, i) => faceItem(f, i, rects[i], problems[i])))
      : el("p", { class: "note bad" }, "No face found in this photo.");
    card.append(photo, el("p", { class: "muted" }, `${faces.length} face${faces.length === 1 ? "" : "s"} found`), list);
  } catch (err) {
    card.append(el("p", { class: "error" }, el("code", {}, err.code || "error"), `: ${err.message}`,
                   err.status ? ` (HTTP ${err.status})` : ""));
  } finally {
    card.removeAttribute("aria-busy");
  }
}

export function init(panel) {
  const results = panel.querySelector("#faces-results");
  const run = errorsOf(panel);
  dropZone(panel.querySelector("#faces-input"), (files) => run(async () => {
    const served = await model();
    results.replaceChildren();
    for (const file of files) await showPhoto(file, served, results); // one at a time: the service is shared
  }));
}

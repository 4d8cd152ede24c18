// Verify: two photos side by side, their similarity against the calibrated threshold at the chosen FAR.
import { call, formOf, model } from "./api.js";
import { box, dropZone, el, errorsOf, fmt, photoWith, rate } from "./ui.js";

// The similarity on a [0, 1] scale (below 0 shows as 0) with the threshold marked.
function scale(similarity, threshold) {
  const at = (x) => `${(Math.max(0, Math.min(1, x)) * 100).toFixed(1)}%`;
  return el("div", { class: "scale", role: "img",
                     "aria-label": `similarity ${fmt(similarity)}, threshold ${fmt(threshold)}` },
            el("span", { class: "value", style: { width: at(similarity) } }),
            el("span", { class: "mark", style: { left: at(threshold) }, title: `threshold ${fmt(threshold)}` }));
}

function sideText(name, side) {
  if (side.source !== "image") return `${name}: an embedding`;
  const more = side.faces_found > 1 ? ` (largest of ${side.faces_found} faces)` : "";
  return `${name}: quality ${fmt(side.quality)}${more}`;
}

function verdict(answer) {
  const decision = answer.match ? "Match: the same person" : "No match: different people";
  return [
    el("p", { class: `decision ${answer.match ? "yes" : "no"}` }, decision),
    scale(answer.similarity, answer.threshold),
    el("p", {}, `Similarity ${fmt(answer.similarity)} ${answer.match ? "≥" : "<"} threshold ${fmt(answer.threshold)} `
      + `at FAR ${rate(answer.far)}` + (answer.band ? `, the threshold of pairs whose lower quality is in `
      + `[${fmt(answer.band[0], 2)}, ${fmt(answer.band[1], 2)})` : "") + "."),
    el("p", { class: "muted" }, `${sideText("A", answer.a)}; ${sideText("B", answer.b)}`),
  ];
}

export async function fillFars(select) {
  const served = await model();
  select.replaceChildren(...served.fars.map((far) => el("option", { value: far, selected: far === served.default_far },
                                                          rate(far))));
  if (!served.fars.length) select.append(el("option", { value: "" }, "no calibration"));
}

export function init(panel) {
  const run = errorsOf(panel);
  const chosen = {};
  const button = panel.querySelector("#verify-run");
  const result = panel.querySelector("#verify-result");
  const views = { a: panel.querySelector("#verify-a-view"), b: panel.querySelector("#verify-b-view") };
  const farSelect = panel.querySelector("#verify-far");
  run(() => fillFars(farSelect));
  for (const side of ["a", "b"]) {
    dropZone(panel.querySelector(`#verify-${side}`), async ([file]) => {
      chosen[side] = file;
      result.replaceChildren();
      views[side].replaceChildren(await photoWith(file));
      button.disabled = !(chosen.a && chosen.b);
    });
  }
  button.addEventListener("click", () => run(async () => {
    result.replaceChildren(el("p", { class: "muted" }, "Comparing…"));
    const form = formOf([chosen.a], "a");
    form.append("b", chosen.b, chosen.b.name);
    const far = farSelect.value ? `?far=${farSelect.value}` : "";
    try {
      const answer = await call("POST", `verify${far}`, { body: form });
      result.replaceChildren(...verdict(answer));
      for (const side of ["a", "b"]) {
        if (answer[side].bbox) views[side].replaceChildren(await photoWith(chosen[side], (svg) => box(svg, answer[side].bbox)));
      }
    } catch (err) {
      result.replaceChildren();
      throw err;
    }
  }));
}

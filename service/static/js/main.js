// The console's entry: the API key form, the tabs (arrow keys move between them), each panel's set-up.
import { apiKey, model } from "./api.js";
import * as faces from "./faces.js";
import * as gallery from "./gallery.js";
import * as status from "./status.js";
import * as templates from "./templates.js";
import * as verify from "./verify.js";
import { errorsOf, showError } from "./ui.js";

const $ = (id) => document.getElementById(id);

function keyForm() {
  const input = $("api-key");
  const state = $("key-state");
  const say = () => { state.textContent = apiKey.get() ? "key set for this tab" : "no key"; };
  input.value = apiKey.get();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey.set(input.value.trim());
    say();
  });
  $("key-forget").addEventListener("click", () => { apiKey.set(""); input.value = ""; say(); });
  say();
}

function tabs(hooks) {
  const list = [...document.querySelectorAll("[role=tab]")];
  const select = (tab) => {
    for (const t of list) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      const panel = $(t.getAttribute("aria-controls"));
      if (panel.hidden === on) (on ? hooks[panel.id]?.show : hooks[panel.id]?.hide)?.();
      panel.hidden = !on;
    }
    tab.focus();
  };
  list.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) select(list[(i + step + list.length) % list.length]);
      else if (e.key === "Home") select(list[0]);
      else if (e.key === "End") select(list.at(-1));
    });
  });
}

async function boot() {
  keyForm();
  const panel = (id) => $(`panel-${id}`);
  faces.init(panel("faces"));
  verify.init(panel("verify"));
  templates.init(panel("templates"));
  const galleryPanel = gallery.init(panel("gallery"));
  const statusPanel = status.init(panel("status"), errorsOf(panel("status")));
  tabs({ "panel-gallery": { show: galleryPanel.refresh }, "panel-status": statusPanel });
  try {
    const m = await model();
    $("model-name").textContent = `${m.name} ${m.version}`;
  } catch (err) {
    showError($("boot-error"), err);
  }
  document.body.dataset.ready = "true"; // for tests and scripts: every panel is wired
}

boot();

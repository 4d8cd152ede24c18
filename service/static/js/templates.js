// Templates: photos or webcam frames streamed into one identity's CAFace template. Every frame carries a
// frame id (a photo's from its content; a webcam frame's from this session and its number), and a
// retried frame keeps its id, so the service never counts it twice.
import { call, formOf, path, ServiceError } from "./api.js";
import { dropZone, el, errorsOf, fmt } from "./ui.js";

const REASONS = {
  no_face: "no face found",
  low_quality: "face quality below the floor",
  duplicate_frame_id: "already counted (same frame id)",
  undecodable_image: "not a readable image",
  unsupported_media_type: "not a JPEG, PNG or WebP image",
  image_too_large: "image too large",
};
const RETRIED = new Set([0, 429, 503]); // the network, overload, a brief outage: worth one more try
const CAMERA_EVERY_MS = 800;

// A photo's id is its content's SHA-256 (the same photo picked again is the same frame); where the page is not
// a secure context (plain http off localhost) the browser has no digest, and name, size and date stand in.
async function photoId(file) {
  if (!globalThis.crypto || !crypto.subtle) return `photo:${file.name}:${file.size}:${file.lastModified}`.slice(0, 128);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
  return `sha256:${[...digest].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export function init(panel) {
  const run = errorsOf(panel);
  const $ = (id) => panel.querySelector(`#${id}`);
  const idInput = $("template-id");
  const state = { history: [], rejected: [], camera: null, timer: null, frameNo: 0, session: Date.now().toString(36) };

  const templateId = () => {
    if (!idInput.checkValidity() || !idInput.value) {
      throw new ServiceError(0, "invalid_input", "a template id is 1-128 letters, digits or . _ : @ -");
    }
    return idInput.value;
  };

  function show(frames, quality) {
    $("template-frames").textContent = String(frames);
    $("template-quality").textContent = fmt(quality);
    $("template-quality-bar").value = quality ?? 0;
    const last = state.history.at(-1);
    if (!last || last.frames !== frames || last.quality !== quality) {
      state.history.push({ frames, quality });
      $("template-history").append(el("li", {}, `${frames} frame${frames === 1 ? "" : "s"}: quality ${fmt(quality)}`));
    }
  }

  function reject(labels, rejected) {
    for (const r of rejected) state.rejected.push(`${labels[r.index]}: ${r.reason}, ${REASONS[r.reason] || ""}`);
    const list = $("template-rejected");
    list.replaceChildren(...(state.rejected.length ? state.rejected.map((t) => el("li", {}, t))
                                                     : [el("li", { class: "muted" }, "none")]));
  }

  // One POST of frames with their ids; retried once with the same ids where a retry can help.
  async function send(files, ids, labels) {
    const url = `templates/${path(templateId())}/frames`;
    let answer;
    try {
      answer = await call("POST", url, { body: formOf(files, "images", { frame_ids: ids }) });
    } catch (err) {
      if (!RETRIED.has(err.status)) throw err;
      answer = await call("POST", url, { body: formOf(files, "images", { frame_ids: ids }) });
    }
    show(answer.frames, answer.quality);
    reject(labels, answer.rejected);
  }

  dropZone($("template-photos"), (files) => run(async () => {
    await send(files, await Promise.all(files.map(photoId)), files.map((f) => f.name));
  }));

  async function grab() {
    const video = $("camera");
    const canvas = el("canvas", { width: video.videoWidth, height: video.videoHeight });
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.9));
    state.frameNo += 1;
    const name = `webcam frame ${state.frameNo}`;
    const file = new File([blob], `frame-${state.frameNo}.jpg`, { type: "image/jpeg" });
    await send([file], [`cam:${state.session}:${state.frameNo}`], [name]);
  }

  async function loop() {
    if (!state.camera) return;
    const ok = await run(async () => { await grab(); return true; });
    if (ok && state.camera) state.timer = setTimeout(loop, CAMERA_EVERY_MS);
    else stopCamera(); // an error stops the stream rather than repeating it every frame
  }

  async function startCamera() {
    const note = $("camera-note");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      note.textContent = "This browser gives no webcam here (it needs https or localhost); add photos instead.";
      return;
    }
    templateId();
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    const video = $("camera");
    video.srcObject = stream;
    video.hidden = false;
    await video.play();
    state.camera = stream;
    $("camera-start").disabled = true;
    $("camera-stop").disabled = false;
    note.textContent = `Webcam on: a frame every ${CAMERA_EVERY_MS} ms goes to the template.`;
    loop();
  }

  function stopCamera() {
    clearTimeout(state.timer);
    if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
    state.camera = null;
    $("camera").hidden = true;
    $("camera-start").disabled = false;
    $("camera-stop").disabled = true;
    $("camera-note").textContent = state.frameNo ? `Webcam off after ${state.frameNo} frame${state.frameNo === 1 ? "" : "s"}.` : "";
  }

  $("camera-start").addEventListener("click", () => run(async () => {
    try {
      await startCamera();
    } catch (err) {
      stopCamera();
      if (err instanceof ServiceError) throw err;
      throw new ServiceError(0, "camera_unavailable", `the browser gave no webcam: ${err.name}: ${err.message}`);
    }
  }));
  $("camera-stop").addEventListener("click", stopCamera);
  $("template-refresh").addEventListener("click", () => run(async () => {
    const view = await call("GET", `templates/${path(templateId())}?embedding=false`);
    show(view.frames, view.quality);
  }));
  $("template-delete").addEventListener("click", () => run(async () => {
    await call("DELETE", `templates/${path(templateId())}`);
    state.history = [];
    state.rejected = [];
    $("template-history").replaceChildren();
    reject([], []);
    show(0, null);
  }));
  idInput.addEventListener("change", () => { state.history = []; $("template-history").replaceChildren(); });
}

// Calls to the service. URLs are relative to the page, so the console works under a proxy's path prefix.
// The API key lives in this tab's sessionStorage only: gone when the tab closes, never sent elsewhere.
const KEY = "faceset.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

// The service's error body {"error": {"code", "message"}} (or what the network said) as one exception.
export class ServiceError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One request: the key header added, the JSON (or text) answer returned, any non-2xx thrown as ServiceError.
export async function call(method, path, { body, headers } = {}) {
  const sent = new Headers(headers);
  if (apiKey.get()) sent.set("X-API-Key", apiKey.get());
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body });
  } catch (err) {
    throw new ServiceError(0, "network_error", `the service did not answer (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: /metrics, or a proxy's error page */ }
  if (!response.ok) {
    const error = data && data.error;
    throw new ServiceError(response.status, error ? error.code : `http_${response.status}`,
                           error ? error.message : text.slice(0, 300) || response.statusText);
  }
  return data ?? text;
}

// A multipart body: each file under `field`, then each extra text field (arrays repeat the field).
export function formOf(files, field = "images", extra = {}) {
  const form = new FormData();
  for (const file of files) form.append(field, file, file.name || "frame.jpg");
  for (const [name, value] of Object.entries(extra)) {
    for (const one of [].concat(value)) form.append(name, String(one));
  }
  return form;
}

export const path = (...parts) => parts.map(encodeURIComponent).join("/");

// The served model (GET /model), fetched once and shared by every panel.
let served;
export const model = () => (served ??= call("GET", "model").catch((err) => { served = undefined; throw err; }));

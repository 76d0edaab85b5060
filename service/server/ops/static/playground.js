// Emu3.5 playground: two forms (Image, Interleaved) that call the service's own API and render the
// answer as it arrives (server-sent events) or at once (one JSON body). No dependencies, no build step.

const KEY_STORAGE = "emu35.apiKey";
const MAX_REFERENCE_IMAGES = 3;
// Sizes the API takes as `aspect_ratio`; every other size text goes to `size` (pixels, auto,
// match_reference), so a request never carries both fields.
const ASPECT_RATIOS = new Set(["4:3", "21:9", "16:9", "3:2", "1:1", "3:4", "9:16", "2:3", "default"]);
// Interleaved tasks with an endpoint of their own; the others go to /v1/generate with `task`.
const TASK_ENDPOINTS = { guidance: "/v1/guidance", narrative: "/v1/narrative" };
const PATCH = 16; // pixels per image token side: an image of height H has H / 16 rows

const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// ---- API key: typed once, kept for this browser tab only ----------------------------------------

function initApiKey() {
  const input = $("#api-key");
  input.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  input.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, input.value.trim()));
  // the field sits in a form only so browsers treat it as a password field; Enter must not reload
  input.form.addEventListener("submit", (ev) => ev.preventDefault());
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---- tabs (WAI-ARIA tabs pattern: roving tabindex, arrow keys move between tabs) ----------------

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (chosen) => {
    for (const tab of tabs) {
      const on = tab === chosen;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      document.getElementById(tab.getAttribute("aria-controls")).hidden = !on;
    }
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (ev) => {
      const target = { ArrowRight: tabs[(i + 1) % tabs.length], ArrowLeft: tabs[(i - 1 + tabs.length) % tabs.length],
                       Home: tabs[0], End: tabs[tabs.length - 1] }[ev.key];
      if (!target) return;
      ev.preventDefault();
      select(target);
      target.focus();
    });
  });
}

// ---- shared form parts ------------------------------------------------------------------------

// Both tabs use the same prompt, image, settings, button and output markup: clone the templates
// into each panel's slots, giving template ids a per-panel suffix so they stay unique.
function fillSlots(section, suffix) {
  for (const slot of section.querySelectorAll("[data-slot]")) {
    const part = document.getElementById(`tpl-${slot.dataset.slot}`).content.cloneNode(true);
    for (const el of part.querySelectorAll("[id]")) el.id += `-${suffix}`;
    for (const el of part.querySelectorAll("[aria-describedby]")) {
      el.setAttribute("aria-describedby", `${el.getAttribute("aria-describedby")}-${suffix}`);
    }
    slot.replaceWith(part);
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function thumbnail(image, i, onRemove) {
  const remove = element("button", { type: "button", textContent: "Remove", onclick: onRemove });
  remove.setAttribute("aria-label", `Remove reference image ${i + 1} (${image.name})`);
  return element("li", {}, element("img", { src: image.url, alt: `Reference image ${i + 1}: ${image.name}` }), remove);
}

// Reference images from the file picker or dropped on the drop zone, kept as data URLs (the JSON
// API takes them as they are). Returns a function giving the current list.
function initReferenceImages(form, view) {
  const input = form.elements.images;
  const drop = $(".drop", form);
  const list = $(".thumbs", form);
  const images = [];

  const render = () => list.replaceChildren(...images.map((image, i) => thumbnail(image, i, () => {
    images.splice(i, 1);
    render();
  })));

  const add = async (files) => {
    const chosen = files.filter((f) => f.type.startsWith("image/"));
    if (chosen.length < files.length) view.showError("Only image files can be used as reference images.");
    const read = await Promise.all(chosen.map(async (file) => ({ name: file.name, url: await readAsDataURL(file) })));
    // counted after reading: another drop may have added images meanwhile
    const room = Math.max(MAX_REFERENCE_IMAGES - images.length, 0);
    if (read.length > room) view.showError(`At most ${MAX_REFERENCE_IMAGES} reference images; extra files were left out.`);
    images.push(...read.slice(0, room));
    render();
  };

  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // so that choosing the same file again fires another change
    add(files);
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    add([...ev.dataTransfer.files]);
  });
  return () => images.map((image) => image.url);
}

function initPreviewToggle(form) {
  const { previews, preview_every_rows: rows } = form.elements;
  previews.addEventListener("change", () => { rows.disabled = !previews.checked; });
}

// ---- the request ------------------------------------------------------------------------------

// Empty fields are left out so the task's defaults apply.
function setNumber(target, key, input) {
  if (input.value.trim() !== "") target[key] = Number(input.value);
}

function readParams(form) {
  const f = form.elements;
  const body = { prompt: f.prompt.value };
  const size = f.size.value.trim();
  if (size) body[ASPECT_RATIOS.has(size) ? "aspect_ratio" : "size"] = size;
  for (const key of ["guidance_scale", "seed", "max_new_tokens", "image_area"]) setNumber(body, key, f[key]);
  for (const kind of ["text_sampling", "image_sampling"]) {
    const sampling = {};
    for (const key of ["top_k", "top_p", "temperature"]) setNumber(sampling, key, f[`${kind}.${key}`]);
    if (Object.keys(sampling).length) body[kind] = sampling;
  }
  // the schedule: left out unless asked (the server's default; /v1/models lists what the engine offers)
  const decoding = {};
  if (f["decoding.mode"].value) decoding.mode = f["decoding.mode"].value;
  for (const key of ["draft_len", "window"]) setNumber(decoding, key, f[`decoding.${key}`]);
  if (Object.keys(decoding).length) body.decoding = decoding;
  return body;
}

function buildRequest(form, images) {
  const body = readParams(form);
  if (images.length) body.images = images;
  let path;
  if (form.dataset.mode === "image") {
    path = images.length ? "/v1/x2i" : "/v1/t2i";
  } else {
    const task = form.elements.task.value;
    path = TASK_ENDPOINTS[task] ?? "/v1/generate";
    if (!(task in TASK_ENDPOINTS)) body.task = task;
  }
  // The interleaved tab always streams: its point is watching text and images arrive.
  const stream = form.dataset.mode === "interleaved" || form.elements.stream.checked;
  if (stream) {
    body.stream = true;
    body.include_record = true; // the page offers the record for download; the done event then carries it
    if (form.elements.previews.checked) setNumber(body, "preview_every_rows", form.elements.preview_every_rows);
  }
  return { path, body, stream };
}

// The API's error shape is {"error": {message, type, param, code}}; anything else (a proxy's page)
// is shown as its status and the start of its text.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error?.message) return `${error.message} (${error.code ?? response.status})`;
  } catch { /* not JSON: fall through */ }
  return `HTTP ${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
}

// ---- server-sent events -------------------------------------------------------------------------

// EventSource cannot POST a JSON body, so text/event-stream is parsed here from the fetch body:
// "event:" and "data:" fields, an event ends at a blank line, lines starting with ":" are comments
// (the server's keep-alive pings).
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? "\n" : value; // at the end, a "\r" left waiting is a line end after all
      let end;
      while ((end = /\r\n|\r|\n/.exec(buffer))) {
        // a "\r" at the very end may be the first half of "\r\n": wait for the next chunk
        if (end[0] === "\r" && end.index === buffer.length - 1) break;
        const line = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {}); // leaving early (done / error event) releases the connection
  }
}

const STREAM_HANDLERS = {
  global_cot: (view, d) => view.appendText("global_cot", d.delta),
  text: (view, d) => view.appendText("text", d.delta),
  image_cot: (view, d) => view.appendText("image_cot", d.delta),
  image_start: (view, d) => view.imageStart(d),
  image_progress: (view, d) => view.imageProgress(d),
  image: (view, d) => view.imageDone(d),
  done: (view, d) => view.finish(d),
  error: (view, d) => view.fail(`${d.message} (${d.code})`),
};

async function consumeStream(response, view) {
  for await (const { event, data } of readEvents(response)) {
    STREAM_HANDLERS[event]?.(view, JSON.parse(data));
    if (event === "done" || event === "error") return;
  }
  throw new Error("the stream ended before the generation finished");
}

// ---- the result view ----------------------------------------------------------------------------

// Each kind of text gets its own block; `body` is where its deltas go.
const TEXT_BLOCKS = {
  text: () => {
    const p = element("p", { className: "segment text" });
    return { root: p, body: p };
  },
  global_cot: () => cotBlock("Chain of thought"),
  image_cot: () => cotBlock("Image plan"),
};

// Chain-of-thought is shown collapsed: it is the model's working, not its answer.
function cotBlock(title) {
  const body = element("p", { className: "cot-text" });
  const root = element("details", { className: "segment cot" }, element("summary", { textContent: title }), body);
  return { root, body };
}

class ResultView {
  constructor(root) {
    this.root = root;
    this.error = $(".error", root);
    this.status = $(".status", root);
    this.result = $(".result", root);
    this.record = $("a.record", root);
    this.figures = new Map();
    this.block = null; // the text block deltas go to; a new one starts when the kind changes
  }

  setState(state) {
    this.root.dataset.state = state;
    this.root.setAttribute("aria-busy", String(state === "running"));
  }

  begin() {
    this.result.replaceChildren();
    this.figures.clear();
    this.block = null;
    this.error.hidden = true;
    this.record.hidden = true;
    if (this.record.href) URL.revokeObjectURL(this.record.href);
    this.record.removeAttribute("href");
    this.status.textContent = "Generating…";
    this.setState("running");
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }

  appendText(kind, delta) {
    if (this.block?.kind !== kind) {
      const { root, body } = TEXT_BLOCKS[kind]();
      this.result.append(root);
      this.block = { kind, body };
    }
    // a block starts at its first visible character (text after an image begins with a space)
    if (!this.block.body.textContent) delta = delta.trimStart();
    this.block.body.append(delta);
  }

  // The figure of image `index`: a frame of the final shape (filled by previews, then the image),
  // a progress bar of rows drawn and a caption.
  figure(index, width, height) {
    let fig = this.figures.get(index);
    if (fig) return fig;
    const img = element("img", { alt: `Image ${index + 1}, being drawn` });
    const frame = element("div", { className: "frame" }, img);
    frame.style.aspectRatio = `${width} / ${height}`;
    frame.style.width = `${width}px`;
    const progress = element("progress", { max: height / PATCH, value: 0 });
    progress.setAttribute("aria-label", `Image ${index + 1}: rows drawn`);
    const caption = element("figcaption", { textContent: `Image ${index + 1} · ${width}×${height}` });
    const root = element("figure", { className: "segment image" }, frame, progress, caption);
    root.dataset.state = "drawing";
    root.dataset.index = String(index);
    this.result.append(root);
    fig = { root, img, progress };
    this.figures.set(index, fig);
    this.block = null; // text after an image starts a new paragraph
    return fig;
  }

  imageStart({ index, width, height }) {
    this.figure(index, width, height);
  }

  imageProgress({ index, rows, total_rows: total, b64_json: preview }) {
    const fig = this.figures.get(index);
    if (!fig) return;
    fig.progress.max = total;
    fig.progress.value = rows;
    if (preview) fig.img.src = `data:image/png;base64,${preview}`;
  }

  imageDone({ index, b64_json: png, width, height }) {
    const fig = this.figure(index, width, height);
    fig.img.src = `data:image/png;base64,${png}`;
    fig.img.alt = `Generated image ${index + 1}, ${width}×${height}`;
    fig.progress.hidden = true;
    fig.root.dataset.state = "done";
  }

  // `done` event or JSON body: timings, token counts and the record.
  finish({ id, record, timings, usage, finish_reason: reason }) {
    const parts = [`Done in ${timings.seconds.toFixed(2)} s`];
    if (timings.time_to_first_token != null) parts.push(`first token after ${timings.time_to_first_token.toFixed(2)} s`);
    if (usage) parts.push(`${usage.completion_tokens} tokens (${usage.visual_tokens} visual)`);
    if (timings.decode_steps) parts.push(`${timings.decode_steps} decode steps`);
    if (timings.tokens_per_pass) parts.push(`${timings.tokens_per_pass.toFixed(2)} tokens per pass`);
    if (timings.decoding) parts.push(`schedule ${timings.decoding.mode}`);
    if (reason && reason !== "stop") parts.push(`finish: ${reason}`);
    this.status.textContent = parts.join(" · ");
    this.offerRecord(id, record);
    this.setState("done");
  }

  // the whole answer at once (the Image tab without streaming)
  showResponse(body) {
    body.images.forEach((image, index) => this.imageDone({ index, ...image }));
    this.finish(body);
  }

  offerRecord(id, b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    this.record.href = URL.createObjectURL(new Blob([bytes], { type: "application/x-protobuf" }));
    this.record.download = `${id}.pb`;
    this.record.hidden = false;
  }

  fail(message) {
    this.showError(message);
    this.status.textContent = "Failed.";
    this.setState("error");
  }

  stopped() {
    for (const { root } of this.figures.values()) if (root.dataset.state === "drawing") root.dataset.state = "stopped";
    this.status.textContent = "Stopped.";
    this.setState("stopped");
  }
}

// ---- running a generation -----------------------------------------------------------------------

function setRunning(panel, running) {
  $('button[type="submit"]', panel.form).disabled = running;
  $(".stop", panel.form).disabled = !running;
}

async function run(panel) {
  const { form, view } = panel;
  const { path, body, stream } = buildRequest(form, panel.images());
  // Stop aborts the fetch; the server sees the connection close and aborts the generation.
  const controller = new AbortController();
  panel.controller = controller;
  view.begin();
  setRunning(panel, true);
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: stream ? "text/event-stream" : "application/json",
                 ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    }).catch((err) => { throw new Error(`Network error: ${err.message}`); });
    if (!response.ok) throw new Error(await errorMessage(response));
    if (stream) await consumeStream(response, view);
    else view.showResponse(await response.json());
  } catch (err) {
    // an abort surfaces as an error from fetch or from reading the body: it is the Stop button
    if (controller.signal.aborted) view.stopped();
    else view.fail(err.message);
  } finally {
    panel.controller = null;
    setRunning(panel, false);
  }
}

function initPanel(section) {
  const form = $("form", section);
  fillSlots(section, form.dataset.mode);
  const view = new ResultView($(".output", section));
  const panel = { form, view, images: initReferenceImages(form, view), controller: null };
  initPreviewToggle(form);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!panel.controller) run(panel);
  });
  $(".stop", form).addEventListener("click", () => panel.controller?.abort());
  // Ctrl/Cmd+Enter in the prompt generates, as in most chat boxes
  form.elements.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) form.requestSubmit();
  });
}

initApiKey();
initTabs();
document.querySelectorAll('[role="tabpanel"]').forEach(initPanel);

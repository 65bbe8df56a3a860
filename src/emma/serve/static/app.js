// EMMA clinician web UI: plain JavaScript, no build step, no network beyond this server.
// Talks to the HTTP contract in docs/serving.md: POST /v1/emma/preview, POST /v1/chat/completions
// (stream: true, SSE), GET /health. Model output is only ever inserted as text (never as HTML).
"use strict";

(() => {
  const NOTICE = "Research tool — not for clinical use.";
  const KEY_STORAGE = "emma.apiKey";
  const MAX_FILE_BYTES = 512 * 1024 * 1024; // the server enforces its own, smaller bounds

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("server-status"),
    dropzone: $("dropzone"),
    fileInput: $("file-input"),
    window: $("window"),
    plane: $("plane"),
    slices: $("slices"),
    volumeMode: $("volume-mode"),
    gallery: $("gallery"),
    galleryEmpty: $("gallery-empty"),
    mode: $("mode"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    chiefComplaint: $("chief-complaint"),
    vitals: $("vitals"),
    triageNote: $("triage-note"),
    log: $("log"),
    logEmpty: $("log-empty"),
    error: $("error"),
    form: $("ask-form"),
    question: $("question"),
    send: $("send"),
    stop: $("stop"),
    exportJson: $("export-json"),
    exportMd: $("export-md"),
    newConversation: $("new-conversation"),
  };

  // ---- state (client-side only) ------------------------------------------------------------
  // uploads: {id, name, mime, dataUrl, status: "loading"|"ok"|"error", previews: [{width, height,
  //   png, provenance}], error, sentSeq: number|null, pending: Promise}
  // turns: user {role, text, mode, context, uploadIds} and assistant {role, text, mode, emma,
  //   usage, finishReason, failed, error}; a user turn and its answer are dropped from the history
  //   sent to the server when the answer failed or was stopped.
  const state = {
    uploads: [],
    turns: [],
    nextUploadId: 1,
    nextSendSeq: 1,
    modelId: null,
    busy: false,
    controller: null,
    shownBoxesTurn: null,
  };

  // ---- small helpers --------------------------------------------------------------------------
  function make(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function authHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  // Turn a failed HTTP response into a readable one-line message (OpenAI-style error body).
  async function responseError(res) {
    let detail = "";
    try {
      const body = await res.json();
      if (body && body.error) {
        detail = typeof body.error === "string" ? body.error : body.error.message || "";
      } else if (body && body.detail) {
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (_) {
      detail = "";
    }
    const hints = {
      401: "check the API key",
      413: "the request or an image is over the server's limits",
      503: "the server is busy",
    };
    let message = `Server error ${res.status}${detail ? `: ${detail}` : ""}`;
    if (hints[res.status] && !detail) message += ` (${hints[res.status]})`;
    if (res.status === 503) {
      const retry = res.headers.get("Retry-After");
      if (retry) message += ` — retry in ${retry} s`;
    }
    return new Error(message);
  }

  function networkError(err) {
    if (err && err.name === "AbortError") return err;
    return new Error(`Cannot reach the server (${err && err.message ? err.message : "network error"})`);
  }

  function download(filename, mime, text) {
    const url = URL.createObjectURL(new Blob([text], { type: mime }));
    const link = make("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  function timestamp() {
    return new Date().toISOString().replace(/[:]/g, "-").replace(/\..*$/, "");
  }

  // ---- file reading ---------------------------------------------------------------------------
  function startsWith(bytes, signature, offset = 0) {
    if (bytes.length < offset + signature.length) return false;
    return signature.every((b, i) => bytes[offset + i] === b);
  }

  // Browsers give .dcm files an empty or odd MIME type: decide from magic bytes, then extension.
  async function detectMime(file) {
    const head = new Uint8Array(await file.slice(0, 352).arrayBuffer());
    const name = file.name.toLowerCase();
    if (startsWith(head, [0x44, 0x49, 0x43, 0x4d], 128)) return "application/dicom"; // "DICM"
    if (startsWith(head, [0x89, 0x50, 0x4e, 0x47])) return "image/png";
    if (startsWith(head, [0xff, 0xd8, 0xff])) return "image/jpeg";
    if (startsWith(head, [0x6e, 0x2b, 0x31, 0x00], 344) || startsWith(head, [0x6e, 0x69, 0x31, 0x00], 344)) {
      return "application/x-nifti";
    }
    if (startsWith(head, [0x1f, 0x8b])) return name.endsWith(".nii.gz") ? "application/gzip" : null;
    if (name.endsWith(".dcm") || name.endsWith(".dicom")) return "application/dicom"; // no preamble
    if (name.endsWith(".png")) return "image/png";
    if (name.endsWith(".jpg") || name.endsWith(".jpeg")) return "image/jpeg";
    if (file.type === "application/dicom" || file.type === "image/png" || file.type === "image/jpeg") {
      return file.type;
    }
    return null;
  }

  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const result = String(reader.result);
        resolve(result.slice(result.indexOf(",") + 1));
      };
      reader.onerror = () => reject(new Error(`could not read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(fileList) {
    showError("");
    const files = Array.from(fileList || []);
    for (const file of files) {
      const upload = {
        id: state.nextUploadId++,
        name: file.name || "image",
        mime: null,
        dataUrl: null,
        status: "loading",
        previews: [],
        error: null,
        sentSeq: null,
        pending: null,
      };
      state.uploads.push(upload);
      upload.pending = (async () => {
        try {
          if (file.size > MAX_FILE_BYTES) throw new Error("file is too large");
          upload.mime = await detectMime(file);
          if (!upload.mime) throw new Error("not a DICOM, PNG, JPEG or NIfTI file");
          upload.dataUrl = `data:${upload.mime};base64,${await readBase64(file)}`;
          await fetchPreview(upload);
        } catch (err) {
          upload.status = "error";
          upload.error = err.message;
        }
        renderGallery();
      })();
    }
    renderGallery();
    await Promise.all(state.uploads.map((u) => u.pending));
  }

  function volumeOptions() {
    const slices = Math.max(1, Math.min(64, parseInt(el.slices.value, 10) || 8));
    return {
      window: el.window.value || null,
      plane: el.plane.value,
      slices,
      volume_mode: el.volumeMode.value,
    };
  }

  // The exact model-ready images (one upload may give several: a volume's sampled slices).
  async function fetchPreview(upload) {
    upload.status = "loading";
    renderGallery();
    let res;
    try {
      res = await fetch("/v1/emma/preview", {
        method: "POST",
        headers: authHeaders(),
        body: JSON.stringify({ images: [upload.dataUrl], ...volumeOptions() }),
      });
    } catch (err) {
      throw networkError(err);
    }
    if (!res.ok) throw await responseError(res);
    const body = await res.json();
    const images = Array.isArray(body.images) ? body.images : [];
    if (!images.length) throw new Error("the server returned no image");
    upload.previews = images.map((im) => ({
      width: im.width,
      height: im.height,
      png: im.png,
      provenance: im.provenance || null,
    }));
    upload.status = "ok";
    upload.error = null;
  }

  function refreshPreviews({ failedOnly = false } = {}) {
    for (const upload of state.uploads) {
      if (!upload.dataUrl || (failedOnly && upload.status !== "error")) continue;
      upload.pending = fetchPreview(upload)
        .catch((err) => {
          upload.status = "error";
          upload.error = err.message;
        })
        .finally(renderGallery);
    }
  }

  // ---- image indexing -------------------------------------------------------------------------
  // The server numbers images in order of appearance across all messages; uploads are attached to
  // the turn in which they are first sent, so the order is the order of sending.
  function sentUploads() {
    return state.uploads.filter((u) => u.sentSeq !== null).sort((a, b) => a.sentSeq - b.sentSeq);
  }

  function imageSlots() {
    // [{upload, slice, index|null}] in display order: sent images by index, then unsent ones.
    const slots = [];
    let index = 0;
    for (const upload of sentUploads()) {
      upload.previews.forEach((p, slice) => slots.push({ upload, slice, index: index++ }));
    }
    for (const upload of state.uploads) {
      if (upload.sentSeq !== null) continue;
      if (upload.previews.length && upload.status === "ok") {
        upload.previews.forEach((p, slice) => slots.push({ upload, slice, index: null }));
      } else {
        slots.push({ upload, slice: null, index: null });
      }
    }
    return slots;
  }

  // ---- rendering: gallery and boxes ---------------------------------------------------------------
  function renderGallery() {
    el.gallery.replaceChildren();
    const slots = imageSlots();
    el.galleryEmpty.hidden = slots.length > 0;
    for (const slot of slots) {
      const { upload, slice, index } = slot;
      const li = make("li", { class: "thumb", "data-upload": upload.id });
      const label = index === null ? "not sent yet" : `image ${index + 1}`;
      if (slice === null) {
        const text = upload.status === "error" ? `Error: ${upload.error}` : "Preparing preview…";
        li.append(
          make("div", { class: `placeholder ${upload.status}` }, text),
          caption(upload, null, label)
        );
      } else {
        const preview = upload.previews[slice];
        const frame = make("div", {
          class: "frame",
          "data-image-index": index === null ? null : index,
        });
        frame.append(
          make("img", {
            src: preview.png,
            alt: `${label}, ${preview.width}×${preview.height}`,
            width: preview.width,
            height: preview.height,
          }),
          make("div", { class: "boxes" })
        );
        li.append(frame, caption(upload, slice, label));
      }
      el.gallery.append(li);
    }
    drawBoxes(state.shownBoxesTurn);
  }

  function caption(upload, slice, label) {
    const parts = [label];
    if (slice !== null) {
      const preview = upload.previews[slice];
      parts.push(`${preview.width}×${preview.height}`);
      if (upload.previews.length > 1) parts.push(`slice ${slice + 1}/${upload.previews.length}`);
    }
    const cap = make("div", { class: "caption" }, make("span", { class: "name", title: upload.name }, upload.name));
    cap.append(make("span", { class: "muted" }, parts.join(" · ")));
    if (upload.sentSeq === null && (slice === null || slice === 0)) {
      const remove = make("button", { type: "button", class: "link", "aria-label": `Remove ${upload.name}` }, "remove");
      remove.addEventListener("click", () => {
        state.uploads = state.uploads.filter((u) => u !== upload);
        renderGallery();
      });
      cap.append(remove);
    }
    return cap;
  }

  function frameForIndex(index) {
    return el.gallery.querySelector(`.frame[data-image-index="${index}"]`);
  }

  // Boxes are pixels of the model-ready image: position them in percent so they follow the
  // displayed size of the preview whatever the layout.
  function drawBoxes(turn) {
    for (const layer of el.gallery.querySelectorAll(".boxes")) layer.replaceChildren();
    if (!turn || !turn.emma || !Array.isArray(turn.emma.boxes)) return;
    const sizes = Array.isArray(turn.emma.images) ? turn.emma.images : [];
    turn.emma.boxes.forEach((box, n) => {
      const index = Number.isInteger(box.image_index) ? box.image_index : 0;
      const frame = frameForIndex(index);
      if (!frame) return;
      const img = frame.querySelector("img");
      const size = sizes.find((s) => s.index === index);
      const width = (size && size.width) || Number(img.getAttribute("width"));
      const height = (size && size.height) || Number(img.getAttribute("height"));
      if (!width || !height) return;
      const x1 = Math.max(0, Math.min(box.x1, box.x2));
      const y1 = Math.max(0, Math.min(box.y1, box.y2));
      const x2 = Math.min(width, Math.max(box.x1, box.x2));
      const y2 = Math.min(height, Math.max(box.y1, box.y2));
      if (!(x2 > x1 && y2 > y1)) return;
      const inside = y1 / height < 0.08; // no room for the label above the box
      const div = make("div", { class: inside ? "box label-inside" : "box", title: box.label || `box ${n + 1}` });
      div.style.left = `${(100 * x1) / width}%`;
      div.style.top = `${(100 * y1) / height}%`;
      div.style.width = `${(100 * (x2 - x1)) / width}%`;
      div.style.height = `${(100 * (y2 - y1)) / height}%`;
      div.append(make("span", { class: "box-label" }, box.label || String(n + 1)));
      frame.querySelector(".boxes").append(div);
    });
  }

  // ---- rendering: conversation ------------------------------------------------------------------
  function renderTurn(turn) {
    const node = make("article", { class: `turn ${turn.role}` });
    const who = turn.role === "user" ? "You" : "EMMA";
    const head = make("header", {}, make("strong", {}, who), make("span", { class: "badge" }, turn.mode));
    if (turn.role === "user" && turn.uploadIds.length) {
      head.append(make("span", { class: "muted" }, ` + ${turn.uploadIds.length} file(s)`));
    }
    node.append(head, make("div", { class: "text" }, turn.text || (turn.role === "assistant" ? "…" : "")));
    if (turn.role === "assistant") node.append(make("div", { class: "details" }));
    turn.node = node;
    el.logEmpty.hidden = true;
    el.log.append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  // Box markup in answers (EMMA/InternVL <ref>/<box>, Qwen2-VL box tokens) shown as small chips;
  // the raw text stays in the history and the exports.
  const BOX_MARKUP = /(?:<ref>([^<]{0,400})<\/ref>\s*)?<box[^<>]{0,40}>[\s\S]*?<\/box>|(?:<\|object_ref_start\|>([^<]{0,400})<\|object_ref_end\|>\s*)?<\|box_start\|>[\s\S]*?<\|box_end\|>/g;

  function answerNodes(text) {
    const nodes = [];
    let last = 0;
    for (const match of text.matchAll(BOX_MARKUP)) {
      if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
      const label = (match[1] || match[2] || "").trim();
      nodes.push(make("span", { class: "box-chip", title: match[0] }, label ? `▭ ${label}` : "▭ box"));
      last = match.index + match[0].length;
    }
    if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
    return nodes;
  }

  function updateAnswerText(turn) {
    const node = turn.node.querySelector(".text");
    if (turn.text) node.replaceChildren(...answerNodes(turn.text));
    else node.textContent = "…";
  }

  function listSection(title, items) {
    const section = make("div", { class: "section" }, make("h4", {}, title));
    const list = make("ul");
    for (const item of items) list.append(item instanceof Node ? make("li", {}, item) : make("li", {}, String(item)));
    section.append(list);
    return section;
  }

  function asText(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "string") return value;
    if (typeof value === "number" || typeof value === "boolean") return String(value);
    return JSON.stringify(value);
  }

  function pick(obj, ...keys) {
    for (const key of keys) if (obj && obj[key] !== undefined && obj[key] !== null) return obj[key];
    return undefined;
  }

  function formatLikelihood(value) {
    if (typeof value === "number") return value <= 1 ? `${Math.round(value * 100)}%` : String(value);
    return asText(value);
  }

  // Normalised view of a DiagnosticOutput, tolerant of field-name variants.
  function structuredView(s) {
    const findings = (pick(s, "findings") || []).map((f) =>
      typeof f === "string" ? { text: f, box: null } : {
        text: asText(pick(f, "description", "finding", "text", "name", "label")),
        location: asText(pick(f, "location", "region")),
        severity: asText(pick(f, "severity")),
        box: pick(f, "box", "bbox") || null,
      });
    const differential = (pick(s, "differential", "differential_diagnosis", "differentials") || []).map((d) =>
      typeof d === "string" ? { diagnosis: d, likelihood: "" } : {
        diagnosis: asText(pick(d, "diagnosis", "name", "condition", "label")),
        likelihood: formatLikelihood(pick(d, "likelihood", "probability", "score")),
        rationale: asText(pick(d, "rationale", "reason", "evidence")),
      });
    const nextSteps = (pick(s, "recommended_next_steps", "next_steps", "recommendations") || []).map(asText);
    return {
      abstain: Boolean(pick(s, "abstain", "cannot_determine")),
      abstainReason: asText(pick(s, "abstain_reason", "reason")),
      findings,
      differential,
      urgency: asText(pick(s, "triage_urgency", "urgency", "triage")).replace(/_/g, " "),
      nextSteps,
      confidence: formatLikelihood(pick(s, "confidence")),
    };
  }

  function renderStructured(s) {
    const v = structuredView(s);
    const card = make("div", { class: "structured" }, make("h3", {}, "Structured findings"));
    const meta = make("p", { class: "meta" });
    if (v.urgency) meta.append(make("span", { class: `urgency urgency-${v.urgency.toLowerCase().replace(/[^a-z]/g, "")}` }, `Triage urgency: ${v.urgency}`));
    if (v.confidence) meta.append(make("span", {}, `Confidence: ${v.confidence}`));
    if (meta.childNodes.length) card.append(meta);
    if (v.abstain) {
      card.append(make("p", { class: "abstain" }, `Cannot determine${v.abstainReason ? `: ${v.abstainReason}` : "."}`));
    }
    if (v.findings.length) {
      card.append(listSection("Findings", v.findings.map((f) =>
        `${f.severity ? `[${f.severity}] ` : ""}${f.text}${f.location ? ` (${f.location})` : ""}`)));
    }
    if (v.differential.length) {
      card.append(listSection("Differential", v.differential.map((d) =>
        `${d.diagnosis}${d.likelihood ? ` — ${d.likelihood}` : ""}${d.rationale ? `: ${d.rationale}` : ""}`)));
    }
    if (v.nextSteps.length) card.append(listSection("Next steps", v.nextSteps));
    return card;
  }

  function parsedReport(emma) {
    const report = emma && emma.report;
    return report && (report.findings || report.impression) ? report : null;
  }

  function renderReport(report) {
    const card = make("div", { class: "structured report" }, make("h3", {}, "Report draft"));
    card.append(make("h4", {}, "Findings"), make("p", { class: "text" }, report.findings || "—"));
    card.append(make("h4", {}, "Impression"), make("p", { class: "text" }, report.impression || "—"));
    return card;
  }

  function renderAnswerDetails(turn) {
    const details = turn.node.querySelector(".details");
    const textNode = turn.node.querySelector(".text");
    details.before(textNode); // back in place if an earlier render folded it away
    details.replaceChildren();
    const emma = turn.emma || {};
    if (turn.error) details.append(make("p", { class: "error-inline" }, turn.error));
    if (emma.structured) details.append(renderStructured(emma.structured));
    const report = parsedReport(emma);
    if (report) details.append(renderReport(report));
    if (emma.structured || report) {
      // parsed: the raw model output folds away under the rendered version
      const raw = make("details", { class: "raw" }, make("summary", {}, "Raw model output"));
      raw.append(textNode);
      details.append(raw);
    }
    const problems = [...(emma.structured_errors || []), ...(emma.report_errors || []), ...(emma.box_errors || [])];
    if (Array.isArray(emma.boxes) && emma.boxes.length) {
      const names = emma.boxes.map((b) => `${b.label || "box"} (image ${(b.image_index || 0) + 1})`);
      const line = make("p", { class: "boxes-line" }, `${emma.boxes.length} box(es): ${names.join(", ")} `);
      const show = make("button", { type: "button", class: "link" }, "show on images");
      show.addEventListener("click", () => {
        state.shownBoxesTurn = turn;
        drawBoxes(turn);
      });
      line.append(show);
      details.append(line);
    }
    if (problems.length) {
      details.append(make("p", { class: "muted" }, `Output problems: ${problems.map(asText).join("; ")}`));
    }
    const foot = [];
    if (turn.usage) foot.push(`${turn.usage.prompt_tokens} prompt + ${turn.usage.completion_tokens} completion tokens`);
    if (turn.finishReason && turn.finishReason !== "stop") foot.push(`finish: ${turn.finishReason}`);
    if (foot.length) details.append(make("p", { class: "muted small" }, foot.join(" · ")));
  }

  // ---- request building -------------------------------------------------------------------------
  function contextText() {
    const parts = [];
    const cc = el.chiefComplaint.value.trim();
    const vitals = el.vitals.value.trim();
    const triage = el.triageNote.value.trim();
    if (cc) parts.push(`Chief complaint: ${cc}`);
    if (vitals) parts.push(`Vitals: ${vitals}`);
    if (triage) parts.push(`Triage note: ${triage}`);
    return parts.join("\n");
  }

  function historyMessages() {
    const messages = [];
    const turns = state.turns;
    for (let i = 0; i < turns.length; i++) {
      const turn = turns[i];
      if (turn.role !== "user") continue;
      const answer = turns[i + 1];
      const isCurrent = i === turns.length - 1;
      if (!isCurrent && (!answer || answer.failed)) continue;
      const content = [];
      for (const id of turn.uploadIds) {
        const upload = state.uploads.find((u) => u.id === id);
        if (upload) content.push({ type: "image_url", image_url: { url: upload.dataUrl } });
      }
      content.push({ type: "text", text: turn.text });
      messages.push({ role: "user", content });
      if (!isCurrent) messages.push({ role: "assistant", content: answer.text });
    }
    return messages;
  }

  // Parse an SSE body: `data: {...}` lines, ending with `data: [DONE]`.
  async function readStream(res, onEvent) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const { value, done: finished } = await reader.read();
      if (finished) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") {
          done = true;
          break;
        }
        if (payload) onEvent(JSON.parse(payload));
      }
    }
    if (done) reader.cancel().catch(() => {});
    return done;
  }

  async function ask(question) {
    showError("");
    const pending = state.uploads.filter((u) => u.status === "loading").map((u) => u.pending);
    if (pending.length) {
      setBusy(true, "Preparing images…");
      await Promise.all(pending);
    }
    const fresh = state.uploads.filter((u) => u.sentSeq === null && u.status === "ok");
    const mode = el.mode.value;
    const userTurn = { role: "user", text: question, mode, context: contextText(), uploadIds: fresh.map((u) => u.id) };
    for (const upload of fresh) upload.sentSeq = state.nextSendSeq++;
    const answer = { role: "assistant", text: "", mode, emma: null, usage: null, finishReason: null, failed: false, error: null };
    state.turns.push(userTurn);
    renderTurn(userTurn);
    renderGallery();

    const body = {
      messages: historyMessages(),
      stream: true,
      max_tokens: Math.max(1, Math.min(8192, parseInt(el.maxTokens.value, 10) || 512)),
      temperature: 0,
      emma: { mode, context: userTurn.context || null, ...volumeOptions() },
    };
    if (state.modelId) body.model = state.modelId;
    state.turns.push(answer);
    renderTurn(answer);
    setBusy(true, "Generating…");
    state.controller = new AbortController();
    try {
      let res;
      try {
        res = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: authHeaders(),
          body: JSON.stringify(body),
          signal: state.controller.signal,
        });
      } catch (err) {
        throw networkError(err);
      }
      if (!res.ok) throw await responseError(res);
      const complete = await readStream(res, (chunk) => {
        if (chunk.error) throw new Error(`Server error: ${chunk.error.message || asText(chunk.error)}`);
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta && typeof choice.delta.content === "string") {
          answer.text += choice.delta.content;
          updateAnswerText(answer);
        }
        if (choice && choice.finish_reason) answer.finishReason = choice.finish_reason;
        if (chunk.usage) answer.usage = chunk.usage;
        if (chunk.emma) answer.emma = chunk.emma;
      });
      if (!complete) throw new Error("The answer stream ended early");
      if (answer.emma && (answer.emma.boxes || []).length) state.shownBoxesTurn = answer;
      drawBoxes(state.shownBoxesTurn);
    } catch (err) {
      answer.failed = true;
      answer.error = err.name === "AbortError" ? "Stopped." : err.message;
      if (err.name !== "AbortError") showError(err.message);
      // Not part of the history: its images go with the next question instead.
      for (const upload of state.uploads) if (userTurn.uploadIds.includes(upload.id)) upload.sentSeq = null;
      renderGallery();
    } finally {
      state.controller = null;
      updateAnswerText(answer);
      renderAnswerDetails(answer);
      answer.node.classList.toggle("failed", answer.failed);
      answer.node.setAttribute("data-done", "true");
      setBusy(false);
    }
  }

  function setBusy(busy, label) {
    state.busy = busy;
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    el.send.textContent = busy ? label || "Working…" : "Ask";
    const answered = state.turns.some((t) => t.role === "assistant" && !t.failed);
    el.exportJson.disabled = busy || !state.turns.length;
    el.exportMd.disabled = busy || !answered;
  }

  // ---- exports (no image pixels and no file names: they may identify a patient) ---------------
  function imageSummaries() {
    return imageSlots()
      .filter((s) => s.index !== null)
      .map((s) => {
        const p = s.upload.previews[s.slice];
        return { index: s.index, width: p.width, height: p.height, mime: s.upload.mime };
      });
  }

  function exportConversation() {
    const doc = {
      tool: "EMMA",
      notice: NOTICE,
      exported_at: new Date().toISOString(),
      model: state.modelId,
      settings: { ...volumeOptions() },
      images: imageSummaries(),
      turns: state.turns.map((t) =>
        t.role === "user"
          ? { role: "user", mode: t.mode, context: t.context || null, text: t.text, images: t.uploadIds.length }
          : {
              role: "assistant",
              mode: t.mode,
              text: t.text,
              failed: t.failed,
              error: t.error,
              finish_reason: t.finishReason,
              usage: t.usage,
              boxes: t.emma ? t.emma.boxes || [] : [],
              structured: t.emma ? t.emma.structured || null : null,
            }),
    };
    download(`emma-conversation-${timestamp()}.json`, "application/json", JSON.stringify(doc, null, 2));
  }

  function structuredMarkdown(s) {
    const v = structuredView(s);
    const lines = [];
    if (v.abstain) lines.push(`**Cannot determine**${v.abstainReason ? `: ${v.abstainReason}` : ""}`, "");
    if (v.urgency) lines.push(`- Urgency: ${v.urgency}`);
    if (v.confidence) lines.push(`- Confidence: ${v.confidence}`);
    if (v.urgency || v.confidence) lines.push("");
    if (v.findings.length) {
      lines.push("### Findings", "", ...v.findings.map((f) =>
        `- ${f.severity ? `[${f.severity}] ` : ""}${f.text}${f.location ? ` (${f.location})` : ""}`), "");
    }
    if (v.differential.length) {
      lines.push("### Differential", "", ...v.differential.map((d) => `- ${d.diagnosis}${d.likelihood ? ` — ${d.likelihood}` : ""}`), "");
    }
    if (v.nextSteps.length) lines.push("### Next steps", "", ...v.nextSteps.map((n) => `- ${n}`), "");
    return lines;
  }

  function exportReport() {
    const answers = state.turns.filter((t) => t.role === "assistant" && !t.failed);
    const answer = [...answers].reverse().find((t) => t.mode === "report") || answers[answers.length - 1];
    if (!answer) return;
    const userTurn = state.turns[state.turns.indexOf(answer) - 1];
    const lines = [
      "# Report draft",
      "",
      `> **${NOTICE}** AI-generated draft; it must be reviewed and corrected by a qualified clinician.`,
      "",
      `- Generated: ${new Date().toISOString()}`,
      `- Model: ${state.modelId || "unknown"}`,
      `- Images: ${imageSummaries().map((i) => `#${i.index + 1} ${i.width}×${i.height}`).join(", ") || "none"}`,
      "",
    ];
    if (userTurn && userTurn.context) lines.push("## Clinical context", "", userTurn.context, "");
    if (userTurn) lines.push("## Request", "", userTurn.text, "");
    const report = parsedReport(answer.emma);
    if (report) {
      lines.push("## Findings", "", report.findings.trim() || "—", "", "## Impression", "", report.impression.trim() || "—", "");
    } else {
      lines.push("## Draft", "", answer.text.trim() || "(empty)", "");
    }
    if (answer.emma && answer.emma.structured) lines.push("## Structured findings", "", ...structuredMarkdown(answer.emma.structured));
    if (answer.emma && (answer.emma.boxes || []).length) {
      lines.push("## Localised findings", "");
      for (const b of answer.emma.boxes) {
        lines.push(`- ${b.label || "box"}: image ${(b.image_index || 0) + 1}, [${b.x1}, ${b.y1}, ${b.x2}, ${b.y2}] px`);
      }
      lines.push("");
    }
    download(`emma-report-draft-${timestamp()}.md`, "text/markdown", lines.join("\n"));
  }

  function newConversation() {
    if (state.controller) state.controller.abort();
    state.turns = [];
    state.uploads = [];
    state.shownBoxesTurn = null;
    el.log.replaceChildren(el.logEmpty);
    el.logEmpty.hidden = false;
    showError("");
    renderGallery();
    setBusy(false);
  }

  // ---- server status ----------------------------------------------------------------------------
  async function loadStatus() {
    try {
      const res = await fetch("/health");
      if (!res.ok) throw await responseError(res);
      const health = await res.json();
      state.modelId = health.model || null;
      el.status.textContent = `Model: ${state.modelId || "unknown"}`;
      el.status.classList.remove("down");
    } catch (err) {
      el.status.textContent = "Server unreachable";
      el.status.classList.add("down");
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------
  function init() {
    el.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
    el.apiKey.addEventListener("change", () => {
      const key = el.apiKey.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      refreshPreviews({ failedOnly: true }); // e.g. a 401 before the key was given
      loadStatus();
    });

    el.dropzone.addEventListener("click", () => el.fileInput.click());
    el.dropzone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        el.fileInput.click();
      }
    });
    el.dropzone.addEventListener("dragover", (e) => {
      e.preventDefault();
      el.dropzone.classList.add("over");
    });
    el.dropzone.addEventListener("dragleave", () => el.dropzone.classList.remove("over"));
    el.dropzone.addEventListener("drop", (e) => {
      e.preventDefault();
      el.dropzone.classList.remove("over");
      addFiles(e.dataTransfer.files);
    });
    el.fileInput.addEventListener("change", () => {
      addFiles(el.fileInput.files);
      el.fileInput.value = "";
    });
    for (const control of [el.window, el.plane, el.slices, el.volumeMode]) {
      control.addEventListener("change", () => refreshPreviews());
    }

    el.form.addEventListener("submit", (e) => {
      e.preventDefault();
      const question = el.question.value.trim();
      if (state.busy) return;
      if (!question) {
        showError("Type a question first.");
        el.question.focus();
        return;
      }
      el.question.value = "";
      ask(question);
    });
    el.question.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        el.form.requestSubmit();
      }
    });
    el.stop.addEventListener("click", () => state.controller && state.controller.abort());
    el.exportJson.addEventListener("click", exportConversation);
    el.exportMd.addEventListener("click", exportReport);
    el.newConversation.addEventListener("click", newConversation);

    renderGallery();
    setBusy(false);
    loadStatus();
  }

  init();
})();

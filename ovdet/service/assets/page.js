"use strict";
// The try-it page of `ovdet serve`: sends an image and classes to this server's POST /v1/detect and draws the boxes.
// Text from the server (class names, error messages) goes in as textContent or canvas text, never as markup.
(function () {
  const FLOOR = 0.01; // the conf every request asks for; the threshold slider filters the answer in the page
  const PALETTE = ["#ff1f5b", "#00cd6c", "#009ade", "#af58ba", "#ffc61e", "#f28522", "#a0b1ba", "#a6761d",
                   "#e7298a", "#1b9e77"];
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d"), video = $("video"), stage = $("stage");
  const state = { source: null, file: null, answer: null, stream: null, busy: false };
  const page = { floor: FLOOR, palette: PALETTE, requests: 0, answers: 0, draws: 0, shown: [], error: null };
  Object.defineProperty(page, "busy", { get: () => state.busy });
  window.ovdetPage = page;

  function colour(classId) { return PALETTE[((classId % PALETTE.length) + PALETTE.length) % PALETTE.length]; }
  function threshold() { return parseFloat($("threshold").value); }

  function status(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!isError);
    page.error = isError ? text : null;
  }

  function draw() {
    const src = state.source;
    if (!src) return;
    const w = src.videoWidth || src.width, h = src.videoHeight || src.height;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.drawImage(src, 0, 0, w, h);
    const list = $("detections");
    list.replaceChildren();
    page.shown = [];
    const answer = state.answer;
    if (answer) {
      const line = Math.max(2, Math.round(Math.max(w, h) / 200));
      ctx.lineWidth = line;
      ctx.font = `${Math.max(12, line * 6)}px system-ui, sans-serif`;
      ctx.textBaseline = "bottom";
      for (const d of answer.images[0].detections) {
        if (d.score < threshold()) continue;
        const [x1, y1, x2, y2] = d.xyxy, c = colour(d.class_id), label = `${d.class_name} ${d.score.toFixed(2)}`;
        ctx.strokeStyle = c;
        ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
        const tw = ctx.measureText(label).width + 2 * line, th = Math.max(12, line * 6) + line;
        const ty = y1 - line / 2 >= th ? y1 - line / 2 : y2 + th;
        ctx.fillStyle = c;
        ctx.fillRect(x1 - line / 2, ty - th, tw, th);
        ctx.fillStyle = "#000";
        ctx.fillText(label, x1 - line / 2 + line, ty - line / 2);
        const li = document.createElement("li"), swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = c;
        li.append(swatch, document.createTextNode(`${d.class_name} ${d.score.toFixed(3)} [${d.xyxy.join(", ")}]`));
        list.append(li);
        page.shown.push({ class_name: d.class_name, class_id: d.class_id, score: d.score, xyxy: d.xyxy, colour: c });
      }
      $("count").textContent = `(${page.shown.length} of ${answer.images[0].detections.length} at ≥ ${threshold()})`;
      const t = answer.timings || {};
      $("meta").textContent = `${answer.model} on ${answer.backend} ${answer.precision}: ${w}×${h}, ` +
        `inference ${t.inference_ms} ms, total ${t.total_ms} ms`;
    }
    page.draws += 1;
  }

  async function frameBlob() {
    if (state.file) return state.file;
    const grab = document.createElement("canvas");
    grab.width = video.videoWidth; grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    return new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", 0.9));
  }

  async function detect() {
    const classes = $("classes").value.trim();
    if (!state.source) { status("Choose, drop or film an image first."); return; }
    if (!classes) { status("Type the classes to find, e.g. person,bus|coach,!reflection"); return; }
    if (state.busy) return;
    state.busy = true;
    try {
      const form = new FormData();
      const blob = await frameBlob();
      if (state.stream && !state.file) state.source = await createImageBitmap(blob); // boxes drawn on their frame
      form.append("image", blob, state.file ? state.file.name : "camera.jpg");
      form.append("classes", classes);
      form.append("conf", String(FLOOR));
      const headers = {};
      const token = $("token").value.trim();
      if (token) headers.Authorization = `Bearer ${token}`;
      page.requests += 1;
      status("Detecting…");
      const reply = await fetch("v1/detect", { method: "POST", body: form, headers });
      let body = null;
      try { body = await reply.json(); } catch (e) { body = null; }
      if (!reply.ok) {
        const message = body && body.error ? body.error.message : `HTTP ${reply.status}`;
        status(reply.status === 401 ? `${message} (paste the token above)` : message, true);
        state.answer = null;
      } else {
        state.answer = body;
        status(`${body.images[0].detections.length} detections at conf ≥ ${FLOOR}`);
      }
    } catch (e) {
      status(`The request failed: ${e.message}`, true);
    } finally {
      state.busy = false;
      page.answers += 1;
      draw();
    }
    // live: the next frame once this one is drawn (an error stops the loop until Detect is pressed)
    if (state.stream && !state.file && !page.error) setTimeout(detect, 0);
  }

  async function useFile(file) {
    if (!file) return;
    stopCamera();
    try {
      state.source = await createImageBitmap(file);
    } catch (e) {
      status(`Cannot read ${file.name} as an image here; the server may still, try Detect.`, true);
      return;
    }
    state.file = file;
    state.answer = null;
    stage.classList.add("has-image");
    draw();
    detect();
  }

  function stopCamera() {
    if (!state.stream) return;
    for (const t of state.stream.getTracks()) t.stop();
    state.stream = null;
    $("camera").textContent = "Start camera";
  }

  async function startCamera() {
    if (state.stream) { stopCamera(); return; }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      status("This browser gives no camera here (it needs https or localhost).", true);
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (e) {
      status(`No camera: ${e.message}`, true);
      return;
    }
    video.srcObject = state.stream;
    await video.play();
    state.file = null;
    state.source = video;
    state.answer = null;
    stage.classList.add("has-image");
    $("camera").textContent = "Stop camera";
    detect();
  }

  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); detect(); });
  $("camera").addEventListener("click", startCamera);
  $("threshold").addEventListener("input", () => { $("threshold-value").textContent = $("threshold").value; draw(); });
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("over"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("over"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("over");
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  page.ready = true;
})();

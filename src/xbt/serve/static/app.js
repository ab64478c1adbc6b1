// The xbt search page: calls this service's JSON API only (same origin), with the bearer token when the
// service needs one. The token is kept in sessionStorage (this tab only) and sent as an Authorization
// header; thumbnails are fetched the same way and shown as blob: URLs, so they work with --closed-read.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const READ = meta("xbt-read"); // "open" | "token"
  const INFO = meta("xbt-info"); // "open" | "token"
  const KEY = "xbt-token";
  let token = sessionStorage.getItem(KEY) || "";
  let info = null;
  let blobUrls = [];
  let pollTimer = null;
  let queryImage = null;
  let generation = 0;
  let lastSearch = null; // [describe, request]: re-run when the side-by-side box is toggled

  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const setStatus = (text, error = false) => {
    $("status").textContent = text;
    $("status").classList.toggle("error", error);
  };

  const authHeaders = () => (token ? { Authorization: `Bearer ${token}` } : {});

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (response.status === 401) throw new Unauthorized("the service needs its bearer token");
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        detail = typeof body.detail === "string" ? body.detail : body.detail.map((d) => d.msg).join("; ");
      } catch (_) { /* not JSON */ }
      throw new Error(`${response.status}: ${detail}`);
    }
    return response;
  }

  // ---- the token ------------------------------------------------------------------------------
  function askToken(why, refused = false) {
    $("token-why").textContent = why;
    $("token-panel").hidden = false;
    $("token-input").placeholder = refused ? "that token was refused; try again" : "bearer token";
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token-input").value.trim();
    sessionStorage.setItem(KEY, token);
    $("token-input").value = "";
    $("token-panel").hidden = true;
    loadInfo();
  });
  $("token-button").addEventListener("click", () => askToken(READ === "token" ? "search" : "see the gallery's details"));

  function refused() {
    token = "";
    sessionStorage.removeItem(KEY);
    askToken(READ === "token" ? "search" : "see the gallery's details", true);
  }

  // ---- the gallery's facts and the migration's progress ---------------------------------------
  function fact(name, value) {
    const item = el("div");
    item.append(el("dt", "", name), el("dd", "", value));
    return item;
  }

  function renderInfo() {
    const facts = $("facts");
    facts.replaceChildren();
    $("token-button").hidden = Boolean(token) || (READ === "open" && INFO === "open");
    if (!info) {
      if (INFO === "token" && !token) facts.append(fact("gallery", "details need the token"));
      return;
    }
    const g = info.gallery;
    facts.append(fact("space", g.space_id), fact("items", g.size.toLocaleString("en")),
                  fact("model", info.model), fact("index", g.index_kind));
    if (info.mode !== "single") facts.append(fact("mode", info.mode));
    const t = info.transform; // a gallery `xbt gallery transform` made: rows not re-embedded natively yet
    if (t) facts.append(fact("transformed", `${t.transformed.toLocaleString("en")} of ${(t.transformed + t.native).toLocaleString("en")}`));
    if (info.mode === "migrating" && info.new_gallery) {
      facts.append(fact("new space", info.new_gallery.space_id), fact("new model", info.new_model));
    }
    const m = info.migration;
    const showBar = info.mode === "migrating" && m;
    $("migration").hidden = !showBar;
    if (showBar) {
      const share = m.plan_size ? m.position / m.plan_size : 1;
      $("migration-fill").style.width = `${(100 * share).toFixed(1)}%`;
      $("migration-text").textContent =
        `backfill ${m.position.toLocaleString("en")} / ${m.plan_size.toLocaleString("en")} (${(100 * share).toFixed(0)}%)`;
    }
    $("compare-label").hidden = !info.limits.compare_old_model;
    $("k").max = info.limits.max_k;
  }

  async function loadInfo() {
    clearTimeout(pollTimer);
    if (INFO === "token" && !token) {
      info = null;
      renderInfo();
      if (READ === "token") askToken("search");
      return;
    }
    try {
      info = await (await api("info")).json();
    } catch (error) {
      if (error instanceof Unauthorized) return refused();
      setStatus(`could not read the gallery's details: ${error.message}`, true);
      return;
    }
    renderInfo();
    if (info.mode === "migrating") pollTimer = setTimeout(loadInfo, 5000);
  }

  // ---- results --------------------------------------------------------------------------------
  const origin = (hit) => (info && info.mode === "migrating" ? hit.gallery : null);

  async function showThumbnail(box, url, mine) {
    try {
      const blob = await (await api(`${url.replace(/^\//, "")}&size=256`)).blob();
      if (mine !== generation) return;
      const src = URL.createObjectURL(blob);
      blobUrls.push(src);
      const img = el("img", "thumb-img");
      img.alt = "";
      img.src = src;
      box.replaceChildren(img);
    } catch (error) {
      box.replaceChildren(el("span", "none", "thumbnail unavailable"));
    }
  }

  function card(hit, rank, mine, showOrigin) {
    const node = el("article", "card");
    const box = el("div", "thumb");
    if (hit.thumbnail) showThumbnail(box, hit.thumbnail, mine);
    else box.append(el("span", "none", "no image"));
    const meta = el("div", "meta");
    const caption = hit.payload.caption || hit.payload.title || hit.id;
    meta.append(el("span", "caption", caption));
    const line = el("div", "line");
    line.append(el("span", "score", `#${rank} · ${hit.score.toFixed(3)}`));
    const from = showOrigin ? origin(hit) : null;
    if (from) line.append(el("span", `badge ${from}`, from === "new" ? "new gallery" : "old gallery"));
    meta.append(line);
    node.title = hit.id;
    node.append(box, meta);
    return node;
  }

  function column(title, model, hits, mine, showOrigin) {
    const node = el("section", "column");
    const heading = el("h2", "", `${title} `);
    if (model) heading.append(el("code", "", model));
    const grid = el("div", "grid");
    hits.forEach((hit, i) => grid.append(card(hit, i + 1, mine, showOrigin)));
    if (!hits.length) grid.append(el("p", "status", "no results"));
    node.append(heading);
    if (showOrigin && hits.some((h) => origin(h) === "new") && hits.some((h) => origin(h) === "old")) {
      node.append(el("p", "hint", "Merged by rank during the backfill: scores of the old and the new gallery "
                                  + "live in different spaces and are not compared."));
    }
    node.append(grid);
    return node;
  }

  async function search(describe, request) {
    if (READ === "token" && !token) return askToken("search");
    lastSearch = [describe, request];
    const mine = ++generation;
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
    blobUrls = [];
    const k = Math.max(1, Math.min(Number($("k").value) || 10, Number($("k").max) || 100));
    const compare = !$("compare-label").hidden && $("compare").checked;
    const vias = compare ? ["served", "old"] : ["served"];
    document.body.dataset.state = "searching";
    setStatus(`searching ${describe} ...`);
    const started = performance.now();
    try {
      const answers = await Promise.all(vias.map((via) => api(...request(k, via)).then((r) => r.json())));
      if (mine !== generation) return;
      const ms = Math.round(performance.now() - started);
      const served = compare ? "upgraded model" : "results";
      $("columns").replaceChildren(...answers.map((a, i) => vias[i] === "old"
        ? column("old model", info && info.old_model, a.results, mine, false)
        : column(served, info && info.model, a.results, mine, true)));
      setStatus(`${answers[0].results.length} results for ${describe} in ${ms} ms`);
      document.body.dataset.state = "done";
    } catch (error) {
      document.body.dataset.state = "error";
      if (error instanceof Unauthorized) return refused();
      setStatus(`search failed: ${error.message}`, true);
    }
  }

  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (!text) {
      if (queryImage) return searchImage(queryImage);
      return setStatus("type a query, or drop an image", true);
    }
    clearImage();
    search(`“${text}”`, (k, model) => ["search/text", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k, model }),
    }]);
  });

  function clearImage() {
    queryImage = null;
    const preview = $("query-image");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
    preview.hidden = true;
    $("drop-text").textContent = "Drop an image here, or click to choose one, to search by image";
  }

  function searchImage(file) {
    queryImage = file;
    $("query").value = "";
    const preview = $("query-image");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    $("drop-text").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB): searching by this image`;
    search(`the image ${file.name}`, (k, model) => {
      const form = new FormData();
      form.append("file", file);
      form.append("k", String(k));
      form.append("model", model);
      return ["search/image", { method: "POST", body: form }];
    });
  }

  $("compare").addEventListener("change", () => { if (lastSearch) search(...lastSearch); });

  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => { if ($("file").files[0]) searchImage($("file").files[0]); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) searchImage(file);
  });

  document.body.dataset.state = "ready";
  loadInfo();
})();

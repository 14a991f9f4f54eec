// The page of `clip-lens app`: fills its controls from /api/info, keeps one query image, and posts
// each tab's form to /api/<tab> (the Features tab: /api/sae_*). No external resources; every error is
// shown as the server's message.
"use strict";

const THUMBS_PER_PAGE = 24;
const state = { info: null, image: null, name: null, thumbStart: 0 };  // image: a data URL or {store_row: N}; name: what it is
const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

async function request(url, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`the server cannot be reached (${error.message})`);
  }
  let data = null;
  try { data = await response.json(); } catch (error) { /* not JSON: reported below */ }
  if (!response.ok) {
    throw new Error(`${response.status}: ${data && data.error ? data.error : response.statusText}`);
  }
  return data;
}

// --- query image ------------------------------------------------------------------------
function chooseImage(image, src, caption) {
  state.image = image;
  state.name = caption;  // the figures title the query with it (an upload's file name, "store image #3")
  $("#preview").src = src;
  $("#preview").alt = caption;
  $("#preview").hidden = false;
  $("#preview-caption").textContent = caption;
  for (const thumb of document.querySelectorAll("#thumbnails img")) {
    thumb.classList.toggle("chosen", image.store_row !== undefined && Number(thumb.dataset.row) === image.store_row);
  }
}

async function chooseStoreRow(row) {
  const page = await request(`/api/thumbnails?start=${row}&count=1`);
  if (!page.rows.length) throw new Error(`store image #${row} does not exist (the store has ${state.info.store.n_images})`);
  chooseImage({ store_row: row }, page.images[0], `store image #${row}`);
}

async function showThumbnails(start) {
  const page = await request(`/api/thumbnails?start=${start}&count=${THUMBS_PER_PAGE}`);
  state.thumbStart = start;
  const grid = $("#thumbnails");
  grid.replaceChildren();
  page.rows.forEach((row, i) => {
    const thumb = element("img", { src: page.images[i], alt: `store image #${row}`, title: `store image #${row}`, "data-row": row });
    thumb.addEventListener("click", () => chooseImage({ store_row: row }, page.images[i], `store image #${row}`));
    if (state.image && state.image.store_row === row) thumb.classList.add("chosen");
    grid.append(thumb);
  });
  const last = page.rows.length ? page.rows[page.rows.length - 1] : start;
  $("#store-range").textContent = `#${start}–${last} of ${state.info.store.n_images}`;
}

function readUpload(file) {
  const limit = state.info.limits.max_upload_bytes;
  if (file.size * 4 / 3 > limit) {  // sent as base64
    showError(currentTab(), `${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; this server accepts ` +
      `${(limit / 2 ** 20).toFixed(1)} MiB per request (base64 adds a third).`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => chooseImage(reader.result, reader.result, file.name);
  reader.onerror = () => showError(currentTab(), `cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

// --- tabs -------------------------------------------------------------------------------
const TABS = {
  property_neighbors: { image: true, body: (f) => ({ property: f.property.value, k: number(f.k), metric: f.metric.value,
    texts: f.texts.value.split("\n").map((t) => t.trim()).filter((t) => t) }) },
  topic_segmentation: { image: true, body: (f) => ({ head: f.head.value, text: f.text.value }) },
  contrastive_segmentation: { image: true, body: (f) => ({ text_a: f.text_a.value, text_b: f.text_b.value, head: f.head.value }) },
  image_neighbors: { image: true, body: (f) => ({ head: f.head.value, k: number(f.k) }) },
  text_neighbors: { image: false, body: (f) => ({ head: f.head.value, text: f.text.value, k: number(f.k) }) },
};

function number(input) {  // an empty or odd field goes to the server as is, which explains what it needs
  return input.value === "" ? null : Number(input.value);
}

function currentTab() {
  return $("#tabs button.active").dataset.tab;
}

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
    button.setAttribute("aria-selected", button.dataset.tab === name);
  }
  for (const tab of document.querySelectorAll("section#analyses > .tab")) tab.hidden = tab.id !== `tab-${name}`;
  if (name === "features" && state.info && state.info.saes.length && !featureState.listed) listFeatures();
}

function showError(tab, message) {
  $(`#result-${tab}`).replaceChildren(element("div", { class: "error", role: "alert" }, `Error ${message}`));
}

async function submit(tab, form) {
  const result = $(`#result-${tab}`);
  const body = TABS[tab].body(form.elements);
  if (TABS[tab].image) {
    if (!state.image) {
      showError(tab, "choose a query image first: upload one or pick a store image on the left.");
      return;
    }
    body.images = [state.image];
    body.names = [state.name];
  }
  const button = $("button[type=submit]", form);
  button.disabled = true;
  result.replaceChildren(element("p", { class: "status" }, "Running…"));
  try {
    render(result, await request(`/api/${tab}`, body));
  } catch (error) {
    showError(tab, error.message);
  } finally {
    button.disabled = false;
  }
}

function render(result, data) {
  const figure = element("img", { class: "figure", src: data.figure, alt: "result figure" });
  const parts = [figure];
  if (data.neighbours) parts.push(neighbourTable(data));
  else parts.push(element("p", { class: "status" }, `Heads: ${data.heads.length === 1 ? data.heads[0] : `${data.heads.length} heads summed`}.`));
  result.replaceChildren(...parts);
}

function neighbourTable(data) {
  const table = element("table", { class: "neighbours" });
  const by = data.property ? `property ${data.property}` : data.heads.join(" + ");
  table.append(element("caption", {}, `Neighbours by ${by} (${data.metric}), best first`));
  const head = element("tr");
  for (const title of ["rank", "store row", "id", "score", ""]) head.append(element("th", {}, title));
  const thead = element("thead");
  thead.append(head);
  table.append(thead);
  const body = element("tbody");
  data.neighbours[0].forEach((neighbour, rank) => {
    const row = element("tr");
    row.append(element("td", { class: "num" }, String(rank + 1)), element("td", { class: "num" }, `#${neighbour.row}`),
      element("td", {}, neighbour.id), element("td", { class: "num" }, neighbour.score.toFixed(4)));
    const use = element("a", { class: "use", title: "use this image as the query" }, "use as query");
    use.addEventListener("click", () => chooseStoreRow(neighbour.row).catch((error) => showError(currentTab(), error.message)));
    const cell = element("td");
    if (state.info.store.has_images) cell.append(use);
    row.append(cell);
    body.append(row);
  });
  table.append(body);
  return table;
}

// --- the Features tab (SAEs) -------------------------------------------------------------
const featureState = { listed: false, selected: null };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Run a request; while it is pending, show the store-wide computation's progress (GET /api/sae_status) in `note`.
async function withProgress(pending, sae, note) {
  let finished = false;
  (async () => {
    while (!finished) {
      await sleep(400);
      if (finished) break;
      try {
        const status = (await request("/api/sae_status")).saes[sae];
        if (!finished && status && status.state === "computing") {
          note.textContent = `Computing the SAE's activations over the store: ${status.done} of ${status.total} images…`;
        }
      } catch (error) { /* the request itself reports what went wrong */ }
    }
  })();
  try {
    return await pending;
  } finally {
    finished = true;
  }
}

function percent(x) {
  return `${(100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 1)}%`;
}

function pickableRow(cells, feature) {
  const row = element("tr", { class: "pick", tabindex: "0", "data-feature": feature, title: `show feature ${feature}` });
  row.append(...cells);
  row.addEventListener("click", () => showFeature(feature));
  row.addEventListener("keydown", (event) => { if (event.key === "Enter") showFeature(feature); });
  if (featureState.selected === feature) row.classList.add("chosen");
  return row;
}

function tableWith(titles, caption) {
  const table = element("table", { class: "neighbours" });
  if (caption) table.append(element("caption", {}, caption));
  const head = element("tr");
  for (const title of titles) head.append(element("th", {}, title));
  const thead = element("thead");
  thead.append(head);
  table.append(thead, element("tbody"));
  return table;
}

function nameCell(name, score) {
  return element("td", {}, name === null ? "—" : `${name} (${score.toFixed(2)})`);
}

async function listFeatures() {
  const form = $("#form-features");
  const sae = form.elements.sae.value;
  const body = { sae, order: form.elements.order.value };
  const text = form.elements.text.value.trim();
  if (text) body.text = text;
  const note = $("#features-note");
  const button = $("button[type=submit]", form);
  note.className = "status";
  note.textContent = "Loading the features… (the first time, the SAE runs over the whole store)";
  button.disabled = true;
  featureState.listed = true;
  try {
    const data = await withProgress(request("/api/sae_features", body), sae, note);
    const by = data.text === null ? "" : ` Ranked by the cosine of their decoder direction with “${data.text}”.`;
    note.textContent = `${data.d_sae} features at ${data.hook_name}, over ${data.n_images} store images.${by} ` +
      "“Fires on”: the share of store images on which the feature fires at any position the SAE reads; for an SAE " +
      "on patches (the demo's), a feature active on a few patches of every image reads 100% (order “fewest images first” lists " +
      "the selective ones first; a feature's patch maps show where it fires). " + (data.names.note || "");
    const titles = ["feature", "fires on", "max", "name (cos)"].concat(data.text === null ? [] : ["cos with text"]);
    const table = tableWith(titles, data.features.length < data.d_sae ? `the first ${data.features.length}` : "");
    const rows = $("tbody", table);
    for (const feature of data.features) {
      const cells = [element("td", { class: "num" }, `#${feature.feature}`),
        element("td", { class: "num" }, percent(feature.frequency)),
        element("td", { class: "num" }, feature.max.toFixed(2)), nameCell(feature.name, feature.name_score)];
      if (data.text !== null) cells.push(element("td", { class: "num" }, feature.score.toFixed(3)));
      rows.append(pickableRow(cells, feature.feature));
    }
    $("#feature-list").replaceChildren(table);
  } catch (error) {
    note.className = "error";
    note.textContent = `Error ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

async function showFeature(feature) {
  const sae = $("#form-features").elements.sae.value;
  const result = $("#result-features");
  featureState.selected = feature;
  for (const row of document.querySelectorAll("#feature-list tr.pick")) {
    row.classList.toggle("chosen", Number(row.dataset.feature) === feature);
  }
  const status = element("p", { class: "status" }, `Loading feature ${feature}…`);
  result.replaceChildren(status);
  try {
    const data = await withProgress(request("/api/sae_feature", { sae, feature, k: 9 }), sae, status);
    const parts = [element("img", { class: "figure", src: data.figure, alt: `top store images of feature ${feature}` })];
    if (data.maps_note) parts.push(element("p", { class: "status" }, data.maps_note));
    if (data.names.length) {
      const table = tableWith(["name", "cos"], `Names of feature ${feature} (${data.names_info.bank} bank, best first)`);
      for (const name of data.names) {
        const row = element("tr");
        row.append(element("td", {}, name.text), element("td", { class: "num" }, name.score.toFixed(3)));
        $("tbody", table).append(row);
      }
      parts.push(table);
    } else {
      parts.push(element("p", { class: "status" }, data.names_info.note || "no names"));
    }
    result.replaceChildren(...parts);
  } catch (error) {
    showError("features", error.message);
  }
}

async function imageFeatures(form) {
  if (!state.image) {
    showError("features-image", "choose a query image first: upload one or pick a store image on the left.");
    return;
  }
  const sae = $("#form-features").elements.sae.value;
  const result = $("#result-features-image");
  const button = $("button[type=submit]", form);
  button.disabled = true;
  result.replaceChildren(element("p", { class: "status" }, "Running…"));
  try {
    const data = await request("/api/sae_image", { sae, images: [state.image], names: [state.name], k: number(form.elements.k) });
    const table = tableWith(["feature", "activation", "name"], "Most active features on the query image (click one to see it)");
    for (const feature of data.images[0].features) {
      const cells = [element("td", { class: "num" }, `#${feature.feature}`),
        element("td", { class: "num" }, feature.value.toFixed(3)), element("td", {}, feature.name === null ? "—" : feature.name)];
      $("tbody", table).append(pickableRow(cells, feature.feature));
    }
    const parts = [element("img", { class: "figure", src: data.figure, alt: "the query image's most active features" })];
    if (data.maps_note) parts.push(element("p", { class: "status" }, data.maps_note));
    parts.push(data.images[0].features.length ? table : element("p", { class: "status" }, "No feature fires on this image."));
    result.replaceChildren(...parts);
  } catch (error) {
    showError("features-image", error.message);
  } finally {
    button.disabled = false;
  }
}

function setupFeatures(info) {
  const has = info.saes.length > 0;
  $("#features-none").hidden = has;
  $("#features-body").hidden = !has;
  if (!has) return;
  const select = $("#form-features").elements.sae;
  select.replaceChildren(...info.saes.map((sae) => element("option", { value: sae.name },
    `${sae.name} (${sae.hook_name}, ${sae.d_sae} features${sae.other_model ? `, trained on ${sae.model_name}` : ""})`)));
  $("#form-features").addEventListener("submit", (event) => { event.preventDefault(); listFeatures(); });
  for (const name of ["sae", "order"]) {
    $("#form-features").elements[name].addEventListener("change", () => {
      featureState.selected = null;
      $("#result-features").replaceChildren(element("p", { class: "status" }, "Select a feature in the list."));
      listFeatures();
    });
  }
  $("#form-features-image").addEventListener("submit", (event) => { event.preventDefault(); imageFeatures(event.target); });
}

// --- the Neurons tab (second-order effects of MLP neurons) -------------------------------
const codeText = (code) => code.slice(0, 3).map(([text, c]) => `${text} (${c >= 0 ? "+" : ""}${c.toFixed(2)})`).join(", ") || "—";

async function neuronsImage(form) {
  const result = $("#result-neurons-image");
  if (!state.image) { showError("neurons-image", "choose a query image first: upload one or pick a store image on the left."); return; }
  result.replaceChildren(element("p", { class: "status" }, "Running… (the first time, the neurons are analysed on the store)"));
  try {
    const data = await request("/api/neuron_image", { images: [state.image], names: [state.name], k: number(form.elements.k) });
    const table = tableWith(["neuron", "|effect|", "code (coefficient)"],
      `Largest second-order effects on the query image (layers ${data.layers.join(", ")})`);
    for (const neuron of data.images[0].neurons) {
      $("tbody", table).append(element("tr", {}, ""));
      $("tbody", table).lastChild.append(element("td", {}, neuron.neuron), element("td", { class: "num" }, neuron.effect.toFixed(3)),
        element("td", {}, codeText(neuron.code)));
    }
    result.replaceChildren(element("img", { class: "figure", src: data.figure, alt: "the query image's top neurons" }), table);
  } catch (error) {
    showError("neurons-image", error.message);
  }
}

async function neuronsSearch(form) {
  const result = $("#result-neurons-search");
  result.replaceChildren(element("p", { class: "status" }, "Searching…"));
  try {
    const data = await request("/api/neuron_search", { text: form.elements.text.value, k: number(form.elements.k) });
    const table = tableWith(["neuron", "cosine", "code (coefficient)", "top store images"],
      `Neurons whose rank-1 direction points along "${data.text}" (over ${data.n_analysed} store images)`);
    for (const neuron of data.neurons) {
      const strip = element("td", {});
      strip.append(element("img", { src: neuron.strip, alt: `top store images of ${neuron.neuron}` }));
      $("tbody", table).append(element("tr", {}, ""));
      $("tbody", table).lastChild.append(element("td", {}, neuron.neuron), element("td", { class: "num" }, neuron.cosine.toFixed(3)),
        element("td", {}, codeText(neuron.code)), strip);
    }
    result.replaceChildren(table);
  } catch (error) {
    showError("neurons-search", error.message);
  }
}

function setupNeurons() {
  $("#form-neurons-image").addEventListener("submit", (event) => { event.preventDefault(); neuronsImage(event.target); });
  $("#form-neurons-search").addEventListener("submit", (event) => { event.preventDefault(); neuronsSearch(event.target); });
}

// --- start ------------------------------------------------------------------------------
function fillControls(info) {
  const labelled = (head) => head.label ? `${head.key} (${head.label})` : head.key;
  for (const select of document.querySelectorAll("select[data-heads]")) {
    const options = select.dataset.heads === "all" ? [element("option", { value: "all" }, "all heads")] : [];
    for (const head of info.heads) {
      if (select.dataset.heads === "all" || head.in_store) options.push(element("option", { value: head.key }, labelled(head)));
    }
    select.replaceChildren(...options);
  }
  const properties = $("#form-property_neighbors select[name=property]");
  properties.replaceChildren(...info.properties.map((p) => element("option", { value: p }, p)));
  if (!info.properties.length) properties.append(element("option", { value: "" }, "(no head labels)"));
  const metrics = $("#form-property_neighbors select[name=metric]");
  metrics.replaceChildren(...info.metrics.map((m) => element("option", { value: m }, m)));
  if (info.metrics.includes("concepts")) metrics.value = "concepts";  // the search that ignores the other properties
  $("#store-row").max = info.store.n_images - 1;
  const pretrained = info.pretrained ? `, weights ${info.pretrained}` : "";
  $("#model-line").textContent = `${info.model}${pretrained} · ${info.n_layers} layers × ${info.n_heads} heads · ` +
    `store: ${info.store.n_images} images (${info.store.source || info.store.path})`;
}

async function start() {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  for (const tab of Object.keys(TABS)) {
    $(`#form-${tab}`).addEventListener("submit", (event) => { event.preventDefault(); submit(tab, event.target); });
  }
  try {
    state.info = await request("/api/info");
  } catch (error) {
    $("#model-line").textContent = `Error ${error.message}`;
    $("#model-line").className = "error";
    return;
  }
  fillControls(state.info);
  setupFeatures(state.info);
  setupNeurons();
  $("#upload").addEventListener("change", (event) => { if (event.target.files[0]) readUpload(event.target.files[0]); });
  $("#store-row-form").addEventListener("submit", (event) => {
    event.preventDefault();
    chooseStoreRow(Number($("#store-row").value)).catch((error) => showError(currentTab(), error.message));
  });
  $("#thumbs-prev").addEventListener("click", () => showThumbnails(Math.max(0, state.thumbStart - THUMBS_PER_PAGE)));
  $("#thumbs-next").addEventListener("click", () => {
    if (state.thumbStart + THUMBS_PER_PAGE < state.info.store.n_images) showThumbnails(state.thumbStart + THUMBS_PER_PAGE);
  });
  if (state.info.store.has_images) {
    await showThumbnails(0);
  } else {
    $("#thumbnails").replaceChildren(element("p", { class: "status" }, "This store does not record its images: upload one."));
    $("#store-row-form").hidden = true;
  }
}

document.addEventListener("DOMContentLoaded", start);

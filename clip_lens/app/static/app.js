// The page of `clip-lens app`: fills its controls from /api/info, keeps one query image, and posts
// each tab's form to /api/<tab>. No external resources; every error is shown as the server's message.
"use strict";

const THUMBS_PER_PAGE = 24;
const state = { info: null, image: null, thumbStart: 0 };  // image: a data URL or {store_row: N}
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
  $("#preview").src = src;
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
  for (const tab of Object.keys(TABS)) $(`#tab-${tab}`).hidden = tab !== name;
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

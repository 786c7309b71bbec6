// VRP viewer: renders the index and the sample pages from the data files written by `vrp view`.
// Every string from the lake goes into the page through textContent or an attribute set with
// setAttribute on a fixed name: never innerHTML, never a URL built from lake text (a shared lake
// can come from anyone). Data arrives as `VRP.index({...})` / `VRP.sample({...})` script files,
// because a page opened from file:// may load scripts but not fetch files.
(function () {
  "use strict";

  const body = document.body;
  const root = body.getAttribute("data-root") || "";
  const app = document.getElementById("app");
  const VRP = (window.VRP = {});

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [name, value] of Object.entries(props)) {
        if (value === null || value === undefined || value === false) continue;
        if (name === "class") node.className = value;
        else if (name === "text") node.textContent = String(value);
        else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
        else node.setAttribute(name, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "-";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits === undefined ? 3 : digits);
    return String(value);
  }

  function verdict(correct) {
    if (correct === true) return el("span", { class: "ok", text: "right" });
    if (correct === false) return el("span", { class: "bad", text: "wrong" });
    return el("span", { class: "unk", text: "unscored" });
  }

  function load(src) {
    const script = document.createElement("script");
    script.src = src;
    script.onerror = () => {
      app.replaceChildren(el("p", { class: "bad", text: "could not load " + src + ": was the view copied whole?" }));
    };
    document.head.append(script);
  }

  // ---------------------------------------------------------------- index
  const PAGE = 200;

  VRP.index = function (data) {
    const rows = data.rows;
    const conditions = data.conditions || [];
    const state = { sort: null, desc: false, shown: PAGE, preset: "" };
    const columns = [
      ["model", "model"],
      ["dataset", "dataset"],
      ["split", "split"],
      ["question", "question"],
      ["answer", "answer"],
      ["label", "label"],
      ["correct", "correct"],
      ["p", "p(answer)"],
      ["sc", "SC agreement"],
    ];
    if (conditions.length) columns.push(["dependence", "visual dependence"]);

    const search = el("input", { type: "search", id: "filter", placeholder: "filter question, answer, model..." });
    const models = el("select", { id: "model" }, el("option", { value: "", text: "all models" }));
    for (const m of [...new Set(rows.map((r) => r.model))].sort()) models.append(el("option", { value: m, text: m }));
    const correctness = el(
      "select",
      { id: "correctness" },
      el("option", { value: "", text: "right and wrong" }),
      el("option", { value: "right", text: "right only" }),
      el("option", { value: "wrong", text: "wrong only" }),
    );
    const presets = el("div", { class: "presets" });
    const presetList = [
      ["", "all"],
      ["confident-wrong", "most confident wrong"],
      ["unsure-right", "least confident right"],
    ];
    if (conditions.length) presetList.push(["changes", "answer changes without the image"]);
    for (const [id, label] of presetList) {
      presets.append(
        el("button", {
          type: "button",
          "data-preset": id,
          text: label,
          onclick: () => {
            state.preset = id;
            state.shown = PAGE;
            if (id === "confident-wrong") (state.sort = "p"), (state.desc = true);
            if (id === "unsure-right") (state.sort = "p"), (state.desc = false);
            render();
          },
        }),
      );
    }
    const count = el("p", { id: "count" });
    const thead = el("thead");
    const tbody = el("tbody");
    const more = el("button", { type: "button", id: "more", text: "show more", onclick: () => ((state.shown += PAGE), render()) });
    const headRow = el("tr");
    for (const [key, label] of columns) {
      headRow.append(
        el("th", {
          "data-col": key,
          text: label,
          onclick: () => {
            state.desc = state.sort === key ? !state.desc : false;
            state.sort = key;
            render();
          },
        }),
      );
    }
    thead.append(headRow);

    const notes = [];
    if (data.missing_images) {
      notes.push(
        el("p", {
          class: "note",
          id: "missing-images",
          text:
            data.missing_images +
            " of " +
            rows.length +
            " samples have no picture in the lake (ingested before the images table existed); their pages show the maps without the image.",
        }),
      );
    }

    function depValue(row) {
      if (!row.dependence) return null;
      const values = Object.values(row.dependence);
      return values.length ? values[0] : null;
    }

    function value(row, key) {
      if (key === "dependence") return depValue(row);
      return row[key];
    }

    function matches(row) {
      const text = search.value.trim().toLowerCase();
      if (text) {
        const hay = [row.model, row.question, row.answer, row.label, row.dataset, row.split].join(" ").toLowerCase();
        if (!hay.includes(text)) return false;
      }
      if (models.value && row.model !== models.value) return false;
      if (correctness.value === "right" && row.correct !== true) return false;
      if (correctness.value === "wrong" && row.correct !== false) return false;
      if (state.preset === "confident-wrong" && row.correct !== false) return false;
      if (state.preset === "unsure-right" && row.correct !== true) return false;
      if (state.preset === "changes" && !row.changes) return false;
      return true;
    }

    function render() {
      let shown = rows.filter(matches);
      if (state.sort) {
        const key = state.sort;
        const sign = state.desc ? -1 : 1;
        shown = shown.slice().sort((a, b) => {
          const x = value(a, key);
          const y = value(b, key);
          if (x === y) return 0;
          if (x === null || x === undefined) return 1;
          if (y === null || y === undefined) return -1;
          return (x < y ? -1 : 1) * sign;
        });
      }
      for (const th of headRow.children) {
        th.className = th.getAttribute("data-col") === state.sort ? (state.desc ? "sorted desc" : "sorted asc") : "";
      }
      for (const button of presets.children) {
        button.className = button.getAttribute("data-preset") === state.preset ? "active" : "";
      }
      const page = shown.slice(0, state.shown);
      tbody.replaceChildren(
        ...page.map((row) => {
          const link = el("a", { href: "s/" + row.key + ".html", text: row.question === null ? "(no question)" : row.question });
          const tr = el("tr", { "data-key": row.key });
          for (const [key] of columns) {
            let cell;
            if (key === "question") cell = el("td", null, link);
            else if (key === "correct") cell = el("td", null, verdict(row.correct));
            else if (key === "dependence") cell = el("td", { text: fmt(depValue(row)) });
            else cell = el("td", { text: fmt(row[key]) });
            tr.append(cell);
          }
          return tr;
        }),
      );
      count.textContent = "showing " + page.length + " of " + shown.length + " matching samples (" + rows.length + " in this view)";
      more.hidden = page.length >= shown.length;
    }

    for (const control of [search, models, correctness]) control.addEventListener("input", () => ((state.shown = PAGE), render()));
    app.replaceChildren(
      el("h1", { text: "VRP view" }),
      el("p", { class: "sub", text: "lake: " + data.lake }),
      ...notes,
      el("div", { class: "controls" }, search, models, correctness),
      presets,
      count,
      el("table", { id: "samples" }, thead, tbody),
      more,
    );
    render();
  };

  // ---------------------------------------------------------------- sample page
  function decode(block) {
    const raw = atob(block.q);
    const out = new Float32Array(raw.length);
    const span = block.hi - block.lo;
    for (let i = 0; i < raw.length; i++) out[i] = block.lo + (raw.charCodeAt(i) / 255) * span;
    return out;
  }

  // attention: dark -> red -> yellow with rising opacity; evidence: blue (against) / red (for)
  function heatColour(t) {
    const r = Math.min(255, Math.round(510 * t));
    const g = Math.max(0, Math.min(255, Math.round(510 * t - 255)));
    return [r, g, 40, Math.round(60 + 170 * t)];
  }

  function divergingColour(t) {
    // t in [-1, 1]
    const a = Math.abs(t);
    return t >= 0 ? [220, Math.round(220 - 180 * a), Math.round(220 - 180 * a), Math.round(40 + 190 * a)] : [Math.round(220 - 180 * a), Math.round(220 - 180 * a), 220, Math.round(40 + 190 * a)];
  }

  function paint(canvas, values, grid, kind) {
    const [h, w] = grid;
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    let lo = Infinity;
    let hi = -Infinity;
    let absMax = 0;
    for (const v of values) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
      absMax = Math.max(absMax, Math.abs(v));
    }
    for (let i = 0; i < values.length; i++) {
      const colour = kind === "evidence" ? divergingColour(absMax > 0 ? values[i] / absMax : 0) : heatColour(hi > lo ? (values[i] - lo) / (hi - lo) : 0);
      img.data.set(colour, i * 4);
    }
    ctx.putImageData(img, 0, 0);
  }

  function outline(canvas, cells, grid) {
    const [h, w] = grid;
    canvas.width = w * 8;
    canvas.height = h * 8;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#00e5ff";
    ctx.lineWidth = 2;
    for (const cell of cells || []) {
      const r = Math.floor(cell / w);
      const c = cell % w;
      ctx.strokeRect(c * 8 + 1, r * 8 + 1, 6, 6);
    }
  }

  function lineChart(series, xs, title) {
    const width = 520;
    const height = 220;
    const pad = 36;
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, class: "chart", role: "img" });
    const all = series.flatMap((s) => s.values.filter((v) => v !== null));
    if (!all.length || !xs.length) return el("p", { class: "note", text: "no logit-lens rows for this sample" });
    let lo = Math.min(0, ...all);
    let hi = Math.max(0, ...all);
    if (hi === lo) hi = lo + 1;
    const xMax = Math.max(...xs);
    const xMin = Math.min(...xs);
    const x = (v) => pad + ((v - xMin) / Math.max(1, xMax - xMin)) * (width - 2 * pad);
    const y = (v) => height - pad - ((v - lo) / (hi - lo)) * (height - 2 * pad);
    chart.append(svg("line", { x1: pad, x2: width - pad, y1: y(0), y2: y(0), class: "zero" }));
    const colours = ["#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d68910"];
    series.forEach((s, i) => {
      const points = s.values
        .map((v, j) => (v === null ? null : x(s.xs ? s.xs[j] : xs[j]).toFixed(1) + "," + y(v).toFixed(1)))
        .filter((p) => p !== null)
        .join(" ");
      chart.append(svg("polyline", { points, fill: "none", stroke: colours[i % colours.length], "stroke-width": 2 }));
      const label = svg("text", { x: width - pad - 150, y: pad + 14 * i, fill: colours[i % colours.length] });
      label.textContent = s.name;
      chart.append(label);
    });
    const axis = svg("text", { x: pad, y: height - 8 });
    axis.textContent = "layer " + xMin + " .. " + xMax + "   (truth margin " + lo.toFixed(2) + " .. " + hi.toFixed(2) + ")";
    chart.append(axis);
    return el("figure", null, chart, el("figcaption", { text: title }));
  }

  function table(header, rows) {
    return el(
      "table",
      null,
      el("thead", null, el("tr", null, ...header.map((h) => el("th", { text: h })))),
      el("tbody", null, ...rows.map((r) => el("tr", null, ...r.map((c) => (c instanceof Node ? el("td", null, c) : el("td", { text: fmt(c) })))))),
    );
  }

  VRP.sample = function (data) {
    const m = data.meta;
    document.title = "VRP: " + (m.question || "sample");
    const grid = data.grid;
    const parts = [el("p", null, el("a", { href: root + "index.html", text: "back to the index" }))];
    parts.push(el("h1", { id: "question", text: m.question === null ? "(no question)" : m.question }));
    parts.push(
      el(
        "p",
        { class: "sub" },
        el("span", { id: "model", text: m.model }),
        " | ",
        el("span", { text: [m.dataset, m.split, m.category].filter((v) => v).join(" / ") }),
        " | image ",
        el("span", { id: "image-id", text: m.image_id }),
      ),
    );
    parts.push(
      el(
        "p",
        { class: "answer" },
        "answer: ",
        el("b", { id: "answer", text: m.answer === null ? m.answer_text : m.answer }),
        "  label: ",
        el("b", { text: m.label }),
        "  ",
        verdict(m.correct),
        "  raw: ",
        el("code", { id: "answer-text", text: m.answer_text }),
      ),
    );

    // ---- maps
    const hasAttention = !!data.attention;
    const hasEvidence = !!data.evidence;
    const stored = (data.attention || data.evidence || { layers: [] }).layers;
    const slider = el("input", { type: "range", id: "layer", min: 0, max: Math.max(0, stored.length - 1), value: Math.max(0, stored.length - 1), step: 1 });
    const meanBox = el("input", { type: "checkbox", id: "layer-mean" });
    const opacity = el("input", { type: "range", id: "opacity", min: 0, max: 100, value: 70 });
    const layerLabel = el("span", { id: "layer-label" });
    const heat = el("canvas", { id: "heatmap", class: "overlay" });
    const evid = el("canvas", { id: "evidence", class: "overlay" });
    const marks = el("canvas", { id: "marks", class: "overlay marks" });
    const missing = !data.image;
    function frame(canvas, extra) {
      const picture = missing
        ? el("div", { class: "noimage", text: "image not in the lake (ingested before the images table existed)" })
        : el("img", { src: data.image, alt: "the image as the model saw it", class: "picture" });
      return el("div", { class: "frame" }, picture, canvas, extra);
    }
    const attnFrame = hasAttention ? frame(heat, marks) : el("p", { class: "note", text: "no attention maps stored for this sample" });
    const evidFrame = hasEvidence ? frame(evid, null) : el("p", { class: "note", text: "no evidence maps stored (ingested with --no-evidence or before evidence maps existed)" });
    const headBox = el("div", { id: "heads" });

    function draw() {
      const index = Number(slider.value);
      const mean = meanBox.checked;
      const layer = stored[index];
      layerLabel.textContent = mean ? "mean over " + stored.length + " layers" : "layer " + layer;
      if (hasAttention) paint(heat, decode(mean ? data.attention.mean : data.attention.maps[index]), grid, "attention");
      if (hasEvidence) paint(evid, decode(mean ? data.evidence.mean : data.evidence.maps[index]), grid, "evidence");
      for (const c of [heat, evid]) c.style.opacity = String(Number(opacity.value) / 100);
      const heads = (data.heads || {})[String(layer)];
      headBox.replaceChildren(
        mean || !heads
          ? el("p", { class: "note", text: mean ? "per-head rows are per layer: pick a layer" : "no per-head rows stored for this layer" })
          : table(["head", "image mass", "spatial entropy"], heads),
      );
    }
    for (const control of [slider, meanBox, opacity]) control.addEventListener("input", draw);
    parts.push(el("h2", { text: "Where the model looks, and where the answer is" }));
    parts.push(el("div", { class: "controls" }, el("label", null, "layer ", slider), layerLabel, el("label", null, meanBox, " layer mean"), el("label", null, "opacity ", opacity)));
    parts.push(
      el(
        "div",
        { class: "maps" },
        el("figure", null, attnFrame, el("figcaption", { text: "attention of the answer position over the patch grid (head mean, renormalised)" })),
        el("figure", null, evidFrame, el("figcaption", { text: "evidence: logit lens at each image position, truth logit minus the mean logit (red for, blue against)" })),
      ),
    );
    parts.push(el("h3", { text: "Heads at this layer" }), headBox);

    // ---- logit lens
    const lensSeries = [{ name: "image", values: data.lens.truth_margin }];
    for (const c of data.conditions || []) lensSeries.push({ name: c.name, values: c.lens_truth_margin, xs: c.lens_layers });
    parts.push(el("h2", { text: "Logit-lens truth margin by layer" }));
    parts.push(lineChart(lensSeries, data.lens.layers, "truth logit minus the best other logit, per layer" + (data.conditions.length ? "; one curve per condition" : "")));

    // ---- first-token statistics
    const stats = [
      ["p(answer)", m.p_answer],
      ["p(yes)", m.p_yes],
      ["p(no)", m.p_no],
      ["yes/no margin", m.yes_no_margin],
      ["top-1 probability", m.top1_prob],
      ["top-1 minus top-2 logit", m.top2_margin],
      ["entropy (nats)", m.token_entropy],
      ["answer log-prob", m.answer_logprob],
      ["spatial entropy (layer mean)", m.spatial_entropy],
      ["cluster count", m.cluster_count],
    ];
    parts.push(el("h2", { text: "First-token statistics" }), table(["statistic", "value"], stats));

    // ---- conditions
    if ((data.conditions || []).length) {
      parts.push(el("h2", { text: "Conditions" }));
      parts.push(
        table(
          ["condition", "answer", "correct", "p(answer)", "visual dependence (final truth margin, image minus condition)"],
          data.conditions.map((c) => [c.name, c.answer === null ? c.answer_text : c.answer, verdict(c.correct), c.p_answer, (data.visual_dependence || {})[c.name]]),
        ),
      );
    }

    // ---- K samples
    parts.push(el("h2", { text: "Sampled answers (" + data.generations.length + ")" }));
    parts.push(
      data.generations.length
        ? table(["k", "text", "answer", "correct"], data.generations.map((g) => [g.k, g.text, g.answer, verdict(g.correct)]))
        : el("p", { class: "note", text: "no sampled answers stored (self-consistency was off)" }),
    );
    if (m.sc_agreement !== null) parts.push(el("p", { text: "majority " + fmt(m.sc_answer) + ", agreement " + fmt(m.sc_agreement) }));

    // ---- interventions
    parts.push(el("h2", { text: "Interventions" }));
    if ((data.interventions || []).length) {
      const rows = data.interventions.map((r) => {
        const show = r.cells
          ? el("button", {
              type: "button",
              class: "show-cells",
              text: "draw " + r.cells.length + " patches",
              onclick: () => outline(marks, r.cells, grid),
            })
          : "-";
        return [r.kind, r.condition, r.level, r.setting, r.answer, verdict(r.correct), r.yes_no_margin, show];
      });
      parts.push(table(["kind", "condition", "level", "setting", "answer", "correct", "yes/no margin", "patches"], rows));
    } else {
      parts.push(el("p", { class: "note", text: "no interventions on this sample" }));
    }
    parts.push(el("p", { class: "sub", text: "run " + m.run_id + ", sample " + m.sample_id }));
    app.replaceChildren(...parts);
    if (stored.length) draw();
  };

  const page = body.getAttribute("data-page");
  if (page === "index") load(root + "data/index.js");
  else if (page === "sample") load(root + "data/s/" + body.getAttribute("data-key") + ".js");
})();

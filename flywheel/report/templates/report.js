(function () {
  "use strict";
  // Every value from the data goes into the page through textContent or a DOM attribute, never
  // through innerHTML: outputs and item fields are untrusted text.
  var D = JSON.parse(document.getElementById("fw-data").textContent);
  var S = D.S, IT = D.iterations, G = D.graders, N = IT.length;
  var state = { a: D.initial.a, b: D.initial.b, g: -1, f: "all", q: "", p: 0 };
  var cache = { key: null, rows: null, stats: null };
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function str(i) { return i < 0 || i === null || i === undefined ? null : S[i]; }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function fmtScore(x) { return !isNum(x) ? "–" : D.metric === "mean_score" ? x.toFixed(3) : (100 * x).toFixed(1) + "%"; }
  function fmtDelta(x) {
    if (!isNum(x)) return "–";
    var s = x > 0 ? "+" : x < 0 ? "−" : "±";
    return D.metric === "mean_score" ? s + Math.abs(x).toFixed(3) : s + (100 * Math.abs(x)).toFixed(1) + " pts";
  }
  function fmtP(p) { return p < 0.001 ? "p < 0.001" : "p = " + p.toFixed(3); }

  // -- hash state: #a=0&b=2&g=1&f=regression&q=text&p=3 ------------------------------------------
  function readHash() {
    var h = location.hash.replace(/^#/, "");
    h.split("&").forEach(function (kv) {
      var i = kv.indexOf("="); if (i < 0) return;
      var k = kv.slice(0, i), v = decodeURIComponent(kv.slice(i + 1));
      if (k === "a" || k === "b" || k === "g" || k === "p") { var n = parseInt(v, 10); if (!isNaN(n)) state[k] = n; }
      if (k === "f" && FILTERS.some(function (f) { return f[0] === v; })) state.f = v;
      if (k === "q") state.q = v;
    });
    state.a = Math.min(Math.max(state.a, 0), N - 1); state.b = Math.min(Math.max(state.b, 0), N - 1);
    if (state.g < -1 || state.g >= G.length) state.g = -1;
  }
  function writeHash() {
    var h = "a=" + state.a + "&b=" + state.b + "&g=" + state.g + "&f=" + state.f + "&p=" + state.p;
    if (state.q) h += "&q=" + encodeURIComponent(state.q);
    if (history.replaceState) history.replaceState(null, "", "#" + h);
  }

  // -- matching and classification (mirrors flywheel.report.compare) ------------------------------
  var indexCache = {};
  function index(it) {
    if (!indexCache[it]) {
      var m = new Map(), s = D.samples[it];
      for (var j = 0; j < s.k.length; j++) m.set(s.k[j] + "|" + s.r[j], j);
      indexCache[it] = m;
    }
    return indexCache[it];
  }
  function value(it, j) {
    var s = D.samples[it];
    if (state.g < 0) return [s.s[j], s.p[j] === 1];
    var passed = s.gp[state.g][j];
    if (s.e[j] >= 0 || passed === null) return [0, false];
    return [D.metric === "mean_score" ? (s.gs[state.g][j] || 0) : passed, passed === 1];
  }
  function classify(va, vb, ja, jb) {
    var d = vb[0] - va[0];
    if ((va[1] && !vb[1]) || d < -1e-9) return ["regression", d];
    if ((vb[1] && !va[1]) || d > 1e-9) return ["improvement", d];
    var A = D.samples[state.a], B = D.samples[state.b];
    if (A.o[ja] !== B.o[jb] || A.e[ja] !== B.e[jb]) return ["changed", d];
    return ["same", d];
  }
  var ORDER = { regression: 0, improvement: 1, changed: 2, same: 3, only_a: 4, only_b: 5 };
  function compute() {
    var key = state.a + "/" + state.b + "/" + state.g;
    if (cache.key === key) return;
    var A = D.samples[state.a], B = D.samples[state.b], ib = index(state.b), ia = index(state.a);
    var rows = [], sa = [], sb = [], reg = 0, imp = 0;
    for (var j = 0; j < A.k.length; j++) {
      var jb = ib.get(A.k[j] + "|" + A.r[j]);
      if (jb === undefined) { rows.push({ k: A.k[j], r: A.r[j], ja: j, jb: -1, st: "only_a", d: 0 }); continue; }
      var va = value(state.a, j), vb = value(state.b, jb), c = classify(va, vb, j, jb);
      rows.push({ k: A.k[j], r: A.r[j], ja: j, jb: jb, st: c[0], d: c[1] });
      sa.push(va[0]); sb.push(vb[0]);
      if (va[1] && !vb[1]) reg++; if (vb[1] && !va[1]) imp++;
    }
    for (var i = 0; i < B.k.length; i++) {
      if (!ia.has(B.k[i] + "|" + B.r[i])) rows.push({ k: B.k[i], r: B.r[i], ja: -1, jb: i, st: "only_b", d: 0 });
    }
    rows.sort(function (x, y) {
      var o = ORDER[x.st] - ORDER[y.st]; if (o) return o;
      return x.st === "regression" ? x.d - y.d : y.d - x.d;
    });
    var n = sa.length, ma = 0, mb = 0;
    for (var t = 0; t < n; t++) { ma += sa[t]; mb += sb[t]; }
    cache = { key: key, rows: rows, sa: sa, sb: sb,
      stats: { n: n, ma: n ? ma / n : NaN, mb: n ? mb / n : NaN, diff: n ? (mb - ma) / n : NaN,
               reg: reg, imp: imp, p: mcnemar(reg, imp), lo: null, hi: null } };
  }
  function mcnemar(b, c) {
    var n = b + c; if (!n) return 1;
    var k = Math.min(b, c), logc = 0, terms = [], top = -Infinity;
    for (var i = 0; i <= k; i++) {
      if (i > 0) logc += Math.log(n - i + 1) - Math.log(i);
      var t = logc - n * Math.LN2; terms.push(t); if (t > top) top = t;
    }
    var s = 0; for (var q = 0; q < terms.length; q++) s += Math.exp(terms[q] - top);
    return Math.min(1, 2 * Math.exp(top) * s);
  }
  function bootstrap(sa, sb) {
    // Seeded (mulberry32) so the same report shows the same interval every time.
    var n = sa.length, d = new Float64Array(n), seed = 12345, R = 1000, means = new Float64Array(R);
    for (var i = 0; i < n; i++) d[i] = sb[i] - sa[i];
    function rnd() { seed |= 0; seed = (seed + 0x6D2B79F5) | 0; var t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; }
    for (var r = 0; r < R; r++) { var s = 0; for (var j = 0; j < n; j++) s += d[(rnd() * n) | 0]; means[r] = s / n; }
    means.sort();
    return [means[Math.floor(0.025 * (R - 1))], means[Math.ceil(0.975 * (R - 1))]];
  }

  // -- filters ----------------------------------------------------------------------------------
  var FILTERS = [["all", "All"], ["regression", "Regressions"], ["improvement", "Improvements"],
                 ["changed", "Changed output"], ["failing", "Failing in B"], ["errors", "Errors"]];
  function keep(row, f) {
    var A = D.samples[state.a], B = D.samples[state.b];
    if (f === "all") return true;
    if (f === "regression" || f === "improvement") return row.st === f;
    if (f === "changed") return row.ja >= 0 && row.jb >= 0 && (A.o[row.ja] !== B.o[row.jb] || A.e[row.ja] !== B.e[row.jb]);
    if (f === "failing") return row.jb >= 0 && !value(state.b, row.jb)[1];
    if (f === "errors") return (row.ja >= 0 && A.e[row.ja] >= 0) || (row.jb >= 0 && B.e[row.jb] >= 0);
    return true;
  }
  function itemText(k) {
    var f = D.items.fields[k] || [], parts = [D.items.keys[k]];
    for (var i = 0; i < f.length; i++) parts.push(f[i][1]);
    return parts.join("\n").toLowerCase();
  }
  function matches(row, q) {
    if (!q) return true;
    var A = D.samples[state.a], B = D.samples[state.b];
    if (itemText(row.k).indexOf(q) >= 0) return true;
    var oa = row.ja >= 0 ? str(A.o[row.ja]) : null, ob = row.jb >= 0 ? str(B.o[row.jb]) : null;
    return (oa && oa.toLowerCase().indexOf(q) >= 0) || (ob && ob.toLowerCase().indexOf(q) >= 0) || false;
  }

  // -- token diff for outputs and prompts --------------------------------------------------------
  function lcsOps(a, b) {
    var n = a.length, m = b.length;
    if (n * m > 250000) return null;
    var dp = new Array(n + 1);
    for (var i = 0; i <= n; i++) dp[i] = new Int32Array(m + 1);
    for (i = n - 1; i >= 0; i--) for (var j = m - 1; j >= 0; j--)
      dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
    var ops = []; i = 0; j = 0;
    while (i < n && j < m) {
      if (a[i] === b[j]) { ops.push(["=", a[i]]); i++; j++; }
      else if (dp[i + 1][j] >= dp[i][j + 1]) ops.push(["-", a[i++]]);
      else ops.push(["+", b[j++]]);
    }
    while (i < n) ops.push(["-", a[i++]]);
    while (j < m) ops.push(["+", b[j++]]);
    return ops;
  }
  function tokens(s) { return s.match(/\s+|[^\s\w]|\w+/g) || []; }
  function fillDiff(node, text, other, side) {
    // side "a": show deletions (text = A); side "b": show insertions (text = B).
    var ops = other === null ? null : lcsOps(side === "a" ? tokens(text) : tokens(other), side === "a" ? tokens(other) : tokens(text));
    if (!ops) { node.textContent = text; return; }
    var buf = "";
    function flush() { if (buf) { node.appendChild(document.createTextNode(buf)); buf = ""; } }
    ops.forEach(function (op) {
      if (op[0] === "=") buf += op[1];
      else if (op[0] === "-" && side === "a") { flush(); node.appendChild(el("del", null, op[1])); }
      else if (op[0] === "+" && side === "b") { flush(); node.appendChild(el("ins", null, op[1])); }
    });
    flush();
  }

  // -- rendering ---------------------------------------------------------------------------------
  function renderSelects() {
    ["a", "b"].forEach(function (side) {
      var s = $("sel-" + side); s.textContent = "";
      IT.forEach(function (it, i) {
        var o = el("option", null, it.label + " · " + fmtScore(it.score) + (it.model_ref ? " · " + it.model_ref : ""));
        o.value = String(i); s.appendChild(o);
      });
      s.value = String(state[side]);
    });
    var g = $("sel-g"); g.textContent = "";
    var o = el("option", null, "objective (" + (G[D.objective] ? G[D.objective].name : "–") + ")"); o.value = "-1"; g.appendChild(o);
    G.forEach(function (gr, i) { var op = el("option", null, gr.name + (gr.model ? " (judge)" : "")); op.value = String(i); g.appendChild(op); });
    g.value = String(state.g);
  }
  function renderVerdict() {
    var st = cache.stats, v = $("verdict"); v.textContent = "";
    var A = IT[state.a], B = IT[state.b];
    if (state.a === state.b) { v.appendChild(el("span", "muted", "A and B are the same iteration: pick two to compare.")); }
    var line = el("div");
    line.appendChild(el("strong", null, B.label));
    line.appendChild(document.createTextNode(" vs " + A.label + ": "));
    line.appendChild(el("strong", st.diff > 0 ? "pos" : st.diff < 0 ? "neg" : "", fmtDelta(st.diff)));
    line.appendChild(document.createTextNode(" (" + fmtScore(st.ma) + " → " + fmtScore(st.mb) + ", n = " + st.n + " paired"));
    var ci = el("span", "ci", st.lo === null ? ", CI …" : ", 95% CI " + fmtDelta(st.lo) + " to " + fmtDelta(st.hi));
    ci.id = "ci"; line.appendChild(ci);
    line.appendChild(document.createTextNode(")"));
    v.appendChild(line);
    var sig = el("div", "sub");
    var significant = st.p < 0.05;
    sig.appendChild(el("span", "pill " + (significant ? (st.diff >= 0 ? "pass" : "fail") : ""), significant ? "significant" : "not significant"));
    sig.appendChild(document.createTextNode(" McNemar " + fmtP(st.p) + " on " + (st.reg + st.imp) + " discordant items: " +
      st.reg + " regressed, " + st.imp + " improved."));
    sig.id = "mcnemar";
    v.appendChild(sig);
  }
  function scheduleBootstrap() {
    var key = cache.key;
    setTimeout(function () {
      if (cache.key !== key || cache.stats.lo !== null || !cache.sa.length) return;
      var ci = bootstrap(cache.sa, cache.sb); cache.stats.lo = ci[0]; cache.stats.hi = ci[1];
      var node = $("ci"); if (node) node.textContent = ", 95% CI " + fmtDelta(ci[0]) + " to " + fmtDelta(ci[1]);
    }, 30);
  }
  function renderGraderDelta() {
    var t = $("grader-delta"); t.textContent = "";
    var h = el("tr"); ["grader", "A", "B", "Δ"].forEach(function (c, i) { h.appendChild(el("th", i ? "num" : "", c)); });
    var th = el("thead"); th.appendChild(h); t.appendChild(th);
    var tb = el("tbody");
    G.forEach(function (g, gi) {
      var a = IT[state.a].gstats[gi], b = IT[state.b].gstats[gi], tr = el("tr");
      var name = el("td"); name.appendChild(el("strong", null, g.name));
      if (g.model) { name.appendChild(document.createTextNode(" ")); name.appendChild(el("span", "pill judge", "judge")); }
      tr.appendChild(name);
      var va = a ? (D.metric === "mean_score" ? a[0] : a[1]) : null, vb = b ? (D.metric === "mean_score" ? b[0] : b[1]) : null;
      tr.appendChild(el("td", "num", fmtScore(va))); tr.appendChild(el("td", "num", fmtScore(vb)));
      var d = isNum(va) && isNum(vb) ? vb - va : null;
      tr.appendChild(el("td", "num " + (d > 0 ? "pos" : d < 0 ? "neg" : ""), fmtDelta(d)));
      tb.appendChild(tr);
    });
    t.appendChild(tb);
  }
  function renderConfig() {
    var t = $("config-diff"); t.textContent = "";
    var A = IT[state.a], B = IT[state.b];
    var h = el("tr"); ["", "A", "B"].forEach(function (c) { h.appendChild(el("th", null, c)); });
    var th = el("thead"); th.appendChild(h); t.appendChild(th);
    var tb = el("tbody");
    [["stage", "stage"], ["model", "model_ref"], ["fingerprint", "model_fingerprint"], ["prompt", "prompt_id"],
     ["split", "split"], ["parent", "parent_id"], ["decision", "decision"]].forEach(function (f) {
      var a = A[f[1]] || "–", b = B[f[1]] || "–", tr = el("tr", a !== b ? "changed" : "");
      if (a === "–" && b === "–") return;
      tr.appendChild(el("td", "muted", f[0]));
      var ca = el("td"); ca.appendChild(el("code", null, a)); var cb = el("td"); cb.appendChild(el("code", a !== b ? "pos" : null, b));
      tr.appendChild(ca); tr.appendChild(cb); tb.appendChild(tr);
    });
    t.appendChild(tb);
    var box = $("prompt-diff"); box.textContent = "";
    var pa = D.prompts[A.prompt_id] || [], pb = D.prompts[B.prompt_id] || [];
    function lines(p) { var out = []; p.forEach(function (m) { out.push("[" + m[0] + "]"); String(m[1]).split("\n").forEach(function (l) { out.push(l); }); }); return out; }
    var la = lines(pa), lb = lines(pb), ops = lcsOps(la, lb) || la.map(function (l) { return ["-", l]; }).concat(lb.map(function (l) { return ["+", l]; }));
    var changed = false;
    ops.forEach(function (op) {
      var cls = op[0] === "=" ? (/^\[\w+\]$/.test(op[1]) ? "r" : "c") : op[0] === "-" ? "a" : "b";
      if (op[0] !== "=") changed = true;
      box.appendChild(el("div", cls, op[1] === "" ? " " : op[1]));
    });
    if (!ops.length) box.appendChild(el("div", "c", "(no prompt recorded)"));
    $("prompt-box").querySelector("summary").textContent = changed ? "Prompt diff · changed" : "Prompt diff · identical";
    $("prompt-box").open = changed;
  }
  function renderFilters(visible) {
    var box = $("filters"); box.textContent = "";
    FILTERS.forEach(function (f) {
      var count = 0; cache.rows.forEach(function (r) { if (keep(r, f[0])) count++; });
      var b = el("button", "chip " + f[0] + (state.f === f[0] ? " on" : ""), f[1]);
      b.type = "button"; b.setAttribute("data-filter", f[0]); b.appendChild(el("b", null, count));
      b.addEventListener("click", function () { state.f = f[0]; state.p = 0; update(false); });
      box.appendChild(b);
    });
  }
  function side(it, j, other, sideName) {
    var cell = el("div"), s = D.samples[it];
    var head = el("div", "side-h");
    head.appendChild(el("span", null, (sideName === "a" ? "A · " : "B · ") + IT[it].label));
    if (j < 0) { cell.appendChild(head); cell.appendChild(el("pre", "out empty", "not in this iteration")); return cell; }
    var v = value(it, j);
    head.appendChild(el("span", "pill " + (v[1] ? "pass" : "fail"), (v[1] ? "pass" : "fail") + (D.metric === "mean_score" ? " " + fmtScore(v[0]) : "")));
    cell.appendChild(head);
    var err = str(s.e[j]), out = str(s.o[j]);
    if (err) cell.appendChild(el("pre", "out err", err));
    else if (!out) cell.appendChild(el("pre", "out empty", "(empty output)"));
    else { var pre = el("pre", "out"); fillDiff(pre, out, other, sideName); cell.appendChild(pre); }
    var grades = el("div", "grades"), fbs = el("div", "fb");
    G.forEach(function (g, gi) {
      var p = s.gp[gi][j]; if (p === null || p === undefined) return;
      var chip = el("span", "g " + (p ? "pass" : "fail"), (p ? "✓ " : "✗ ") + g.name + " " + (isNum(s.gs[gi][j]) ? s.gs[gi][j].toFixed(2) : ""));
      var fb = str(s.gf[gi][j]);
      if (fb) { chip.title = fb; var line = el("div"); line.appendChild(el("strong", null, g.name + ": ")); line.appendChild(document.createTextNode(fb)); fbs.appendChild(line); }
      grades.appendChild(chip);
    });
    cell.appendChild(grades); cell.appendChild(fbs);
    var meta = [];
    if (isNum(s.t[j])) meta.push(s.t[j] + " tok"); if (isNum(s.l[j]) && s.l[j] > 0) meta.push(s.l[j].toFixed(2) + " s");
    if (meta.length) head.firstChild.textContent += " · " + meta.join(" · ");
    return cell;
  }
  var LABEL = { regression: "regression", improvement: "improvement", changed: "changed", same: "same", only_a: "only in A", only_b: "only in B" };
  function renderRow(r) {
    var A = D.samples[state.a], B = D.samples[state.b];
    var row = el("div", "row " + r.st); row.setAttribute("data-key", D.items.keys[r.k]); row.setAttribute("data-status", r.st);
    var item = el("div");
    var top = el("div"); top.appendChild(el("span", "key", D.items.keys[r.k] + (r.r ? " #" + r.r : ""))); top.appendChild(el("span", "status", LABEL[r.st]));
    item.appendChild(top);
    var fields = el("div", "fields clamp"), f = D.items.fields[r.k] || [];
    f.forEach(function (kv) { var d = el("div"); d.appendChild(el("span", "n", kv[0])); d.appendChild(document.createTextNode(kv[1])); fields.appendChild(d); });
    item.appendChild(fields);
    var th = (D.items.thumbs || [])[r.k] || [];
    if (th.length) {
      var pics = el("div", "thumbs");
      th.forEach(function (i) {
        var src = str(i);
        // Only inline images are shown: the page fetches nothing.
        if (!src || !/^data:image\/(jpeg|png|webp);base64,[A-Za-z0-9+\/=]+$/.test(src)) return;
        var img = el("img", "thumb"); img.src = src; img.alt = "input image of " + D.items.keys[r.k]; pics.appendChild(img);
      });
      item.appendChild(pics);
    }
    var more = el("button", "more", "details"); more.type = "button";
    more.addEventListener("click", function () { row.classList.toggle("open"); more.textContent = row.classList.contains("open") ? "less" : "details"; });
    item.appendChild(more);
    row.appendChild(item);
    var oa = r.ja >= 0 && A.e[r.ja] < 0 ? str(A.o[r.ja]) : null, ob = r.jb >= 0 && B.e[r.jb] < 0 ? str(B.o[r.jb]) : null;
    var differ = oa !== null && ob !== null && oa !== ob;
    row.appendChild(side(state.a, r.ja, differ ? ob : null, "a"));
    row.appendChild(side(state.b, r.jb, differ ? oa : null, "b"));
    return row;
  }
  function renderRows() {
    var q = state.q.trim().toLowerCase(), list = [];
    cache.rows.forEach(function (r) { if (keep(r, state.f) && matches(r, q)) list.push(r); });
    var size = D.pageSize > 0 ? D.pageSize : list.length || 1, pages = Math.max(1, Math.ceil(list.length / size));
    state.p = Math.min(Math.max(state.p, 0), pages - 1);
    var box = $("rows"); box.textContent = "";
    var frag = document.createDocumentFragment();
    list.slice(state.p * size, state.p * size + size).forEach(function (r) { frag.appendChild(renderRow(r)); });
    box.appendChild(frag);
    if (!list.length) box.appendChild(el("div", "empty-state", "No items match."));
    var pager = $("pager"); pager.textContent = "";
    var from = list.length ? state.p * size + 1 : 0, to = Math.min(list.length, (state.p + 1) * size);
    var info = el("span", null, "Showing " + from + "–" + to + " of " + list.length + " (" + cache.rows.length + " items)"); info.id = "shown";
    pager.appendChild(info);
    var nav = el("span");
    var prev = el("button", null, "‹ Previous"); prev.type = "button"; prev.disabled = state.p === 0; prev.id = "prev";
    prev.addEventListener("click", function () { state.p--; update(true); });
    var next = el("button", null, "Next ›"); next.type = "button"; next.disabled = state.p >= pages - 1; next.id = "next";
    next.addEventListener("click", function () { state.p++; update(true); });
    nav.appendChild(prev); nav.appendChild(document.createTextNode(" page " + (state.p + 1) + " of " + pages + " ")); nav.appendChild(next);
    pager.appendChild(nav);
  }
  function update(scroll) {
    compute();
    renderSelects(); renderVerdict(); renderGraderDelta(); renderConfig(); renderFilters(); renderRows();
    writeHash(); scheduleBootstrap();
    if (scroll) $("compare").scrollIntoView();
  }

  $("sel-a").addEventListener("change", function (e) { state.a = +e.target.value; state.p = 0; update(false); });
  $("sel-b").addEventListener("change", function (e) { state.b = +e.target.value; state.p = 0; update(false); });
  $("sel-g").addEventListener("change", function (e) { state.g = +e.target.value; state.p = 0; update(false); });
  $("swap").addEventListener("click", function () { var t = state.a; state.a = state.b; state.b = t; state.p = 0; update(false); });
  var timer = null;
  $("q").addEventListener("input", function (e) {
    clearTimeout(timer);
    timer = setTimeout(function () { state.q = e.target.value; state.p = 0; renderRows(); writeHash(); }, 120);
  });
  Array.prototype.forEach.call(document.querySelectorAll("button.pick"), function (b) {
    b.addEventListener("click", function () { state[b.getAttribute("data-side")] = +b.getAttribute("data-idx"); state.p = 0; update(true); });
  });
  readHash();
  $("q").value = state.q;
  if (N) update(false);
  document.body.setAttribute("data-ready", "1");
  if (window.performance && performance.mark) performance.mark("fw-rendered");
})();

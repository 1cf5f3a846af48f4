// Arbiter dashboard: plain JavaScript, no framework, no build step, no network beyond this
// origin. Views are rebuilt from the public /v1 API; hash routes (#/jobs/ID) keep it one page.
'use strict';

(() => {
  const KEY_STORAGE = 'arbiter.apiKey';
  const POLL_MS = 2000;
  const IDLE_POLL_MS = 10000;
  const EVENTS_PAGE = 500;
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const main = document.getElementById('main');
  const conn = document.getElementById('conn');

  // ---------------------------------------------------------------- DOM helpers

  /** h('div', {class: 'x', onclick: fn}, child, 'text', [more]) — text is never parsed as HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k === 'value' && 'value' in el) el.value = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    append(el, children);
    return el;
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
    for (const c of children.flat()) if (c !== undefined && c !== null) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return el;
  }
  function replace(el, ...children) { el.replaceChildren(); return append(el, children); }
  /** Re-renders `container` keeping keyboard focus on the same control (by id or link target),
   *  so a refresh every 2 s does not throw a keyboard user back to the top. */
  function keepFocus(container, render) {
    const a = document.activeElement;
    let sel = null;
    if (a && a !== document.body && container.contains(a)) {
      if (a.id) sel = `#${CSS.escape(a.id)}`;
      else if (a.getAttribute('href')) sel = `a[href="${CSS.escape(a.getAttribute('href'))}"]`;
    }
    render();
    const el = sel && container.querySelector(sel);
    if (el) el.focus({ preventScroll: true });
  }

  // ---------------------------------------------------------------- formatting

  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : (typeof v === 'string' && v.trim() !== '' && Number.isFinite(+v) ? +v : null));
  function fmt(v, digits = 4) {
    const n = num(v);
    if (n === null) return '—';
    if (Number.isInteger(n)) return String(n);
    const a = Math.abs(n);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return n.toExponential(2);
    return n.toFixed(digits);
  }
  const pct = (v) => (num(v) === null ? '—' : `${(num(v) * 100).toFixed(1)}%`);
  function duration(ms) {
    if (ms === null || !Number.isFinite(ms) || ms < 0) return '—';
    let sec = Math.round(ms / 1000);
    if (sec < 60) return `${sec}s`;
    const d = Math.floor(sec / 86400); sec -= d * 86400;
    const hr = Math.floor(sec / 3600); sec -= hr * 3600;
    const m = Math.floor(sec / 60); sec -= m * 60;
    if (d) return `${d}d ${hr}h`;
    if (hr) return `${hr}h ${String(m).padStart(2, '0')}m`;
    return `${m}m ${String(sec).padStart(2, '0')}s`;
  }
  /** Timestamps may be RFC 3339 strings or Unix seconds (OpenAI style). */
  function toDate(v) {
    if (v === undefined || v === null || v === '') return null;
    const d = typeof v === 'number' ? new Date(v < 1e12 ? v * 1000 : v) : new Date(v);
    return Number.isNaN(d.getTime()) ? null : d;
  }
  function when(v) {
    const d = toDate(v);
    if (!d) return '—';
    const ago = Date.now() - d.getTime();
    if (ago >= 0 && ago < 60_000) return 'just now';
    if (ago >= 0 && ago < 3_600_000) return `${Math.floor(ago / 60_000)} min ago`;
    if (ago >= 0 && ago < 86_400_000 && d.getDate() === new Date().getDate()) return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    return d.toLocaleString([], { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }
  function timeEl(v) {
    const d = toDate(v);
    return d ? h('time', { datetime: d.toISOString(), title: d.toLocaleString() }, when(v)) : '—';
  }
  function clockEl(v) {
    const d = toDate(v);
    return d ? h('time', { datetime: d.toISOString(), title: d.toLocaleString() }, d.toLocaleTimeString([], { hour12: false })) : h('time', {}, '');
  }
  const shortId = (id) => (typeof id === 'string' && id.length > 14 ? `${id.slice(0, 12)}…` : String(id ?? '—'));
  const origin = () => location.origin + location.pathname.replace(/[^/]*$/, '');

  // ---------------------------------------------------------------- reading API objects
  // Field names follow openapi.yaml; the alternatives keep the page working across versions.

  const first = (...vals) => vals.find((v) => v !== undefined && v !== null);
  /** An object field that may arrive as JSON text. */
  function obj(v) {
    if (typeof v === 'string') { try { v = JSON.parse(v); } catch (_) { return {}; } }
    return v && typeof v === 'object' ? v : {};
  }
  const listOf = (body) => (Array.isArray(body) ? body : first(body && body.data, body && body.items, []));

  const job = {
    status: (j) => String(j.status || 'queued'),
    step: (j) => num(first(j.progress && j.progress.step, j.step, j.trained_steps)) ?? 0,
    total: (j) => num(first(j.progress && j.progress.total_steps, j.progress && j.progress.total, j.total_steps)),
    epoch: (j) => num(first(j.progress && j.progress.epoch, j.epoch)),
    metrics: (j) => obj(first(j.metrics, j.latest_metrics, j.result_metrics, {})),
    trainLoss(j) {
      const m = job.metrics(j);
      return num(first(m.train_loss, m.loss, m.training_loss, m.train && m.train.loss, j.train_loss));
    },
    evalLoss(j) {
      const m = job.metrics(j);
      return num(first(m.eval_log_loss, m.log_loss, m.eval && m.eval.log_loss, m.validation_log_loss, j.eval_log_loss));
    },
    evalAccuracy(j) {
      const m = job.metrics(j);
      return num(first(m.eval_accuracy, m.accuracy, m.eval && m.eval.accuracy));
    },
    created: (j) => first(j.created_at, j.created),
    started: (j) => first(j.started_at, j.started, j.running_at),
    finished: (j) => first(j.finished_at, j.finished, j.completed_at, j.ended_at),
    elapsedMs(j) {
      const st = toDate(job.started(j));
      if (!st) return null;
      const end = toDate(job.finished(j));
      return (end ? end.getTime() : Date.now()) - st.getTime();
    },
    etaMs(j) {
      if (job.status(j) !== 'running') return null;
      const step = job.step(j), total = job.total(j), el = job.elapsedMs(j);
      if (!total || !step || el === null || step >= total) return null;
      return (el / step) * (total - step);
    },
    fraction(j) {
      const total = job.total(j);
      if (job.status(j) === 'succeeded') return 1;
      return total ? Math.min(1, job.step(j) / total) : 0;
    },
    error(j) {
      const e = j.error;
      if (!e) return null;
      return typeof e === 'string' ? e : first(e.message, JSON.stringify(e));
    },
  };

  const dataset = {
    name: (d) => first(d.name, d.filename, d.file_name),
    rows: (d) => num(first(d.rows, d.row_count, d.num_rows)),
    dropped: (d) => num(first(d.dropped_rows, d.dropped)),
    labels: (d) => first(d.label_counts, d.labels, {}) || {},
  };

  /** Metric points from one job event: [{kind:'train', step, loss, lr} | {kind:'eval', step, log_loss, accuracy, ...}]. */
  function pointsOf(ev) {
    let d = first(ev.data, ev.metrics, ev.payload, ev) || {};
    if (typeof d === 'string') { try { d = JSON.parse(d); } catch (_) { d = {}; } }
    const kind = String(first(ev.type, ev.kind, ev.event, '')).toLowerCase();
    const step = num(first(d.step, ev.step));
    const out = [];
    if (step === null) return out;
    const ll = num(first(d.log_loss, d.eval_log_loss, d.metrics && d.metrics.log_loss));
    if (ll !== null || kind.includes('eval')) {
      const m = d.metrics || d;
      if (num(first(m.log_loss, ll)) !== null) {
        out.push({ kind: 'eval', step, log_loss: num(first(m.log_loss, ll)), accuracy: num(first(m.accuracy, m.eval_accuracy)), balanced_accuracy: num(m.balanced_accuracy) });
      }
      return out;
    }
    if (kind.includes('checkpoint')) return out;
    const loss = num(first(d.loss, d.train_loss));
    if (loss !== null) out.push({ kind: 'train', step, loss, lr: num(first(d.learning_rate, d.lr)) });
    return out;
  }
  function eventText(ev) {
    const msg = first(ev.message, ev.msg, ev.text);
    if (msg) return String(msg);
    const pts = pointsOf(ev);
    if (pts.length && pts[0].kind === 'train') return `step ${pts[0].step}: loss ${fmt(pts[0].loss)}${pts[0].lr !== null ? `, lr ${fmt(pts[0].lr)}` : ''}`;
    if (pts.length && pts[0].kind === 'eval') return `eval at step ${pts[0].step}: log loss ${fmt(pts[0].log_loss)}, accuracy ${pct(pts[0].accuracy)}`;
    const d = first(ev.data, {});
    return `${first(ev.type, ev.kind, 'event')} ${Object.keys(d).length ? JSON.stringify(d) : ''}`.trim();
  }

  // ---------------------------------------------------------------- API client, API key

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(first(e.message, typeof body === 'string' && body ? body.slice(0, 300) : null, `HTTP ${status}`));
      this.status = status;
      this.code = e.code;
      this.detail = e;
    }
  }
  let keyPrompt = null; // one shared prompt, however many requests got 401 at once
  let keyDeclined = false;

  async function api(path, { method = 'GET', body, json, headers = {}, raw = false, signal } = {}) {
    for (let attempt = 0; ; attempt++) {
      const hdrs = new Headers(headers);
      const key = localStorage.getItem(KEY_STORAGE);
      if (key) hdrs.set('Authorization', `Bearer ${key}`);
      if (json !== undefined) { hdrs.set('Content-Type', 'application/json'); body = JSON.stringify(json); }
      if (!raw) hdrs.set('Accept', 'application/json');
      let res;
      try {
        res = await fetch(path.replace(/^\//, ''), { method, body, headers: hdrs, cache: 'no-store', signal });
      } catch (err) {
        if (signal && signal.aborted) throw err;
        setConn(false);
        throw new ApiError(0, { error: { message: 'Cannot reach the server.' } });
      }
      setConn(true);
      if (res.status === 401 && attempt < 3 && !keyDeclined) {
        await askForKey(Boolean(key));
        continue;
      }
      if (raw && res.ok) return res;
      const text = await res.text();
      let data = text;
      try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
      if (!res.ok) throw new ApiError(res.status, data);
      return data;
    }
  }

  const dialog = document.getElementById('key-dialog');
  const keyForm = document.getElementById('key-form');
  const keyInput = document.getElementById('key-input');
  const keyError = document.getElementById('key-error');
  let keyResolve = null;

  function askForKey(rejected) {
    if (!keyPrompt) {
      keyPrompt = new Promise((resolve) => {
        keyResolve = resolve;
        keyError.hidden = !rejected;
        keyError.textContent = rejected ? 'The stored key was not accepted. Enter a valid key.' : '';
        keyInput.value = '';
        keyInput.setAttribute('aria-invalid', rejected ? 'true' : 'false');
        if (!dialog.open) dialog.showModal();
        keyInput.focus();
      }).finally(() => { keyPrompt = null; keyResolve = null; });
    }
    return keyPrompt;
  }
  function closeKeyDialog(saved) {
    if (dialog.open) dialog.close();
    keyDeclined = !saved;
    if (keyResolve) keyResolve();
    if (saved) route();
  }
  keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = keyInput.value.trim();
    if (!v) { keyError.hidden = false; keyError.textContent = 'Enter a key.'; keyInput.focus(); return; }
    localStorage.setItem(KEY_STORAGE, v);
    closeKeyDialog(true);
  });
  document.getElementById('key-cancel').addEventListener('click', () => closeKeyDialog(false));
  document.getElementById('key-forget').addEventListener('click', () => { localStorage.removeItem(KEY_STORAGE); keyInput.value = ''; closeKeyDialog(false); });
  dialog.addEventListener('cancel', (e) => { e.preventDefault(); closeKeyDialog(false); });
  document.getElementById('key-button').addEventListener('click', () => { keyDeclined = false; askForKey(false); });

  function setConn(ok) {
    conn.textContent = ok ? '' : 'Server unreachable, retrying…';
    conn.classList.toggle('bad', !ok);
  }

  /** Error shown where the user looks: the message plus any row/column/field details. */
  function errorBox(err, title) {
    const d = (err && err.detail) || {};
    const items = [];
    for (const [k, v] of Object.entries(d)) {
      if (!Array.isArray(v) || ['code', 'message'].includes(k)) continue;
      for (const it of v) items.push(it);
    }
    const whereOf = (it) => {
      if (typeof it !== 'object' || it === null) return null;
      const parts = [];
      if (it.row !== undefined && it.row !== null) parts.push(`row ${it.row}`);
      if (it.line !== undefined && it.line !== null) parts.push(`line ${it.line}`);
      if (it.column) parts.push(`column ${it.column}`);
      if (it.field) parts.push(String(it.field));
      return parts.join(', ');
    };
    const single = whereOf(d);
    const msg = String(err.message);
    // Details that only repeat the message are left out.
    const extra = items.filter((it) => !(items.length === 1 && typeof it === 'object' && it && msg.includes(String(first(it.reason, it.message, '\u0000')))));
    return h('div', { class: 'error-box', role: 'alert' },
      h('strong', {}, title || (err.status ? `Error ${err.status}${err.code ? ` (${err.code})` : ''}` : 'Error')), ' ',
      single && !msg.includes(single) ? h('span', { class: 'where' }, `${single}: `) : null,
      msg,
      extra.length ? h('ul', {}, extra.slice(0, 20).map((it) => {
        if (typeof it !== 'object' || it === null) return h('li', {}, String(it));
        const where = whereOf(it);
        return h('li', {}, where ? h('code', {}, where) : null, where ? ': ' : '', first(it.reason, it.message, JSON.stringify(it)));
      })) : null);
  }

  // ---------------------------------------------------------------- polling

  /** Timers and observers of the current view; all stopped when the route changes. */
  let viewTimers = [];
  let viewToken = 0;
  function stopView() { for (const t of viewTimers) t(); viewTimers = []; viewToken++; }
  /** Runs fn now and again `delay(result)` ms after it settles; stops when the view changes,
   *  when delay returns null, and pauses while the tab is hidden. */
  function poll(fn, delay) {
    const token = viewToken;
    let timer = null;
    let stopped = false;
    const tick = async () => {
      timer = null;
      if (stopped || token !== viewToken) return;
      if (document.hidden) { timer = setTimeout(tick, 500); return; }
      let next;
      try { next = delay(await fn(), null); } catch (err) { next = delay(undefined, err); }
      if (!stopped && token === viewToken && next !== null) timer = setTimeout(tick, next);
    };
    viewTimers.push(() => { stopped = true; if (timer) clearTimeout(timer); });
    tick();
  }

  // ---------------------------------------------------------------- chart (SVG, by hand)

  function niceTicks(min, max, count) {
    if (min === max) { const pad = Math.abs(min) * 0.1 || 1; min -= pad; max += pad; }
    const span = max - min;
    const step0 = span / count;
    const mag = 10 ** Math.floor(Math.log10(step0));
    const norm = step0 / mag;
    const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    const lo = Math.floor(min / step) * step;
    const hi = Math.ceil(max / step) * step;
    const ticks = [];
    for (let v = lo; v <= hi + step / 2; v += step) ticks.push(+v.toPrecision(12));
    return { lo, hi, ticks };
  }
  function tickLabel(v, step) {
    const decimals = Math.max(0, -Math.floor(Math.log10(step || 1)));
    return Math.abs(v) >= 1e5 ? v.toExponential(1) : v.toFixed(Math.min(decimals, 6));
  }
  function thin(points, max) {
    if (points.length <= max) return points;
    const stride = points.length / max;
    const out = [];
    for (let i = 0; i < max; i++) out.push(points[Math.floor(i * stride)]);
    out.push(points[points.length - 1]);
    return out;
  }

  /** A line chart that redraws to its container's width. series: [{name, cls, points: [[x, y]]}] */
  function makeChart({ title, xLabel, yFormat, yRange, emptyText }) {
    const box = h('div', { class: 'chart' });
    const legend = h('div', { class: 'legend' });
    const wrap = h('figure', { class: 'chart-fig', style: null }, box, legend);
    wrap.style.margin = '0';
    let series = [];
    const tip = h('div', { class: 'tip', hidden: true });
    function draw() {
      const W = Math.max(260, box.clientWidth || 600);
      const H = 220;
      const m = { l: 52, r: 14, t: 12, b: 34 };
      const pts = series.flatMap((se) => se.points);
      const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': describe() });
      svg.append(s('title', {}, describe()));
      if (!pts.length) {
        svg.append(s('rect', { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, fill: 'none', class: 'axis' }));
        svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'empty-chart' }, emptyText || 'No points yet'));
        box.replaceChildren(svg);
        replace(legend);
        return;
      }
      const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
      let xmin = Math.min(...xs), xmax = Math.max(...xs);
      if (xmin === xmax) { xmin -= 1; xmax += 1; }
      let ymin = Math.min(...ys), ymax = Math.max(...ys);
      if (yRange) { ymin = Math.min(ymin, yRange[0]); ymax = Math.max(ymax, yRange[1]); }
      const yt = niceTicks(ymin, ymax, 4);
      const xt = niceTicks(xmin, xmax, Math.max(2, Math.floor((W - m.l - m.r) / 90)));
      const single = Math.min(...xs) === Math.max(...xs);
      const xlo = single ? xmin : Math.min(...xs), xhi = single ? xmax : Math.max(...xs);
      const X = (v) => m.l + ((v - xlo) / (xhi - xlo || 1)) * (W - m.l - m.r);
      const Y = (v) => m.t + (1 - (v - yt.lo) / (yt.hi - yt.lo || 1)) * (H - m.t - m.b);
      const ystep = yt.ticks[1] - yt.ticks[0];
      for (const v of yt.ticks) {
        svg.append(s('line', { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), class: 'grid-line' }));
        svg.append(s('text', { x: m.l - 6, y: Y(v) + 4, 'text-anchor': 'end' }, yFormat ? yFormat(v) : tickLabel(v, ystep)));
      }
      for (const v of xt.ticks) {
        if (v < xlo || v > xhi || !Number.isInteger(v)) continue;
        svg.append(s('text', { x: X(v), y: H - m.b + 16, 'text-anchor': 'middle' }, String(v)));
      }
      svg.append(s('line', { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: 'axis' }));
      svg.append(s('line', { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: 'axis' }));
      svg.append(s('text', { x: (m.l + W - m.r) / 2, y: H - 4, 'text-anchor': 'middle' }, xLabel || 'step'));
      for (const se of series) {
        if (!se.points.length) continue;
        const p = thin(se.points, 1500);
        svg.append(s('polyline', { class: `series ${se.cls}`, points: p.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' ') }));
        if (p.length <= 40 || se.markers) {
          for (const [x, y] of p) svg.append(s('circle', { cx: X(x), cy: Y(y), r: 3, class: se.cls }));
        }
      }
      const hover = s('line', { class: 'hover-line', y1: m.t, y2: H - m.b, visibility: 'hidden' });
      svg.append(hover);
      svg.addEventListener('pointermove', (e) => {
        const r = svg.getBoundingClientRect();
        const px = ((e.clientX - r.left) / r.width) * W;
        const xv = xlo + ((px - m.l) / (W - m.l - m.r)) * (xhi - xlo);
        const lines = [];
        let bx = null;
        for (const se of series) {
          if (!se.points.length) continue;
          let best = se.points[0];
          for (const q of se.points) if (Math.abs(q[0] - xv) < Math.abs(best[0] - xv)) best = q;
          bx = bx === null ? best[0] : bx;
          lines.push(`${se.name}: ${yFormat ? yFormat(best[1]) : fmt(best[1])}`);
        }
        if (bx === null) return;
        hover.setAttribute('x1', X(bx)); hover.setAttribute('x2', X(bx)); hover.setAttribute('visibility', 'visible');
        tip.hidden = false;
        tip.textContent = `${xLabel || 'step'} ${bx} · ${lines.join(' · ')}`;
        const left = Math.min(Math.max(0, (X(bx) / W) * r.width + 8), r.width - tip.offsetWidth);
        tip.style.left = `${left}px`;
        tip.style.top = '0px';
      });
      svg.addEventListener('pointerleave', () => { hover.setAttribute('visibility', 'hidden'); tip.hidden = true; });
      box.replaceChildren(svg, tip);
      replace(legend, series.filter((se) => !se.hideLegend).map((se) => h('span', {}, h('span', { class: `sw ${se.cls}` }), se.name,
        se.points.length ? ` (latest ${yFormat ? yFormat(se.points[se.points.length - 1][1]) : fmt(se.points[se.points.length - 1][1])})` : '')));
    }
    function describe() {
      const parts = series.filter((se) => se.points.length && !se.hideLegend).map((se) => `${se.name}: ${se.points.length} points, latest ${fmt(se.points[se.points.length - 1][1])} at ${xLabel || 'step'} ${se.points[se.points.length - 1][0]}`);
      return `${title}. ${parts.length ? parts.join('; ') : 'No points yet.'}`;
    }
    const ro = new ResizeObserver(() => draw());
    ro.observe(box);
    viewTimers.push(() => ro.disconnect());
    return {
      el: wrap,
      set(next) { series = next; draw(); },
      count: () => series.reduce((n, se) => n + se.points.length, 0),
    };
  }

  function ema(points, alpha) {
    const out = [];
    let v = null;
    for (const [x, y] of points) { v = v === null ? y : alpha * y + (1 - alpha) * v; out.push([x, v]); }
    return out;
  }

  // ---------------------------------------------------------------- small view parts

  function statusBadge(status, reason) {
    return h('span', { class: `status ${status}`, 'data-status': status, title: reason || null }, status);
  }
  function progressBar(j, big) {
    const st = job.status(j), step = job.step(j), total = job.total(j);
    const frac = job.fraction(j);
    const bar = h('span', {});
    bar.style.width = `${(frac * 100).toFixed(1)}%`;
    const label = total ? `${step} / ${total}` : (st === 'queued' ? 'waiting' : `${step} steps`);
    return h('div', { class: `progress${big ? ' big' : ''}` },
      h('div', { class: `bar ${st}`, role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': total || 1, 'aria-valuenow': total ? Math.min(step, total) : 0, 'aria-valuetext': `step ${label}`, 'aria-label': 'Training progress' }, bar),
      h('span', { class: 'txt' }, label));
  }
  function timing(j) {
    const el = job.elapsedMs(j);
    const eta = job.etaMs(j);
    if (el === null) return job.status(j) === 'queued' ? 'not started' : '—';
    return eta === null ? duration(el) : `${duration(el)} · ETA ${duration(eta)}`;
  }
  function curlBlock(lines) {
    const text = lines.join(' \\\n  ');
    const copy = h('button', { type: 'button', class: 'link-button', onclick: async () => {
      try { await navigator.clipboard.writeText(text.replace(/ \\\n {2}/g, ' ')); copy.textContent = 'Copied'; } catch (_) { copy.textContent = 'Select and copy'; }
    } }, 'Copy');
    return h('div', {}, h('pre', {}, h('code', {}, text)), copy);
  }
  function authHeaderLine() {
    // double quotes: the shell expands the variable
    return localStorage.getItem(KEY_STORAGE) ? ['-H "Authorization: Bearer $ARBITER_API_KEY"'] : [];
  }
  /** A download link that also works with auth on: with a stored key the file is fetched with
   *  the Authorization header and handed to the browser as a blob. */
  function downloadLink(url, name, label = 'Download') {
    const href = url.replace(/^\//, '');
    const a = h('a', { href, download: '' }, label);
    a.addEventListener('click', async (e) => {
      if (!localStorage.getItem(KEY_STORAGE)) return;
      e.preventDefault();
      a.textContent = 'Downloading…';
      try {
        const res = await api(href, { raw: true });
        const disp = res.headers.get('Content-Disposition') || '';
        const file = (disp.match(/filename="?([^";]+)"?/) || [])[1] || name;
        const blobUrl = URL.createObjectURL(await res.blob());
        const tmp = h('a', { href: blobUrl, download: file });
        document.body.append(tmp);
        tmp.click();
        tmp.remove();
        setTimeout(() => URL.revokeObjectURL(blobUrl), 10_000);
        a.textContent = label;
      } catch (err) {
        a.textContent = `Download failed (${err.message})`;
      }
    });
    return a;
  }
  function pageHead(title, sub, ...right) {
    return h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, title), sub ? h('p', { class: 'sub' }, sub) : null), right.length ? h('div', { class: 'actions' }, right) : null);
  }
  function focusMain() {
    const h1 = main.querySelector('h1');
    if (h1) { h1.setAttribute('tabindex', '-1'); h1.focus({ preventScroll: true }); }
  }

  // ---------------------------------------------------------------- view: jobs

  function viewJobs(params) {
    const status = params.get('status') || '';
    const body = h('div', { class: 'panel' }, h('p', { class: 'muted' }, 'Loading jobs…'));
    const filter = h('select', { id: 'f-status', 'aria-label': 'Show jobs with status', onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : '#/jobs'; } },
      ['', 'queued', 'running', 'succeeded', 'failed', 'cancelled'].map((st) => h('option', { value: st, selected: st === status }, st || 'all statuses')));
    replace(main,
      pageHead('Fine-tuning jobs', 'LoRA fine-tuning runs, newest first. Running jobs refresh every 2 s.',
        filter, h('a', { class: 'button primary', href: '#/jobs/new' }, 'New job')),
      body);
    poll(async () => {
      const q = new URLSearchParams({ limit: '100' });
      if (status) q.set('status', status);
      const res = await api(`/v1/fine-tuning/jobs?${q}`);
      const jobs = listOf(res);
      keepFocus(body, () => renderJobsTable(body, jobs, status));
      if (res && res.has_more) body.append(h('p', { class: 'muted' }, 'Showing the newest 100 jobs.'));
      return jobs;
    }, (jobs, err) => {
      if (err) { replace(body, errorBox(err, 'Could not load jobs')); return err.status === 401 ? null : IDLE_POLL_MS; }
      return jobs.some((j) => !TERMINAL.has(job.status(j))) ? POLL_MS : IDLE_POLL_MS;
    });
  }

  function renderJobsTable(body, jobs, status) {
    if (!jobs.length && status) {
      replace(body, h('p', { class: 'empty' }, `No ${status} jobs. `, h('a', { href: '#/jobs' }, 'Show all jobs')));
      return;
    }
    if (!jobs.length) {
      replace(body, h('div', { class: 'empty' },
        h('strong', {}, 'No jobs yet.'),
        h('p', {}, 'Upload a dataset on the ', h('a', { href: '#/datasets' }, 'Datasets'), ' page and use ', h('a', { href: '#/jobs/new' }, 'New job'), ', or from a shell:'),
        curlBlock([`curl -s ${origin()}v1/datasets`, ...authHeaderLine(), '-F file=@train.csv']),
        curlBlock([`curl -s ${origin()}v1/fine-tuning/jobs`, ...authHeaderLine(), "-H 'Content-Type: application/json'",
          `-d '{"dataset_id": "DATASET_ID", "hyperparameters": {"epochs": 1, "batch_size": 8}}'`])));
      return;
    }
    const rows = jobs.map((j) => {
      const href = `#/jobs/${encodeURIComponent(j.id)}`;
      return h('tr', { 'data-job-id': j.id, 'data-status': job.status(j) },
        h('td', { 'data-label': 'Job' }, h('a', { href, class: 'id', title: j.id }, shortId(j.id))),
        h('td', { 'data-label': 'Status' }, statusBadge(job.status(j), first(j.status_reason, job.error(j)))),
        h('td', { 'data-label': 'Progress' }, progressBar(j)),
        h('td', { 'data-label': 'Elapsed · ETA' }, timing(j)),
        h('td', { 'data-label': 'Train loss', class: 'num' }, fmt(job.trainLoss(j))),
        h('td', { 'data-label': 'Eval log loss', class: 'num' }, fmt(job.evalLoss(j))),
        h('td', { 'data-label': 'Created' }, timeEl(job.created(j))));
    });
    replace(body, h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'jobs-table' },
      h('caption', { class: 'visually-hidden' }, 'Fine-tuning jobs'),
      h('thead', {}, h('tr', {}, ['Job', 'Status', 'Progress', 'Elapsed · ETA'].map((t) => h('th', { scope: 'col' }, t)),
        h('th', { scope: 'col', class: 'num' }, 'Train loss'), h('th', { scope: 'col', class: 'num' }, 'Eval log loss'), h('th', { scope: 'col' }, 'Created'))),
      h('tbody', {}, rows))));
  }

  // ---------------------------------------------------------------- view: one job

  function flatten(obj, prefix = '', out = []) {
    for (const [k, v] of Object.entries(obj || {})) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v)) flatten(v, key, out);
      else out.push([key, Array.isArray(v) ? v.join(', ') : v === null ? '—' : String(v)]);
    }
    return out;
  }

  function viewJob(id) {
    const head = h('div', {});
    const summary = h('div', { class: 'panel', id: 'job-summary' }, h('p', { class: 'muted' }, 'Loading job…'));
    const lossChart = makeChart({ title: 'Training loss per step', xLabel: 'step', emptyText: 'No training steps yet' });
    const evalChart = makeChart({ title: 'Evaluation log loss', xLabel: 'step', emptyText: 'No evaluation yet' });
    const accChart = makeChart({ title: 'Evaluation accuracy', xLabel: 'step', yFormat: (v) => `${Math.round(v * 100)}%`, yRange: [0, 1], emptyText: 'No evaluation yet' });
    const hyper = h('div', {}, h('p', { class: 'muted' }, '—'));
    const ckpts = h('div', {}, h('p', { class: 'muted' }, 'No checkpoints yet.'));
    const adapterBox = h('div', { id: 'adapter-files' });
    let adapterShown = null;
    /** The trained adapter's files (PEFT layout), once the job has produced one. */
    async function loadAdapter(adapterId) {
      if (!adapterId || adapterShown === adapterId) return;
      adapterShown = adapterId;
      let a;
      try { a = await api(`/v1/adapters/${encodeURIComponent(adapterId)}`); } catch (_) { adapterShown = null; return; }
      const files = Array.isArray(a.files) ? a.files : [];
      const m = obj(a.metrics);
      // a trained adapter's metrics hold its best evaluation; other adapters may say it flat
      const evalLogLoss = num(first(obj(m.best_eval).log_loss, m.eval_log_loss, m.log_loss));
      replace(adapterBox, h('h3', { class: 'adapter-head' }, 'Trained adapter'),
        h('p', {}, h('span', { class: 'id' }, first(a.name, a.id)), ' · ',
          h('a', { href: `#/playground?adapter=${encodeURIComponent(a.id)}` }, 'Try it in the playground'),
          evalLogLoss !== null ? h('span', { id: 'adapter-eval' }, ` · eval log loss ${fmt(evalLogLoss)}`) : ''),
        files.length ? h('ul', { class: 'files' }, files.map((f) => h('li', {},
          downloadLink(`v1/adapters/${encodeURIComponent(a.id)}/files/${encodeURIComponent(f)}`, f, f)))) : null);
    }
    const log = h('ol', { class: 'log', id: 'event-log', 'aria-label': 'Event log' });
    const logNote = h('p', { class: 'muted' }, 'No events yet.');
    replace(main, head, summary,
      h('div', { class: 'grid' },
        h('section', { class: 'panel', 'aria-labelledby': 'h-loss', id: 'loss-panel' }, h('h2', { id: 'h-loss' }, 'Training loss'), lossChart.el),
        h('section', { class: 'panel', 'aria-labelledby': 'h-eval', id: 'eval-panel' }, h('h2', { id: 'h-eval' }, 'Evaluation'),
          h('h3', {}, 'Log loss'), evalChart.el, h('h3', {}, 'Accuracy'), accChart.el)),
      h('div', { class: 'grid' },
        h('section', { class: 'panel', 'aria-labelledby': 'h-ckpt' }, h('h2', { id: 'h-ckpt' }, 'Checkpoints'), ckpts, adapterBox),
        h('section', { class: 'panel', 'aria-labelledby': 'h-hyper' }, h('h2', { id: 'h-hyper' }, 'Hyperparameters'), hyper)),
      h('section', { class: 'panel', 'aria-labelledby': 'h-log' }, h('h2', { id: 'h-log' }, 'Event log'), logNote, log));

    // Keyed by step: a job resumed from a checkpoint repeats steps, the latest value wins.
    const trainByStep = new Map(), evalByStep = new Map();
    const seenEvents = new Set();
    let after = null;
    let lastJob = null;
    let ckptCount = -1;
    let renderedHead = '';

    function redrawCharts() {
      const train = [...trainByStep].sort((a, b) => a[0] - b[0]);
      const evals = [...evalByStep.values()].sort((a, b) => a.step - b.step);
      const raw = { name: 'loss', cls: 's1 raw', points: train.slice(), hideLegend: train.length > 20 };
      lossChart.set(train.length > 20 ? [raw, { name: 'loss (smoothed)', cls: 'smooth', points: ema(train, 0.15) }] : [{ ...raw, cls: 's1' }]);
      evalChart.set([{ name: 'log loss', cls: 's2', points: evals.map((e) => [e.step, e.log_loss]), markers: true }]);
      const acc = evals.filter((e) => e.accuracy !== null);
      const bal = evals.filter((e) => e.balanced_accuracy !== null);
      accChart.set([
        { name: 'accuracy', cls: 's3', points: acc.map((e) => [e.step, e.accuracy]), markers: true },
        ...(bal.length ? [{ name: 'balanced accuracy', cls: 's1', points: bal.map((e) => [e.step, e.balanced_accuracy]), markers: true }] : []),
      ]);
    }

    function renderJob(j) {
      lastJob = j;
      const st = job.status(j);
      const key = `${st}|${j.id}`;
      if (key !== renderedHead) {
        renderedHead = key;
        const cancel = !TERMINAL.has(st) ? h('button', { type: 'button', class: 'danger', id: 'cancel-job', onclick: () => cancelJob(j.id, cancel) }, 'Cancel job') : null;
        replace(head, pageHead(h('span', {}, 'Job ', h('span', { class: 'id' }, j.id)), null,
          statusBadge(st), cancel, h('a', { class: 'button', href: '#/jobs' }, 'All jobs')));
      }
      const m = job.metrics(j);
      const err = job.error(j);
      const ds = first(j.dataset_id, j.training_file, j.dataset);
      keepFocus(summary, () => replace(summary,
        progressBar(j, true),
        err ? h('div', { class: 'error-box', role: 'alert' }, h('strong', {}, st === 'failed' ? 'Failed: ' : 'Note: '), err) : null,
        j.status_reason || j.message ? h('p', { class: 'muted' }, first(j.status_reason, j.message)) : null,
        h('div', { class: 'stats' },
          stat('Step', job.total(j) ? `${job.step(j)} / ${job.total(j)}` : String(job.step(j))),
          stat('Epoch', fmt(job.epoch(j), 2)),
          stat('Elapsed', duration(job.elapsedMs(j))),
          stat('ETA', st === 'running' ? duration(job.etaMs(j)) : '—'),
          stat('Train loss', fmt(job.trainLoss(j))),
          stat('Eval log loss', fmt(job.evalLoss(j))),
          stat('Eval accuracy', pct(job.evalAccuracy(j))),
          stat('Attempt', j.attempt ?? '—')),
        h('dl', { class: 'kv', style: null },
          h('dt', {}, 'Dataset'), h('dd', {}, ds ? h('span', { class: 'id' }, ds) : '—'),
          j.validation_dataset_id ? [h('dt', {}, 'Validation dataset'), h('dd', { class: 'id' }, j.validation_dataset_id)] : null,
          j.validation_fraction !== undefined && j.validation_fraction !== null ? [h('dt', {}, 'Validation fraction'), h('dd', {}, String(j.validation_fraction))] : null,
          h('dt', {}, 'Base model'), h('dd', {}, first(j.base_model, j.model, '—')),
          j.adapter_id || j.fine_tuned_model ? [h('dt', {}, 'Adapter'), h('dd', {}, h('a', { href: `#/playground?adapter=${encodeURIComponent(first(j.adapter_id, j.fine_tuned_model))}` }, first(j.adapter_id, j.fine_tuned_model)))] : null,
          h('dt', {}, 'Created'), h('dd', {}, timeEl(job.created(j))),
          h('dt', {}, 'Started'), h('dd', {}, timeEl(job.started(j))),
          h('dt', {}, 'Finished'), h('dd', {}, timeEl(job.finished(j))))));
      summary.querySelector('dl').style.marginTop = '1rem';
      loadAdapter(first(j.adapter_id, j.fine_tuned_model));
      const hp = obj(first(j.hyperparameters, {}));
      replace(hyper, Object.keys(hp).length ? h('dl', { class: 'kv', id: 'hyperparameters' }, flatten(hp).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])) : h('p', { class: 'muted' }, 'Defaults.'));
      // Seed the curves from the job's latest metrics when the events hold none yet.
      void m;
    }
    function stat(k, v) { return h('div', { class: 'stat' }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, v)); }

    async function cancelJob(jobId, btn) {
      btn.disabled = true;
      btn.textContent = 'Cancelling…';
      try {
        const j = await api(`/v1/fine-tuning/jobs/${encodeURIComponent(jobId)}/cancel`, { method: 'POST' });
        if (j && j.id) renderJob(j);
      } catch (err) {
        btn.disabled = false;
        btn.textContent = 'Cancel job';
        summary.prepend(errorBox(err, 'Could not cancel'));
      }
    }

    // Events arrive in pages. Whether the server lists them oldest first (then `after` pages
    // forward) or newest first (then `after` pages back in time, as OpenAI's API does) is
    // detected from the first page; either way only unseen events are added, in time order.
    let newestFirst = null;
    let ingested = 0;
    function evCompare(a, b) {
      const na = num(first(a.seq, a.id)), nb = num(first(b.seq, b.id));
      if (na !== null && nb !== null) return na - nb;
      const ta = toDate(first(a.created_at, a.time)), tb = toDate(first(b.created_at, b.time));
      if (ta && tb && ta.getTime() !== tb.getTime()) return ta - tb;
      return String(first(a.id, '')).localeCompare(String(first(b.id, '')));
    }
    const evKey = (ev) => String(first(ev.id, ev.seq, JSON.stringify(ev)));
    /** Adds unseen events to the log and the charts, in time order. */
    function ingest(events) {
      const incoming = events.filter((ev) => !seenEvents.has(evKey(ev)));
      if (!incoming.length) return;
      ingested += incoming.length;
      const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      for (const ev of incoming) seenEvents.add(evKey(ev));
      incoming.sort(evCompare);
      for (const ev of incoming) {
        for (const p of pointsOf(ev)) {
          if (p.kind === 'train') trainByStep.set(p.step, p.loss);
          else evalByStep.set(p.step, p);
        }
        if (String(first(ev.type, ev.kind, '')) === 'checkpoint') ckptCount = -1; // refresh the table
        const lvl = String(first(ev.level, 'info')).toLowerCase();
        log.append(h('li', { class: `lvl-${lvl}` }, clockEl(first(ev.created_at, ev.time, ev.ts)), h('span', {}, eventText(ev))));
      }
      while (log.children.length > 1000) log.firstChild.remove();
      logNote.hidden = true;
      redrawCharts();
      if (nearBottom) log.scrollTop = log.scrollHeight;
    }

    async function loadEvents() {
      const incoming = [];
      let cursor = newestFirst ? null : after;
      for (let page = 0; page < 50; page++) {
        const q = new URLSearchParams({ limit: String(EVENTS_PAGE) });
        if (cursor !== null) q.set('after', cursor);
        const res = await api(`/v1/fine-tuning/jobs/${encodeURIComponent(id)}/events?${q}`);
        const evs = listOf(res);
        if (!evs.length) break;
        if (newestFirst === null && evs.length > 1) newestFirst = evCompare(evs[0], evs[evs.length - 1]) > 0;
        const fresh = evs.filter((ev) => !seenEvents.has(evKey(ev)));
        incoming.push(...fresh);
        const next = first(res && res.next_cursor, res && res.last_id, first(evs[evs.length - 1].id, evs[evs.length - 1].seq));
        if (!newestFirst) after = next;
        cursor = next;
        if (!(res && res.has_more) || fresh.length < evs.length) break;
      }
      ingest(incoming);
    }

    // Live events: the server's Server-Sent Events stream, read with fetch so the API key
    // header goes along (EventSource cannot send one). Polling takes over when the stream is
    // missing or breaks.
    let streaming = false;
    let streamFailed = false;
    const streamAbort = new AbortController();
    viewTimers.push(() => streamAbort.abort());
    async function follow() {
      streaming = true;
      let pending = [];
      let flush = null;
      try {
        const q = after !== null && after !== undefined ? `?after=${encodeURIComponent(after)}` : '';
        const res = await api(`/v1/fine-tuning/jobs/${encodeURIComponent(id)}/events/stream${q}`, { raw: true, headers: { Accept: 'text/event-stream' }, signal: streamAbort.signal });
        if (!String(res.headers.get('Content-Type')).startsWith('text/event-stream') || !res.body) throw new Error('not an event stream');
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let name = 'message', data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) name = line.slice(6).trim();
              else if (line.startsWith('data:')) data += (data ? '\n' : '') + line.slice(5).replace(/^ /, '');
            }
            if (name === 'end') { streaming = false; return; }
            if (!data) continue;
            try {
              const ev = JSON.parse(data);
              pending.push(ev);
              const evId = num(ev.id);
              if (evId !== null && (after === null || evId > after)) after = evId;
            } catch (_) { continue; }
            if (!flush) flush = setTimeout(() => { flush = null; const b = pending; pending = []; ingest(b); }, 150);
          }
        }
      } catch (err) {
        if (!streamAbort.signal.aborted) streamFailed = true;
      } finally {
        if (flush) { clearTimeout(flush); }
        ingest(pending);
        streaming = false;
      }
    }

    async function loadCheckpoints(force) {
      let res;
      try { res = await api(`/v1/fine-tuning/jobs/${encodeURIComponent(id)}/checkpoints`); } catch (err) {
        if (err.status === 404 || err.status === 405) { replace(ckpts, h('p', { class: 'muted' }, 'This server does not list checkpoints.')); return; }
        throw err;
      }
      const list = listOf(res);
      if (list.length === ckptCount && !force) return;
      ckptCount = list.length;
      if (!list.length) { replace(ckpts, h('p', { class: 'muted' }, 'No checkpoints yet.')); return; }
      list.sort((a, b) => (num(first(b.step, b.step_number)) ?? 0) - (num(first(a.step, a.step_number)) ?? 0));
      const urlOf = (c) => first(c.download_url, c.url, c.links && c.links.download);
      const downloads = list.some(urlOf);
      replace(ckpts, h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'checkpoints-table' },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col', class: 'num' }, 'Step'), h('th', { scope: 'col', class: 'num' }, 'Eval log loss'),
          h('th', { scope: 'col', class: 'num' }, 'Accuracy'), h('th', { scope: 'col' }, 'Created'), downloads ? h('th', { scope: 'col' }, 'Download') : null)),
        h('tbody', {}, list.map((c) => {
          const cm = obj(first(c.metrics, c.eval_metrics, {}));
          const url = urlOf(c);
          return h('tr', {},
            h('td', { 'data-label': 'Step', class: 'num' }, fmt(first(c.step, c.step_number))),
            h('td', { 'data-label': 'Eval log loss', class: 'num' }, fmt(first(cm.log_loss, cm.eval_log_loss))),
            h('td', { 'data-label': 'Accuracy', class: 'num' }, pct(first(cm.accuracy, cm.eval_accuracy))),
            h('td', { 'data-label': 'Created' }, timeEl(c.created_at)),
            !downloads ? null : h('td', { 'data-label': 'Download' }, url ? downloadLink(String(url), `checkpoint-step-${first(c.step, c.step_number, c.id)}`) : h('span', { class: 'muted' }, '—')));
        })))));
    }

    let finalPasses = 0;
    let ingestedAtLastPass = -1;
    poll(async () => {
      const j = await api(`/v1/fine-tuning/jobs/${encodeURIComponent(id)}`);
      renderJob(j);
      if (!streaming) {
        await loadEvents(); // catches up (and, after a stream ended, picks up the last words)
        if (!streamFailed && !TERMINAL.has(job.status(j))) follow();
      }
      await loadCheckpoints(false).catch(() => {});
      return j;
    }, (j, err) => {
      if (err) {
        if (err.status === 404 && !lastJob) { replace(main, pageHead('Job not found'), errorBox(err), h('p', {}, h('a', { href: '#/jobs' }, 'Back to jobs'))); return null; }
        summary.prepend(errorBox(err, 'Refresh failed'));
        setTimeout(() => summary.querySelector('.error-box') && summary.querySelector('.error-box').remove(), POLL_MS * 2);
        return err.status === 401 ? null : IDLE_POLL_MS;
      }
      if (TERMINAL.has(job.status(j))) {
        // A few passes after the end catch the runner's last events and checkpoints; stop once
        // a pass brings nothing new.
        const quiet = ingested === ingestedAtLastPass;
        ingestedAtLastPass = ingested;
        finalPasses += 1;
        if ((quiet && finalPasses > 1) || finalPasses > 5) return null;
        return POLL_MS;
      }
      return POLL_MS;
    });
  }

  // ---------------------------------------------------------------- view: new job

  const HP_FIELDS = [
    { name: 'epochs', label: 'Epochs', def: 1, step: 1, min: 1 },
    { name: 'batch_size', label: 'Batch size', def: 8, step: 1, min: 1 },
    { name: 'gradient_accumulation', label: 'Gradient accumulation', def: 1, step: 1, min: 1 },
    { name: 'learning_rate', label: 'Learning rate', def: 0.0001, step: 'any', min: 0 },
    { name: 'max_length', label: 'Max length (tokens)', def: 1024, step: 1, min: 16 },
    { name: 'lora.r', label: 'LoRA rank r', def: 16, step: 1, min: 1 },
    { name: 'lora.alpha', label: 'LoRA alpha', def: 8, step: 'any', min: 0 },
    { name: 'eval_every_steps', label: 'Evaluate every', def: 0, step: 1, min: 0, hint: 'steps; 0: at each epoch end' },
    { name: 'checkpoint_every_steps', label: 'Checkpoint every', def: 50, step: 1, min: 0, hint: 'steps; 0: at each epoch end' },
  ];
  const fieldId = (name) => `f-${name.replace(/[^a-z0-9_]+/gi, '-')}`;

  function viewNewJob(params) {
    const form = h('form', { class: 'panel', id: 'new-job-form', novalidate: true });
    replace(main, pageHead('New fine-tuning job', 'A LoRA adapter on the frozen base model, trained as a 3-class (A / B / tie) classifier.'), form);
    replace(form, h('p', { class: 'muted' }, 'Loading datasets…'));
    api('/v1/datasets?limit=100').then((res) => {
      const sets = listOf(res);
      if (!sets.length) {
        replace(form, h('div', { class: 'empty' }, h('strong', {}, 'No datasets yet.'), h('p', {}, 'A job trains on an uploaded dataset: ', h('a', { href: '#/datasets' }, 'upload one first'), '.')));
        return;
      }
      const pre = params.get('dataset');
      const opt = (d, sel) => h('option', { value: d.id, selected: sel && d.id === pre }, `${dataset.name(d) ? `${dataset.name(d)} · ` : ''}${shortId(d.id)} · ${fmt(dataset.rows(d))} rows`);
      const err = h('div', { id: 'new-job-error' });
      replace(form,
        h('fieldset', {}, h('legend', {}, 'Data'),
          h('div', { class: 'field-grid' },
            h('div', { class: 'field' }, h('label', { for: 'f-dataset_id' }, 'Training dataset'),
              h('select', { id: 'f-dataset_id', name: 'dataset_id', required: true, 'data-field': 'dataset_id' }, sets.map((d) => opt(d, true)))),
            h('div', { class: 'field' }, h('label', { for: 'f-validation_dataset_id' }, 'Validation dataset'),
              h('select', { id: 'f-validation_dataset_id', name: 'validation_dataset_id', 'data-field': 'validation_dataset_id' }, h('option', { value: '' }, 'none: hold out a fraction'), sets.map((d) => opt(d, false)))),
            h('div', { class: 'field' }, h('label', { for: 'f-validation_fraction' }, 'Validation fraction'),
              h('input', { id: 'f-validation_fraction', name: 'validation_fraction', type: 'number', step: 'any', min: 0, max: 0.9, value: '0.1', 'data-field': 'validation_fraction' }),
              h('span', { class: 'hint' }, 'Share of training rows held out'))),
          h('div', { class: 'field' }, h('label', { for: 'f-base_model' }, 'Base model ', h('span', { class: 'hint' }, 'optional; the server default when empty')),
            h('input', { id: 'f-base_model', name: 'base_model', type: 'text', 'data-field': 'base_model', autocomplete: 'off' }))),
        h('fieldset', {}, h('legend', {}, 'Hyperparameters'),
          h('div', { class: 'field-grid' }, HP_FIELDS.map((f) => h('div', { class: 'field' },
            h('label', { for: fieldId(f.name) }, f.label),
            h('input', { id: fieldId(f.name), name: f.name, type: 'number', step: f.step, min: f.min, value: String(f.def), required: true, 'data-field': `hyperparameters.${f.name}`, inputmode: f.step === 1 ? 'numeric' : 'decimal' }),
            f.hint ? h('span', { class: 'hint' }, f.hint) : null))),
          h('details', {}, h('summary', {}, 'More hyperparameters (JSON)'),
            h('div', { class: 'field' }, h('label', { for: 'f-extra' }, 'Merged over the fields above'),
              h('textarea', { id: 'f-extra', name: 'extra', spellcheck: 'false', 'data-field': 'hyperparameters', placeholder: '{"weight_decay": 0.01, "warmup_steps": 10, "lora": {"dropout": 0.05}, "class_weights": [1, 1, 1.5]}' })))),
        err,
        h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'submit-job' }, 'Start training'), h('a', { class: 'button', href: '#/jobs' }, 'Cancel')));
      form.addEventListener('submit', (e) => { e.preventDefault(); submitJob(form, err); });
      if (pre && sets.some((d) => d.id === pre)) form.querySelector('#f-dataset_id').value = pre;
    }).catch((err) => replace(form, errorBox(err, 'Could not load datasets')));
  }

  function setPath(obj, path, v) {
    const keys = path.split('.');
    let o = obj;
    for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
    o[keys[keys.length - 1]] = v;
  }
  function deepMerge(a, b) {
    for (const [k, v] of Object.entries(b)) {
      if (v && typeof v === 'object' && !Array.isArray(v) && a[k] && typeof a[k] === 'object') deepMerge(a[k], v);
      else a[k] = v;
    }
    return a;
  }
  /** [field, reason] pairs named by an error body: `error.field` and any list of `{field, reason}`. */
  function fieldErrors(err) {
    const d = (err && err.detail) || {};
    const out = [];
    for (const v of Object.values(d)) {
      if (!Array.isArray(v)) continue;
      for (const it of v) if (it && typeof it === 'object' && first(it.field, it.path)) out.push([String(first(it.field, it.path)), String(first(it.reason, it.message, err.message))]);
    }
    const f = first(d.field, d.path, d.param);
    if (f && !out.length) out.push([String(f), String(err.message).replace(`${f}: `, '')]);
    return out;
  }
  function clearFieldErrors(form) {
    for (const el of form.querySelectorAll('[aria-invalid="true"]')) { el.removeAttribute('aria-invalid'); el.removeAttribute('aria-describedby'); }
    for (const el of form.querySelectorAll('.field-error.inline')) el.remove();
  }
  function markField(form, field, message) {
    const names = [field, field.replace(/^hyperparameters\./, '')];
    const el = [...form.querySelectorAll('[data-field]')].find((x) => names.includes(x.dataset.field));
    if (!el) return false;
    const id = `${el.id}-err`;
    const existing = document.getElementById(id);
    if (existing) { if (!existing.textContent.includes(message)) existing.append(` ${message}`); return el; }
    el.setAttribute('aria-invalid', 'true');
    el.setAttribute('aria-describedby', id);
    el.closest('.field').append(h('p', { class: 'field-error inline', id }, message));
    return el;
  }

  async function submitJob(form, errSlot) {
    clearFieldErrors(form);
    replace(errSlot);
    const v = (name) => form.querySelector(`[name="${name}"]`).value.trim();
    const body = { dataset_id: v('dataset_id'), hyperparameters: {} };
    if (v('validation_dataset_id')) body.validation_dataset_id = v('validation_dataset_id');
    else if (v('validation_fraction') !== '') body.validation_fraction = Number(v('validation_fraction'));
    if (v('base_model')) body.base_model = v('base_model');
    let firstBad = null;
    for (const f of HP_FIELDS) {
      const raw = v(f.name);
      const n = Number(raw);
      if (raw === '' || !Number.isFinite(n)) { firstBad = firstBad || markField(form, `hyperparameters.${f.name}`, 'Enter a number.'); continue; }
      setPath(body.hyperparameters, f.name, n);
    }
    if (v('extra')) {
      try {
        const extra = JSON.parse(v('extra'));
        if (!extra || typeof extra !== 'object' || Array.isArray(extra)) throw new Error('not an object');
        deepMerge(body.hyperparameters, extra);
      } catch (e) {
        form.querySelector('details').open = true;
        firstBad = firstBad || markField(form, 'hyperparameters', `Not a JSON object: ${e.message}`);
      }
    }
    if (firstBad) { firstBad.focus(); return; }
    const btn = form.querySelector('#submit-job');
    btn.disabled = true;
    btn.textContent = 'Submitting…';
    try {
      const j = await api('/v1/fine-tuning/jobs', { method: 'POST', json: body });
      location.hash = `#/jobs/${encodeURIComponent(j.id)}`;
    } catch (err) {
      btn.disabled = false;
      btn.textContent = 'Start training';
      let firstEl = null;
      let named = fieldErrors(err);
      if (!named.length) {
        // No structured field: mark the form field the message names, longest name first.
        const names = [...form.querySelectorAll('[data-field]')].map((x) => x.dataset.field).sort((a, b) => b.length - a.length);
        const hit = names.find((n) => n.includes('.') && err.message.includes(n)) || names.find((n) => new RegExp(`\\b${n.replace(/^hyperparameters\./, '').replace(/\./g, '\\.')}\\b`).test(err.message));
        if (hit) named = [[hit, err.message]];
      }
      for (const [field, reason] of named) { const el = markField(form, field, reason); firstEl = firstEl || el; }
      replace(errSlot, errorBox(err, 'The job was not created'));
      (firstEl || btn).focus();
    }
  }

  // ---------------------------------------------------------------- view: datasets

  function viewDatasets() {
    const list = h('div', { class: 'panel', id: 'datasets-list' }, h('p', { class: 'muted' }, 'Loading datasets…'));
    const result = h('div', { id: 'upload-result', 'aria-live': 'polite' });
    const fileInput = h('input', { id: 'f-file', name: 'file', type: 'file', accept: '.csv,.jsonl,.json,text/csv,application/jsonl', required: true, 'aria-describedby': 'f-file-hint' });
    const form = h('form', { class: 'panel', id: 'upload-form', novalidate: true },
      h('h2', {}, 'Upload a dataset'),
      h('div', { class: 'field' }, h('label', { for: 'f-file' }, 'Arena CSV or JSONL file'), fileInput,
        h('span', { class: 'hint', id: 'f-file-hint' }, 'Columns id, prompt, response_a, response_b, winner_model_a, winner_model_b, winner_tie. The file is validated completely before anything is stored.')),
      result,
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'upload-button' }, 'Upload')));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      replace(result);
      fileInput.removeAttribute('aria-invalid');
      fileInput.setAttribute('aria-describedby', 'f-file-hint');
      const f = fileInput.files[0];
      if (!f) {
        fileInput.setAttribute('aria-invalid', 'true');
        replace(result, h('p', { class: 'field-error', id: 'f-file-err' }, 'Choose a file to upload.'));
        fileInput.setAttribute('aria-describedby', 'f-file-hint f-file-err');
        fileInput.focus();
        return;
      }
      const btn = form.querySelector('#upload-button');
      btn.disabled = true;
      btn.textContent = 'Uploading…';
      try {
        const fd = new FormData();
        fd.append('file', f, f.name);
        const d = await api('/v1/datasets', { method: 'POST', body: fd });
        const lc = dataset.labels(d);
        replace(result, h('div', { class: 'ok-box', id: 'upload-ok' }, h('strong', {}, 'Uploaded. '),
          `${fmt(dataset.rows(d))} rows kept`, dataset.dropped(d) ? `, ${dataset.dropped(d)} dropped (both responses empty)` : '',
          ` · A ${fmt(lc.winner_model_a)} · B ${fmt(lc.winner_model_b)} · tie ${fmt(lc.winner_tie)}. `,
          h('a', { href: `#/jobs/new?dataset=${encodeURIComponent(d.id)}` }, 'Train on it')));
        form.reset();
        refresh();
      } catch (err) {
        fileInput.setAttribute('aria-invalid', 'true');
        const box = errorBox(err, err.status === 413 ? 'File too large' : err.status === 422 || err.status === 400 ? 'The file was rejected' : 'Upload failed');
        box.id = 'upload-error';
        replace(result, box);
        fileInput.setAttribute('aria-describedby', 'f-file-hint upload-error');
      } finally {
        btn.disabled = false;
        btn.textContent = 'Upload';
      }
    });
    replace(main, pageHead('Datasets', 'Arena preference data: one row per prompt with two responses and the human verdict.'), form, list);

    async function refresh() {
      try {
        const res = await api('/v1/datasets?limit=100');
        renderDatasets(list, listOf(res), refresh);
        if (res && res.has_more) list.append(h('p', { class: 'muted' }, 'Showing the newest 100 datasets.'));
      } catch (err) { replace(list, errorBox(err, 'Could not load datasets')); }
    }
    refresh();
  }

  function labelBar(lc) {
    const a = num(lc.winner_model_a) || 0, b = num(lc.winner_model_b) || 0, t = num(lc.winner_tie) || 0;
    const total = a + b + t || 1;
    const seg = (n, cls) => { const sp = h('span', { class: cls }); sp.style.width = `${(n / total) * 100}%`; return sp; };
    const bar = h('div', { class: 'labelbar', 'aria-hidden': 'true' }, seg(a, 'a'), seg(b, 'b'), seg(t, 't'));
    return h('div', {}, h('span', { class: 'txt' }, `A ${a} · B ${b} · tie ${t}`), bar);
  }

  function renderDatasets(list, sets, refresh) {
    if (!sets.length) {
      replace(list, h('div', { class: 'empty' }, h('strong', {}, 'No datasets yet.'),
        h('p', {}, 'Upload one with the form above, or:'),
        curlBlock([`curl -s ${origin()}v1/datasets`, ...authHeaderLine(), '-F file=@train.csv'])));
      return;
    }
    replace(list, h('h2', {}, 'Uploaded datasets'), h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'datasets-table' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Dataset'), h('th', { scope: 'col', class: 'num' }, 'Rows'), h('th', { scope: 'col', class: 'num' }, 'Dropped'),
        h('th', { scope: 'col' }, 'Labels'), h('th', { scope: 'col' }, 'Created'), h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, sets.map((d) => {
        const del = h('button', { type: 'button', class: 'link-button', 'aria-label': `Delete dataset ${d.id}`, onclick: async () => {
          if (!window.confirm(`Delete dataset ${d.id}?`)) return;
          try { await api(`/v1/datasets/${encodeURIComponent(d.id)}`, { method: 'DELETE' }); refresh(); } catch (err) { list.prepend(errorBox(err, 'Not deleted')); }
        } }, 'Delete');
        return h('tr', { 'data-dataset-id': d.id },
          h('td', { 'data-label': 'Dataset' }, dataset.name(d) ? h('div', {}, dataset.name(d)) : null, h('span', { class: 'id', title: d.id }, shortId(d.id))),
          h('td', { 'data-label': 'Rows', class: 'num' }, fmt(dataset.rows(d))),
          h('td', { 'data-label': 'Dropped', class: 'num' }, fmt(dataset.dropped(d))),
          h('td', { 'data-label': 'Labels' }, labelBar(dataset.labels(d))),
          h('td', { 'data-label': 'Created' }, timeEl(d.created_at)),
          h('td', { 'data-label': 'Actions' }, h('a', { href: `#/jobs/new?dataset=${encodeURIComponent(d.id)}` }, 'Train'), ' ', del));
      })))));
  }

  // ---------------------------------------------------------------- view: playground

  function viewPlayground(params) {
    const form = h('form', { class: 'panel', id: 'playground-form', novalidate: true }, h('p', { class: 'muted' }, 'Loading adapters…'));
    const out = h('section', { class: 'panel', id: 'prediction', 'aria-live': 'polite', 'aria-labelledby': 'h-pred' },
      h('h2', { id: 'h-pred' }, 'Prediction'), h('p', { class: 'muted' }, 'Probabilities appear here.'));
    replace(main, pageHead('Playground', 'Which response would a person prefer? Probabilities for A, B and a tie from a trained adapter.'),
      h('div', { class: 'grid' }, form, out));
    api('/v1/adapters').then((res) => {
      const adapters = listOf(res);
      if (!adapters.length) {
        replace(form, h('div', { class: 'empty' }, h('strong', {}, 'No adapters yet.'),
          h('p', {}, 'A fine-tuning job that succeeds produces an adapter. ', h('a', { href: '#/jobs/new' }, 'Start a job'), ' and come back when it has finished.')));
        return;
      }
      const pre = params.get('adapter');
      const ta = (id, label, ph) => h('div', { class: 'field' }, h('label', { for: id }, label), h('textarea', { id, name: id.slice(2), required: true, placeholder: ph, 'data-field': id.slice(2) }));
      replace(form,
        h('div', { class: 'field' }, h('label', { for: 'f-adapter' }, 'Adapter'),
          h('select', { id: 'f-adapter', name: 'adapter', 'data-field': 'adapter' }, adapters.map((a) => {
            const aid = first(a.id, a.name);
            const label = [first(a.name, null), a.name ? null : shortId(aid), a.job_id ? `job ${shortId(a.job_id)}` : null, a.created_at ? when(a.created_at) : null, a.hot ? 'loaded' : null].filter(Boolean).join(' · ');
            return h('option', { value: aid, selected: pre && (pre === a.id || pre === a.name) }, label);
          }))),
        ta('f-prompt', 'Prompt', 'What is the capital of Australia?'),
        ta('f-response_a', 'Response A', 'Canberra.'),
        ta('f-response_b', 'Response B', 'Sydney is the capital of Australia.'),
        h('div', { class: 'field check' }, h('label', { for: 'f-symmetric' }, h('input', { id: 'f-symmetric', name: 'symmetric', type: 'checkbox', checked: true }), 'Symmetric: also score with A and B swapped and average')),
        h('div', { id: 'predict-error' }),
        h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'predict-button' }, 'Predict')));
      form.addEventListener('submit', (e) => { e.preventDefault(); predict(form, out); });
    }).catch((err) => replace(form, errorBox(err, 'Could not load adapters')));
  }

  function adapterLabel(a) {
    if (!a || typeof a !== 'object') return String(a);
    return a.name && a.name !== a.id ? `${a.name} (${shortId(a.id)})` : String(first(a.id, a.name));
  }

  async function predict(form, out) {
    clearFieldErrors(form);
    const errSlot = form.querySelector('#predict-error');
    replace(errSlot);
    const v = (n) => form.querySelector(`[name="${n}"]`).value;
    let bad = null;
    for (const n of ['prompt', 'response_a', 'response_b']) if (!v(n).trim()) bad = bad || markField(form, n, 'Required.');
    if (bad) { bad.focus(); return; }
    const btn = form.querySelector('#predict-button');
    btn.disabled = true;
    btn.textContent = 'Predicting…';
    const t0 = performance.now();
    try {
      const res = await api('/v1/predict', { method: 'POST', json: {
        adapter: v('adapter'), symmetric: form.querySelector('[name="symmetric"]').checked,
        pairs: [{ id: 'playground', prompt: v('prompt'), response_a: v('response_a'), response_b: v('response_b') }],
      } });
      const p = listOf(first(res && res.predictions, []))[0] || {};
      const probs = [['a', 'Response A', num(p.winner_model_a)], ['b', 'Response B', num(p.winner_model_b)], ['tie', 'Tie', num(p.winner_tie)]];
      const top = Math.max(...probs.map((x) => x[2] ?? -1));
      replace(out, h('h2', { id: 'h-pred' }, 'Prediction'),
        h('div', { class: 'probs', id: 'probs' }, probs.map(([cls, name, val]) => {
          const fill = h('span', {});
          fill.style.width = `${((val ?? 0) * 100).toFixed(1)}%`;
          return h('div', { class: `prob ${cls}${val === top ? ' winner' : ''}`, 'data-class': cls, 'data-prob': val },
            h('span', { class: 'name' }, name),
            h('div', { class: 'bar', role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round((val ?? 0) * 100), 'aria-label': name }, fill),
            h('span', { class: 'pct' }, pct(val)));
        })),
        h('p', { class: 'muted' }, `Adapter ${adapterLabel(first(res.adapter, v('adapter')))}`,
          res.usage && res.usage.tokens ? ` · ${res.usage.tokens} tokens` : '',
          ` · ${Math.round(performance.now() - t0)} ms`,
          p.truncated || (res.usage && res.usage.truncated) ? ' · text was truncated to fit the model' : ''));
    } catch (err) {
      for (const [field, reason] of fieldErrors(err)) markField(form, field.replace(/^pairs\[\d+\]\.|^pairs\.\d+\./, ''), reason);
      replace(errSlot, errorBox(err, err.status === 429 || err.status === 503 ? 'The predictor is busy, try again in a moment' : 'No prediction'));
    } finally {
      btn.disabled = false;
      btn.textContent = 'Predict';
    }
  }

  // ---------------------------------------------------------------- router

  function route() {
    const hash = location.hash || '#/jobs';
    if (!hash.startsWith('#/')) return; // in-page anchors such as the skip link
    stopView();
    const [path, query] = hash.slice(1).split('?');
    const params = new URLSearchParams(query || '');
    // a malformed escape (`#/jobs/%`) is kept as written rather than blanking the page
    const decode = (s) => { try { return decodeURIComponent(s); } catch (_) { return s; } };
    const parts = path.split('/').filter(Boolean).map(decode);
    const section = parts[0] || 'jobs';
    for (const a of document.querySelectorAll('[data-nav]')) {
      if (a.dataset.nav === section) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    const titles = { jobs: 'Jobs', datasets: 'Datasets', playground: 'Playground' };
    document.title = `${titles[section] || 'Arbiter'} · Arbiter`;
    if (section === 'jobs' && parts[1] === 'new') viewNewJob(params);
    else if (section === 'jobs' && parts[1]) { document.title = `Job ${shortId(parts[1])} · Arbiter`; viewJob(parts[1]); }
    else if (section === 'datasets') viewDatasets();
    else if (section === 'playground') viewPlayground(params);
    else viewJobs(params);
    if (routedOnce) focusMain();
    routedOnce = true;
  }
  let routedOnce = false;
  window.addEventListener('hashchange', route);
  document.getElementById('skip').addEventListener('click', (e) => { e.preventDefault(); main.focus(); });
  route();
})();

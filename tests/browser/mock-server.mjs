// A stand-in for the Arbiter API, for working on the dashboard without a model or a build:
// it serves the dashboard files straight from src/http/dashboard/ and fakes the /v1 endpoints
// (a job "trains" one step every 400 ms). With MOCK_API_KEY set, every /v1 call needs
// `Authorization: Bearer $MOCK_API_KEY`, like the server with auth on.
//
//   node tests/browser/mock-server.mjs [port]        then open http://127.0.0.1:port/
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const assets = path.join(here, '../../src/http/dashboard');
const KEY = process.env.MOCK_API_KEY || '';
const now = () => new Date().toISOString();

const datasets = [];
const jobs = [];
const events = new Map();
const checkpoints = new Map();
const adapters = [];

// The same policy src/http/dashboard.rs sends, so a violation shows up here too.
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";
function send(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-cache', ...(type.startsWith('text/html') ? { 'Content-Security-Policy': CSP } : {}) });
  res.end(type === 'application/json' ? JSON.stringify(body) : body);
}
const fail = (res, status, code, message, extra = {}) => send(res, status, { error: { code, message, ...extra } });

function parseCsvUpload(raw) {
  const m = raw.match(/\r\n\r\n([\s\S]*?)\r\n--/);
  const text = m ? m[1] : raw;
  const lines = text.split(/\r?\n/).filter((l) => l.trim());
  const header = (lines[0] || '').split(',').map((s) => s.trim());
  for (const col of ['prompt', 'response_a', 'response_b', 'winner_model_a', 'winner_model_b', 'winner_tie']) {
    if (!header.includes(col)) return { error: { code: 'missing_column', message: `missing column "${col}"`, errors: [{ row: 1, column: col, reason: 'column is missing from the header' }] } };
  }
  return { rows: Math.max(0, lines.length - 1) };
}

function tick(j) {
  if (j.status === 'queued') { j.status = 'running'; j.started_at = now(); }
  if (j.status !== 'running') return;
  j.progress.step += 1;
  const s = j.progress.step;
  const loss = 1.1 * Math.exp(-s / 30) + 0.35 + 0.08 * Math.sin(s * 1.7);
  j.metrics.train_loss = loss;
  const ev = events.get(j.id);
  ev.push({ id: ev.length + 1, created_at: now(), level: 'info', type: 'train_step', message: `step ${s}/${j.progress.total_steps} loss ${loss.toFixed(4)}`, data: { step: s, loss, learning_rate: 1e-4 } });
  if (s % 5 === 0) {
    const m = { log_loss: 1.05 - s * 0.004, accuracy: 0.4 + s * 0.003, balanced_accuracy: 0.38 + s * 0.003, rows: 20 };
    j.metrics.eval_log_loss = m.log_loss;
    j.metrics.eval_accuracy = m.accuracy;
    ev.push({ id: ev.length + 1, created_at: now(), level: 'info', type: 'eval', message: `eval at step ${s}: log loss ${m.log_loss.toFixed(4)}`, data: { step: s, ...m } });
  }
  if (s % 10 === 0) {
    checkpoints.get(j.id).push({ id: `ckpt-${s}`, step: s, created_at: now(), metrics: { log_loss: j.metrics.eval_log_loss, accuracy: j.metrics.eval_accuracy }, download_url: `/v1/fine-tuning/jobs/${j.id}/checkpoints/ckpt-${s}/download` });
  }
  if (s >= j.progress.total_steps) {
    j.status = 'succeeded'; j.finished_at = now();
    // as the service's trainer reports them: the best evaluation under `best_eval`
    const best_eval = { log_loss: j.metrics.eval_log_loss, accuracy: j.metrics.eval_accuracy };
    const a = { id: `adapter-${j.id.slice(0, 8)}`, name: `arena-${j.id.slice(0, 4)}`, job_id: j.id, created_at: now(), metrics: { best_eval } };
    adapters.unshift(a);
    j.adapter_id = a.id;
    clearInterval(j.timer);
  }
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname;
  if (req.method === 'GET' && p === '/') return send(res, 200, readFileSync(path.join(assets, 'index.html')), 'text/html; charset=utf-8');
  if (req.method === 'GET' && p === '/assets/app.js') return send(res, 200, readFileSync(path.join(assets, 'app.js')), 'text/javascript');
  if (req.method === 'GET' && p === '/assets/app.css') return send(res, 200, readFileSync(path.join(assets, 'app.css')), 'text/css');
  if (!p.startsWith('/v1/')) return fail(res, 404, 'not_found', 'no such route');
  if (KEY && req.headers.authorization !== `Bearer ${KEY}`) return fail(res, 401, 'unauthorized', 'missing or invalid API key');
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const raw = Buffer.concat(chunks).toString('utf8');
  let m;
  if (p === '/v1/datasets' && req.method === 'GET') return send(res, 200, { data: datasets });
  if (p === '/v1/datasets' && req.method === 'POST') {
    const r = parseCsvUpload(raw);
    if (r.error) return send(res, 422, { error: r.error });
    const d = { id: randomUUID(), rows: r.rows, dropped_rows: 0, label_counts: { winner_model_a: Math.ceil(r.rows * 0.35), winner_model_b: Math.ceil(r.rows * 0.34), winner_tie: r.rows - Math.ceil(r.rows * 0.35) - Math.ceil(r.rows * 0.34) }, created_at: now() };
    datasets.unshift(d);
    return send(res, 201, d);
  }
  if (p === '/v1/fine-tuning/jobs' && req.method === 'GET') return send(res, 200, { data: jobs.map(({ timer, ...j }) => j), has_more: false });
  if (p === '/v1/fine-tuning/jobs' && req.method === 'POST') {
    const b = JSON.parse(raw || '{}');
    if (!datasets.some((d) => d.id === b.dataset_id)) return fail(res, 404, 'not_found', `dataset ${b.dataset_id} not found`, { field: 'dataset_id' });
    const bs = b.hyperparameters?.batch_size;
    if (bs !== undefined && (bs < 1 || bs > 1024)) return fail(res, 422, 'invalid_hyperparameters', `must be between 1 and 1024, got ${bs}`, { field: 'hyperparameters.batch_size' });
    const j = { id: randomUUID(), status: 'queued', dataset_id: b.dataset_id, validation_fraction: b.validation_fraction ?? 0.1, base_model: 'models/SmolLM2-135M-Instruct.Q4_1.gguf', hyperparameters: b.hyperparameters || {}, progress: { step: 0, total_steps: 60, epoch: 0 }, metrics: {}, attempt: 1, created_at: now(), started_at: null, finished_at: null, error: null };
    jobs.unshift(j); events.set(j.id, []); checkpoints.set(j.id, []);
    j.timer = setInterval(() => tick(j), 400);
    return send(res, 201, { ...j, timer: undefined });
  }
  if ((m = p.match(/^\/v1\/fine-tuning\/jobs\/([^/]+)(\/.*)?$/))) {
    const j = jobs.find((x) => x.id === m[1]);
    if (!j) return fail(res, 404, 'not_found', `job ${m[1]} not found`);
    const { timer, ...pub } = j;
    if (!m[2]) return send(res, 200, pub);
    if (m[2] === '/cancel') {
      if (['succeeded', 'failed', 'cancelled'].includes(j.status)) return fail(res, 409, 'conflict', `job is already ${j.status}`);
      j.status = 'cancelled'; j.finished_at = now(); clearInterval(timer);
      events.get(j.id).push({ id: events.get(j.id).length + 1, created_at: now(), level: 'warn', type: 'status', message: 'cancelled by request' });
      return send(res, 200, { ...pub, status: 'cancelled', finished_at: j.finished_at });
    }
    if (m[2] === '/events/stream' && process.env.MOCK_NO_STREAM !== '1') {
      res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
      let after = Number(url.searchParams.get('after') || req.headers['last-event-id'] || 0);
      const pump = () => {
        for (const e of events.get(j.id).filter((x) => x.id > after)) {
          res.write(`id: ${e.id}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`);
          after = e.id;
        }
        if (['succeeded', 'failed', 'cancelled'].includes(j.status)) {
          res.end(`event: end\ndata: {"status":"${j.status}"}\n\n`);
          clearInterval(t);
        }
      };
      const t = setInterval(pump, 300);
      req.on('close', () => clearInterval(t));
      return pump();
    }
    if (m[2] === '/events') {
      // MOCK_NEWEST_FIRST=1 pages like OpenAI's API: newest first, `after` goes back in time.
      const all = events.get(j.id);
      const limit = Number(url.searchParams.get('limit') || 20);
      const after = url.searchParams.get('after');
      if (process.env.MOCK_NEWEST_FIRST === '1') {
        const older = all.filter((e) => after === null || e.id < Number(after)).reverse();
        return send(res, 200, { data: older.slice(0, limit), has_more: older.length > limit });
      }
      const ev = all.filter((e) => e.id > Number(after || 0));
      return send(res, 200, { data: ev.slice(0, limit), has_more: ev.length > limit });
    }
    if (m[2] === '/checkpoints') return send(res, 200, { data: checkpoints.get(j.id).slice().reverse() });
    const dl = m[2].match(/^\/checkpoints\/([^/]+)\/download$/);
    if (dl) {
      res.writeHead(200, { 'Content-Type': 'application/gzip', 'Content-Disposition': `attachment; filename="${j.id}-${dl[1]}.tar.gz"` });
      return res.end(Buffer.from('not really a tarball'));
    }
  }
  if (p === '/v1/adapters') return send(res, 200, { data: adapters });
  if ((m = p.match(/^\/v1\/adapters\/([^/]+)(?:\/files\/([^/]+))?$/))) {
    const a = adapters.find((x) => x.id === m[1]);
    if (!a) return fail(res, 404, 'not_found', `adapter ${m[1]} not found`);
    if (!m[2]) return send(res, 200, { ...a, files: ['adapter_config.json', 'adapter_model.safetensors', 'arbiter.json'] });
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Disposition': `attachment; filename="${m[2]}"` });
    return res.end('{}');
  }
  if (p === '/v1/predict' && req.method === 'POST') {
    const b = JSON.parse(raw || '{}');
    if (!adapters.some((a) => a.id === b.adapter)) return fail(res, 404, 'not_found', `adapter ${b.adapter} not found`, { field: 'adapter' });
    return send(res, 200, { adapter: { id: b.adapter, name: adapters.find((a) => a.id === b.adapter).name }, predictions: b.pairs.map((x) => ({ id: x.id, winner_model_a: 0.52, winner_model_b: 0.31, winner_tie: 0.17 })), usage: { tokens: 57 } });
  }
  return fail(res, 404, 'not_found', 'no such route');
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`mock API on http://127.0.0.1:${server.address().port}/`);
});

// End-to-end test of the dashboard in headless Chromium, against the real server binary.
//
//   tests/browser/run.sh                        (installs what it needs, builds, runs this)
//   node --test tests/browser/dashboard.spec.mjs
//
// Environment:
//   ARBITER_BIN      server binary (default target/debug/arbiter)
//   ARBITER_URL      use a server that is already running instead of starting one
//   ARBITER_MODEL    base model for the worker (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
//   ARENA_CSV        arena sample (default ../shared/data/arena-sample.csv from the repo root)
//   CHROMIUM         browser binary (default /usr/bin/chromium)
//   MOCK=1           run against tests/browser/mock-server.mjs instead (page work without a model)
//   TRAIN_TIMEOUT_S  how long a job may take to finish (default 420)
//
// Screenshots go to tests/artifacts/ (git-ignored).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const artifacts = path.join(root, 'tests/artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TRAIN_TIMEOUT_MS = Number(process.env.TRAIN_TIMEOUT_S || 420) * 1000;
const API_KEY = 'dashboard-test-key';
const CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}]`, ...a);

// ------------------------------------------------------------------ data

/** Split CSV text into records, honouring quoted fields with commas, quotes and newlines. */
function csvRecords(text) {
  const out = [];
  let start = 0, quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') quoted = !quoted;
    else if (c === '\n' && !quoted) { out.push(text.slice(start, i).replace(/\r$/, '')); start = i + 1; }
  }
  if (start < text.length && text.slice(start).trim()) out.push(text.slice(start));
  return out;
}

function arenaSlice(rows) {
  const file = process.env.ARENA_CSV || path.resolve(root, '../shared/data/arena-sample.csv');
  const recs = csvRecords(readFileSync(file, 'utf8'));
  // Shortest rows first keeps each step fast; max_length truncates anyway.
  const body = recs.slice(1).filter((r) => r.length < 1500).slice(0, rows);
  assert.equal(body.length, rows, `arena sample ${file} has ${rows} short rows`);
  return `${recs[0]}\n${body.join('\n')}\n`;
}

// ------------------------------------------------------------------ server

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

let server = null;
let serverLog = '';
let baseUrl = process.env.ARBITER_URL || '';
let dataDir = null;
let mock = process.env.MOCK === '1';

async function startServer() {
  if (baseUrl) return;
  const port = await freePort();
  baseUrl = `http://127.0.0.1:${port}`;
  let cmd, args;
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info', NO_COLOR: '1' };
  if (mock) {
    cmd = process.execPath;
    args = [path.join(here, 'mock-server.mjs'), String(port)];
    env.MOCK_API_KEY = API_KEY;
  } else {
    dataDir = mkdtempSync(path.join(tmpdir(), 'arbiter-dash-'));
    cmd = process.env.ARBITER_BIN || path.join(root, 'target/debug/arbiter');
    assert.ok(existsSync(cmd), `server binary ${cmd} exists (cargo build)`);
    args = ['serve', '--addr', `127.0.0.1:${port}`, '--data-dir', dataDir];
    env.ARBITER_MODEL = process.env.ARBITER_MODEL || path.join(root, 'models/SmolLM2-135M-Instruct.Q4_1.gguf');
    env.ARBITER_API_KEYS = `admin:${API_KEY}`; // auth on: the page must ask for the key and send it
  }
  log(`starting ${path.relative(root, cmd) || cmd} ${args.join(' ')}`);
  server = spawn(cmd, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const keep = (d) => { serverLog = (serverLog + d.toString()).slice(-20000); };
  server.stdout.on('data', keep);
  server.stderr.on('data', keep);
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    if (server.exitCode !== null) throw new Error(`server exited with ${server.exitCode}:\n${serverLog}`);
    try { const r = await fetch(`${baseUrl}/`); if (r.ok) return; } catch (_) { /* not yet */ }
    await sleep(200);
  }
  throw new Error(`server did not answer on ${baseUrl} within 60 s:\n${serverLog}`);
}

/** Direct API call, as a script would (used only to check what the page showed). */
async function apiGet(p) {
  const r = await fetch(`${baseUrl}${p}`, { headers: { Authorization: `Bearer ${API_KEY}` } });
  return { status: r.status, body: await r.json().catch(() => null) };
}

// ------------------------------------------------------------------ browser

let context = null;
let page = null;
let profile = null;
const problems = [];
const requests = { stream: 0, eventPolls: 0 };
let shot = 0;

async function screenshot(name) {
  shot += 1;
  const file = path.join(artifacts, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.evaluate(() => window.scrollTo(0, 0)); // the sticky header belongs at the top
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${path.relative(root, file)}`);
}

async function go(hash) {
  await page.goto(`${baseUrl}/${hash}`);
  await page.waitForSelector('main h1');
}

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  await startServer();
  profile = mkdtempSync(path.join(tmpdir(), 'arbiter-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: CHROME_ARGS, viewport: { width: 1280, height: 900 },
  });
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(20_000);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // Failed requests the test provokes on purpose (401 before the key, 4xx on bad input) are fine.
    if (m.type() === 'error' && !/status of (401|404|409|413|422)/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('requestfailed', (r) => { if (!r.url().startsWith(baseUrl)) problems.push(`off-origin request: ${r.url()}`); });
  page.on('request', (r) => { if (r.url().includes('/events/stream')) requests.stream += 1; else if (/\/events\?/.test(r.url())) requests.eventPolls += 1; });
  page.on('request', (r) => { if (!r.url().startsWith(baseUrl) && !r.url().startsWith('data:')) problems.push(`off-origin request: ${r.url()}`); });
});

after(async () => {
  if (context) await context.close().catch(() => {});
  if (server && server.exitCode === null) {
    server.kill('SIGTERM');
    await Promise.race([new Promise((r) => server.once('exit', r)), sleep(10_000)]);
    if (server.exitCode === null) server.kill('SIGKILL');
  }
  if (profile) rmSync(profile, { recursive: true, force: true });
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ the walk-through

test('dashboard end to end', { timeout: TRAIN_TIMEOUT_MS * 2 + 180_000 }, async (t) => {
  let datasetId = null;
  let jobId = null;
  // Each step builds on the one before: after a failure the rest are skipped, not piled up.
  let broken = null;
  const step = (name, fn) => t.test(name, { skip: broken ? `after "${broken}" failed` : false }, async (st) => {
    try { await fn(st); } catch (e) {
      broken = name;
      await screenshot('failure').catch(() => {});
      throw e;
    }
  });

  await step('assets are served with types and cache headers, and the page loads', async () => {
    const r = await fetch(`${baseUrl}/`);
    assert.match(r.headers.get('content-type'), /^text\/html/);
    const html = await r.text();
    const js = html.match(/src="(assets\/app\.js[^"]*)"/)[1];
    const a = await fetch(`${baseUrl}/${js}`);
    assert.equal(a.status, 200);
    assert.match(a.headers.get('content-type'), /javascript/);
    assert.ok(a.headers.get('cache-control'), 'assets carry Cache-Control');
    await page.goto(`${baseUrl}/`);
    await page.waitForSelector('main h1');
  });

  await step('the API key is asked once when the server wants one, then sent', async (st) => {
    const probe = await fetch(`${baseUrl}/v1/fine-tuning/jobs`);
    if (!process.env.ARBITER_URL) {
      assert.equal(probe.status, 401, 'the server started here has API keys: /v1 without one is 401');
    }
    if (probe.status !== 401) {
      st.diagnostic('server answers /v1 without a key: auth is off, the key dialog is not exercised here (MOCK=1 exercises it)');
      return;
    }
    const dialog = page.locator('#key-dialog');
    await dialog.waitFor({ state: 'visible' });
    await screenshot('api-key');
    await page.locator('#key-input').fill('wrong-key');
    await page.locator('#key-form button[type=submit]').click();
    await page.locator('#key-error').waitFor({ state: 'visible' }); // rejected: asked again, once
    await page.locator('#key-input').fill(API_KEY);
    await page.keyboard.press('Enter');
    await dialog.waitFor({ state: 'hidden' });
    assert.equal(await page.evaluate(() => localStorage.getItem('arbiter.apiKey')), API_KEY);
    await page.reload();
    await page.waitForSelector('main h1');
    assert.equal(await dialog.isVisible(), false, 'a stored key is not asked again');
  });

  await step('empty jobs list shows how to start', async () => {
    await go('#/jobs');
    const empty = page.locator('main .empty');
    await empty.waitFor();
    assert.match(await empty.innerText(), /No jobs yet/);
    assert.match(await empty.innerText(), /curl .*\/v1\/fine-tuning\/jobs/);
    // with a key stored, the snippet sends it from the shell's variable (double quotes expand it)
    assert.match(await empty.innerText(), /-H "Authorization: Bearer \$ARBITER_API_KEY"/);
    await screenshot('jobs-empty');
  });

  await step('an invalid upload shows the API error inline', async () => {
    await go('#/datasets');
    await page.locator('#upload-form').waitFor();
    // No file chosen: the page says so itself.
    await page.locator('#upload-button').click();
    await page.locator('#f-file-err').waitFor();
    // A CSV without the verdict columns: the server's 422 is shown under the file input.
    await page.locator('#f-file').setInputFiles({ name: 'broken.csv', mimeType: 'text/csv',
      buffer: Buffer.from('id,prompt,response_a,response_b\n1,"[""hi""]","[""a""]","[""b""]"\n') });
    await page.locator('#upload-button').click();
    const err = page.locator('#upload-error');
    await err.waitFor();
    const text = await err.innerText();
    assert.match(text, /winner_model_a|winner_tie|column/i, `error names the column: ${text}`);
    assert.equal(await page.locator('#f-file').getAttribute('aria-invalid'), 'true');
    await screenshot('dataset-invalid');
  });

  await step('a valid upload reports rows and label counts and is listed', async () => {
    const csv = arenaSlice(24);
    await page.locator('#f-file').setInputFiles({ name: 'arena-slice.csv', mimeType: 'text/csv', buffer: Buffer.from(csv) });
    await page.locator('#upload-button').click();
    const ok = page.locator('#upload-ok');
    await ok.waitFor();
    assert.match(await ok.innerText(), /24 rows kept/);
    const row = page.locator('#datasets-table tbody tr').first();
    await row.waitFor();
    datasetId = await row.getAttribute('data-dataset-id');
    assert.ok(datasetId);
    const { body } = await apiGet(`/v1/datasets/${datasetId}`);
    if (body && body.label_counts) {
      const lc = body.label_counts;
      assert.match(await row.innerText(), new RegExp(`A ${lc.winner_model_a} · B ${lc.winner_model_b} · tie ${lc.winner_tie}`));
    }
    await screenshot('datasets');
  });

  await step('a bad hyperparameter is named next to its field', async () => {
    await go(`#/jobs/new?dataset=${encodeURIComponent(datasetId)}`);
    await page.locator('#new-job-form select#f-dataset_id').waitFor();
    assert.equal(await page.locator('#f-dataset_id').inputValue(), datasetId);
    await page.locator('#f-batch_size').fill('0');
    await page.locator('#submit-job').click();
    await page.locator('#new-job-error .error-box').waitFor();
    assert.equal(await page.locator('#f-batch_size').getAttribute('aria-invalid'), 'true', 'the field named by the 422 is marked');
    await screenshot('new-job-invalid');
  });

  await step('submitting a job opens its page; progress and the loss chart move', async () => {
    const hp = { '#f-epochs': '1', '#f-batch_size': '2', '#f-max_length': '64', '#f-eval_every_steps': '3', '#f-checkpoint_every_steps': '4', '#f-validation_fraction': '0.25' };
    for (const [sel, v] of Object.entries(hp)) await page.locator(sel).fill(v);
    await page.locator('#submit-job').click();
    await page.waitForURL((u) => /^#\/jobs\/(?!new)[^/?]+$/.test(u.hash));
    jobId = decodeURIComponent(page.url().split('#/jobs/')[1]);
    log(`job ${jobId}`);
    await page.locator('#hyperparameters').waitFor();
    assert.match(await page.locator('#hyperparameters').innerText(), /max_length\s+64/);

    const progress = page.locator('#job-summary [role=progressbar]');
    const seen = new Set();
    let points = 0;
    const deadline = Date.now() + TRAIN_TIMEOUT_MS;
    let status = '';
    let shotRunning = false;
    while (Date.now() < deadline) {
      const now = Number(await progress.getAttribute('aria-valuenow'));
      seen.add(now);
      const label = (await page.locator('#loss-panel svg').getAttribute('aria-label')) || '';
      points = Number(label.match(/(\d+) points/)?.[1] || 0);
      status = await page.locator('main .page-head .status').first().getAttribute('data-status');
      if (!shotRunning && status === 'running' && points >= 2) {
        await screenshot('job-running');
        await go('#/jobs');
        await page.locator('#jobs-table').waitFor();
        await screenshot('jobs-running');
        // The table refreshes every 2 s; keyboard focus stays on the job link through it.
        const href = `#/jobs/${encodeURIComponent(jobId)}`;
        await page.locator(`#jobs-table a[href="${href}"]`).focus();
        await sleep(2600);
        assert.equal(await page.evaluate(() => document.activeElement.getAttribute('href')), href, 'focus survives a refresh');
        await page.setViewportSize({ width: 390, height: 844 });
        await screenshot('phone-jobs');
        await go(`#/jobs/${encodeURIComponent(jobId)}`);
        await page.locator('#loss-panel svg').waitFor();
        await screenshot('phone-job');
        await page.setViewportSize({ width: 1280, height: 900 });
        shotRunning = true;
      }
      if (['succeeded', 'failed', 'cancelled'].includes(status)) break;
      await sleep(1000);
    }
    const summary = await page.locator('#job-summary').innerText();
    if (status === 'queued' && seen.size === 1) {
      assert.fail(`the job never started within ${TRAIN_TIMEOUT_MS / 1000} s; the page says:\n${summary}\nserver log tail:\n${serverLog.slice(-3000)}`);
    }
    assert.ok(seen.size >= 3, `progress bar took several values (saw ${[...seen].join(', ')})`);
    assert.ok(points >= 2, `loss chart gained points (${points})`);
    assert.equal(status, 'succeeded', `job finished: ${summary}`);
    // Final state: bar full, evaluation drawn, checkpoints listed with download links.
    await page.waitForFunction(() => !document.querySelector('#cancel-job'));
    const total = Number(await progress.getAttribute('aria-valuemax'));
    assert.equal(Number(await progress.getAttribute('aria-valuenow')), total);
    // Every step's loss is an event: the chart holds exactly one point per step.
    await page.waitForFunction((n) => (document.querySelector('#loss-panel svg')?.getAttribute('aria-label') || '').includes(`loss: ${n} points`)
      || (document.querySelector('#loss-panel svg')?.getAttribute('aria-label') || '').includes(`loss (smoothed): ${n} points`), total);
    const evalLabel = await page.locator('#eval-panel svg').first().getAttribute('aria-label');
    assert.match(evalLabel, /\d+ points/, `eval chart has points: ${evalLabel}`);
    assert.ok(await page.locator('#event-log li').count() >= 3, 'event log filled');
    if (await page.locator('#checkpoints-table').count()) {
      assert.ok(await page.locator('#checkpoints-table tbody tr').count() >= 1);
      const link = page.locator('#checkpoints-table a', { hasText: 'Download' }).first();
      if (await link.count()) {
        const [download] = await Promise.all([page.waitForEvent('download'), link.click()]);
        const file = path.join(artifacts, 'checkpoint-download');
        await download.saveAs(file);
        assert.ok(readFileSync(file).length > 0, `checkpoint ${download.suggestedFilename()} downloaded`);
        rmSync(file);
      }
    }
    // The trained adapter's files can be downloaded from the job page.
    const adapterLink = page.locator('#adapter-files a[download]').first();
    await adapterLink.waitFor();
    const [adapterFile] = await Promise.all([page.waitForEvent('download'), adapterLink.click()]);
    assert.ok(adapterFile.suggestedFilename(), 'adapter file downloaded');
    // its best evaluation is shown beside it
    assert.match(await page.locator('#adapter-eval').innerText(), /eval log loss \d/);
    await screenshot('job-succeeded');
    log(`event stream requests: ${requests.stream}, event page requests: ${requests.eventPolls}`);
  });

  await step('a running job can be cancelled from its page', async () => {
    await go(`#/jobs/new?dataset=${encodeURIComponent(datasetId)}`);
    await page.locator('#f-batch_size').fill('2');
    await page.locator('#f-max_length').fill('64');
    await page.locator('#f-epochs').fill('3');
    await page.locator('#submit-job').click();
    await page.waitForURL((u) => /^#\/jobs\/(?!new)[^/?]+$/.test(u.hash));
    const second = decodeURIComponent(page.url().split('#/jobs/')[1]);
    assert.notEqual(second, jobId);
    // Wait for at least one step so the cancel hits a running job, then cancel.
    await page.waitForFunction(() => Number(document.querySelector('#job-summary [role=progressbar]')?.getAttribute('aria-valuenow')) >= 1, null, { timeout: TRAIN_TIMEOUT_MS });
    await page.locator('#cancel-job').click();
    await page.waitForFunction(() => document.querySelector('main .page-head .status')?.dataset.status === 'cancelled', null, { timeout: 60_000 });
    const { body } = await apiGet(`/v1/fine-tuning/jobs/${second}`);
    assert.equal(body.status, 'cancelled');
    // The cancellation itself reaches the event log (stream or final polls).
    await page.waitForFunction(() => /cancel/i.test(document.querySelector('#event-log')?.textContent || ''), null, { timeout: 30_000 });
    await screenshot('job-cancelled');
    await go('#/jobs');
    await page.locator(`#jobs-table tr[data-job-id="${second}"][data-status="cancelled"]`).waitFor();
    await page.locator(`#jobs-table tr[data-job-id="${jobId}"][data-status="succeeded"]`).waitFor();
  });

  await step('the playground shows A/B/tie probabilities from the new adapter', async () => {
    await go('#/playground');
    const select = page.locator('#f-adapter');
    await select.waitFor();
    assert.ok(await select.locator('option').count() >= 1, 'the finished job produced an adapter');
    await page.locator('#f-prompt').fill('What is the capital of Australia?');
    await page.locator('#f-response_a').fill('Canberra is the capital of Australia.');
    await page.locator('#f-response_b').fill('Sydney.');
    await page.locator('#predict-button').click();
    await page.locator('#probs').waitFor({ timeout: 120_000 });
    const probs = await page.locator('#probs .prob').evaluateAll((els) => els.map((e) => Number(e.dataset.prob)));
    assert.equal(probs.length, 3);
    assert.ok(probs.every((p) => p >= 0 && p <= 1), `probabilities in [0, 1]: ${probs}`);
    assert.ok(Math.abs(probs.reduce((a, b) => a + b, 0) - 1) < 1e-3, `probabilities sum to 1: ${probs}`);
    await screenshot('playground');
    await page.setViewportSize({ width: 390, height: 844 });
    await screenshot('phone-playground');
    await page.setViewportSize({ width: 1280, height: 900 });
    await page.emulateMedia({ colorScheme: 'dark' });
    await go(`#/jobs/${encodeURIComponent(jobId)}`);
    await page.locator('#event-log li').first().waitFor();
    await screenshot('dark-job');
    await page.emulateMedia({ colorScheme: 'light' });
  });

  await step('a malformed link still draws a page', async () => {
    await go('#/jobs/%'); // decodeURIComponent throws on it
    assert.match(await page.locator('main').innerText(), /Job/);
  });

  await step('keyboard: the navigation and forms are reachable with Tab, focus is visible', async () => {
    await go('#/datasets');
    await page.reload(); // focus starts at the top of a freshly loaded page
    await page.waitForSelector('#upload-form');
    await page.keyboard.press('Tab'); // skip link
    assert.equal(await page.evaluate(() => document.activeElement.id), 'skip');
    const seen = [];
    for (let i = 0; i < 9; i++) {
      await page.keyboard.press('Tab');
      seen.push(await page.evaluate(() => {
        const el = document.activeElement;
        const style = getComputedStyle(el);
        return { tag: el.tagName, id: el.id, text: (el.textContent || '').trim().slice(0, 20), outline: style.outlineStyle !== 'none' && style.outlineWidth !== '0px' };
      }));
    }
    assert.ok(seen.some((x) => x.text === 'Jobs'), 'nav reachable');
    assert.ok(seen.some((x) => x.id === 'f-file'), 'file input reachable');
    assert.ok(seen.some((x) => x.id === 'upload-button'), 'upload button reachable');
    assert.ok(seen.filter((x) => x.tag !== "BODY").every((x) => x.outline), `every focused element shows an outline: ${JSON.stringify(seen.filter((x) => !x.outline))}`);
  });

  await step('no script errors and no off-origin requests', () => {
    assert.deepEqual(problems, []);
  });
});

process.on('exit', (code) => { if (code !== 0 && serverLog) writeFileSync(path.join(artifacts, 'server.log'), serverLog); });

// A teacher decides students' requests for access on the sandbox service's admin page, in
// headless Chromium: log in to the hub, open the admin page (through the hub's OAuth), read the
// pending requests, then for each decision in cfg.decisions fill that request's form (scope,
// duration, reason) and press Grant or Deny; read what the page says after each. The
// screenshot (cfg.shot) shows the page before the decisions, with the requests waiting.
//
// Started by tests/hub/test_hub_requests.py with one JSON argument:
//   {adminUrl, hub, admin, password, executablePath, shot,
//    decisions: [{request, action: "grant"|"deny", scope?, for?, reason?}]}
// Prints one JSON object (what it saw; "ok": false and "error" on failure).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const report = { ok: false, steps: [], decided: [] };
const timeout = 30000;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sandbox-requests-'));
let context;
try {
  context = await chromium.launchPersistentContext(dir, {
    executablePath: cfg.executablePath ?? '/usr/bin/chromium', headless: true, timeout,
    viewport: { width: 1280, height: 1000 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-proxy-server',
           '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost'],
  });
  const page = context.pages()[0] ?? await context.newPage();
  await page.goto(`${cfg.hub}/hub/login?next=${encodeURIComponent('/hub/home')}`, { timeout });
  await page.fill('input[name=username]', cfg.admin);
  await page.fill('input[name=password]', cfg.password);
  await Promise.all([page.waitForLoadState('load'), page.click('input[type=submit], button[type=submit]')]);
  report.steps.push('teacher logged in');
  await page.goto(cfg.adminUrl, { timeout });
  if (page.url().includes('/hub/api/oauth2/authorize')) {
    await Promise.all([page.waitForNavigation({ timeout }), page.click('button:has-text("Authorize")')]);
    report.steps.push('authorized the service at the hub');
  }
  await page.waitForSelector('#requests', { timeout });
  report.pendingRows = await page.$$eval('#requests tr', (rows) =>
    rows.map((row) => [...row.cells].map((cell) => cell.textContent.trim())));
  // the page as the teacher finds it: the requests waiting for a decision
  if (cfg.shot) await page.screenshot({ path: cfg.shot, fullPage: true });
  for (const d of cfg.decisions) {
    const row = `#request-${d.request}`;
    await page.waitForSelector(row, { timeout });
    if (d.scope) await page.selectOption(`${row} select[name=scope]`, d.scope);
    await page.selectOption(`${row} select[name=for]`, d.for ?? '');
    if (d.reason) await page.fill(`${row} input[name=reason]`, d.reason);
    await Promise.all([page.waitForNavigation({ timeout }), page.click(`${row} button[value=${d.action}]`)]);
    report.decided.push({
      request: d.request, message: await page.textContent('#message'),
      stillPending: (await page.$(row)) !== null,
      grants: await page.textContent('#grants'), decidedText: await page.textContent('#decided'),
    });
    report.steps.push(`${d.action} ${d.request}`);
  }
  report.ok = true;
} catch (err) {
  report.error = String(err && err.stack || err);
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
